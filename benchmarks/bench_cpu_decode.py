"""CPU decode throughput with and without the small-batch linear kernel (issue 6), on the real
SmolLM2-135M (the embedded default model) with a LoRA adapter (SPEC 5: r=8 on q, k, v, o):

  plain_stock     PEFT's own generate, stock linear layers
  plain_kernel    PEFT's own generate inside svd_fast.cpu_decode.small_batch_linears
  steered_stock   SteeredModel (one forward of 2B rows), cpu_linear_kernel=False
  steered_kernel  SteeredModel (one forward of 2B rows), cpu_linear_kernel=True (the default)

64 new tokens, greedy, batch 1 and 8. Each benchmark round runs all four modes once, in an order that
rotates from round to round, so a machine whose speed drifts (shared VMs do) slows every mode alike; the
per-mode times sit in extra_info["seconds"].

    python -m pytest benchmarks/bench_cpu_decode.py --benchmark-json=benchmarks/results/cpu-decode.json
    python benchmarks/report_cpu_decode.py benchmarks/results/cpu-decode.json

SVD_FAST_BENCH_MODEL=gemma3-270m runs it on Gemma 3 270M (vocabulary 262,144) instead;
SVD_FAST_BENCH_NEW_TOKENS and SVD_FAST_BENCH_ROUNDS shorten a run (the report says what ran).
"""
import os

import pytest
import torch
from peft import get_peft_model

from svd_fast import models
from svd_fast.decoding.cpu_linear import small_batch_linears
from svd_fast.decoding import SteeredModel
from svd_fast.adaptation.training import preset_config

from interleaved import time_interleaved
from machine import describe

MODEL = os.environ.get("SVD_FAST_BENCH_MODEL", models.DEFAULT_MODEL)  # or gemma3-270m
NEW_TOKENS = int(os.environ.get("SVD_FAST_BENCH_NEW_TOKENS", "64"))
ROUNDS = int(os.environ.get("SVD_FAST_BENCH_ROUNDS", "9"))
MODES = ("plain_stock", "plain_kernel", "steered_stock", "steered_kernel")


@pytest.fixture(scope="module")
def lora_model():
    model, _ = models.load(MODEL)
    torch.manual_seed(0)
    config = preset_config("lora", model)
    config.init_lora_weights = False  # a non-zero adapter, as after a warm start
    return get_peft_model(model, config).eval()


def prompts(batch):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 49152, (batch, 16), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def runner(lora_model, mode, inputs):
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    if mode.startswith("steered"):
        steered = SteeredModel(lora_model, mu=1.0, alpha=0.1, cpu_linear_kernel=(mode == "steered_kernel"))
        return lambda: steered.generate(**inputs, **settings)

    def plain():
        with torch.no_grad():
            if mode == "plain_kernel":
                with small_batch_linears(lora_model):
                    return lora_model.generate(**inputs, **settings)
            return lora_model.generate(**inputs, **settings)

    return plain


@pytest.mark.parametrize("batch", [1, 8])
def test_cpu_decode(benchmark, lora_model, batch):
    inputs = prompts(batch)
    runners = {mode: runner(lora_model, mode, inputs) for mode in MODES}
    for run in runners.values():  # warm-up
        run()

    def check(out):
        assert out.shape == (batch, 16 + NEW_TOKENS)

    seconds = time_interleaved(benchmark, runners, ROUNDS, check)
    benchmark.extra_info.update(model=MODEL, batch=batch, new_tokens=NEW_TOKENS, seconds=seconds, torch=torch.__version__,
                                machine=describe())
