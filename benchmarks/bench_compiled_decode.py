"""Steered decoding in HF's fast mode (issue 14): a static KV cache plus torch.compile of the decode step
(on a GPU, HF's default "reduce-overhead" mode: CUDA graphs), against plain PEFT decoding in the same mode,
on the real SmolLM2-135M (the embedded default model; on a machine without it, a random Llama of its shape)
with a LoRA adapter (SPEC 5: r=8 on q, k, v, o):

  plain_eager       PEFT's own generate, dynamic cache
  plain_compiled    PEFT's own generate, cache_implementation="static" + compile_config
  steered_eager     SteeredModel.generate (one forward of 2B rows), dynamic cache
  steered_compiled  SteeredModel.generate, cache_implementation="static" + compile_config

64 new tokens, greedy, batch 1 and 8. The first call of each mode compiles (warm-up, not timed). Each round
runs all four modes once, in an order that rotates from round to round, so a machine whose speed drifts
slows every mode alike; the per-mode times sit in extra_info["seconds"].

    python -m pytest benchmarks/bench_compiled_decode.py --benchmark-json=benchmarks/results/compiled-decode-cpu.json
    python benchmarks/report_compiled_decode.py benchmarks/results/compiled-decode-cpu.json
"""
import time

import pytest
import torch
import transformers
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from svd_fast import models
from svd_fast.adaptation.training import preset_config
from svd_fast.decoding import SteeredModel

from interleaved import time_interleaved
from machine import describe

NEW_TOKENS = 64
PROMPT_TOKENS = 16
ROUNDS = 5
MODES = ("plain_eager", "plain_compiled", "steered_eager", "steered_compiled")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def base_model():
    """The real SmolLM2-135M; where its package is missing (the GPU machine has no network), a random Llama of
    its shape, which decodes at the same speed."""
    try:
        return models.load()[0], "SmolLM2-135M"
    except models.MissingModelError:
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return LlamaForCausalLM(config).eval(), "a random Llama of SmolLM2-135M's shape"


@pytest.fixture(scope="module")
def lora_model():
    torch.manual_seed(0)
    model, name = base_model()
    config = preset_config("lora", model)
    config.init_lora_weights = False  # a non-zero adapter, as after a warm start
    model = get_peft_model(model, config).to(DEVICE).eval()
    model.bench_name = name
    return model


def prompts(batch):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 49152, (batch, PROMPT_TOKENS), generator=g).to(DEVICE)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def compile_config():
    """HF's default compile settings; on the CPU HF compiles only when asked to (`_compile_all_devices`)."""
    config = transformers.CompileConfig()
    config._compile_all_devices = True
    return config


def runner(lora_model, mode, inputs):
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    if mode.endswith("compiled"):
        settings.update(cache_implementation="static", compile_config=compile_config())
    if mode.startswith("steered"):
        steered = SteeredModel(lora_model, mu=1.0, alpha=0.1)
        return lambda: steered.generate(**inputs, **settings)

    def plain():
        with torch.no_grad():
            return lora_model.generate(**inputs, **settings)

    return plain


def synchronized(run):
    def timed():
        out = run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return timed


@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_decode(benchmark, lora_model, batch):
    inputs = prompts(batch)
    runners = {mode: synchronized(runner(lora_model, mode, inputs)) for mode in MODES}
    compile_seconds = {}
    for mode, run in runners.items():  # warm-up: the compiled modes compile here
        t0 = time.perf_counter()
        expected = run()
        compile_seconds[mode] = time.perf_counter() - t0
        assert expected.shape == (batch, PROMPT_TOKENS + NEW_TOKENS)

    def check(out):
        assert out.shape == (batch, PROMPT_TOKENS + NEW_TOKENS)

    seconds = time_interleaved(benchmark, runners, ROUNDS, check)
    benchmark.extra_info.update(model=lora_model.bench_name, batch=batch, new_tokens=NEW_TOKENS, seconds=seconds, first_call_seconds=compile_seconds,
                                torch=torch.__version__, transformers=transformers.__version__,
                                machine=describe(DEVICE))
