"""Decode throughput, side by side in one run: (a) plain PEFT generate with the adapter, (b) steering
with two separate forwards, (c) steering with one forward of 2B rows; for each of the paper's PEFT
methods with SPEC 5's settings (LoRA r=8 on q, k, v, o; IA3; prompt tuning; P-tuning v2), and for the
tuners of the generic route (DoRA, LoHa, LoKr, VeRA, OFT, AdaLoRA; rank 8 on q, k, v, o).

A random Llama with SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 KV heads, intermediate 1536,
vocab 49152, tied embeddings); 64 new tokens, greedy, batch 1 and 8.

    python -m pytest benchmarks/bench_decode.py --benchmark-json=benchmarks/results/decode-cpu.json
    python benchmarks/report_decode.py benchmarks/results/decode-cpu.json
"""
import os
import time

import peft
import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import svd_fast
from svd_fast.adaptation.training import preset_config
from svd_fast.decoding import SteeredModel

from machine import describe

NEW_TOKENS = int(os.environ.get("SVD_FAST_BENCH_NEW_TOKENS", "64"))  # fewer for a quicker run; the report says
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).to(DEVICE).eval()


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
TUNER_CONFIGS = {  # the generic route's tuners, rank 8 on the attention projections as SPEC 5's LoRA
    "dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION, use_dora=True),
    "loha": lambda: peft.LoHaConfig(r=8, alpha=16, target_modules=ATTENTION),
    "lokr": lambda: peft.LoKrConfig(r=8, alpha=16, target_modules=ATTENTION),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=ATTENTION),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=32, target_modules=ATTENTION),
    "adalora": lambda: peft.AdaLoraConfig(init_r=8, target_r=8, total_step=100, target_modules=ATTENTION),
}


@pytest.fixture(scope="module", params=["lora", "ia3", "prompt", "ptuning_v2", *TUNER_CONFIGS])
def peft_model(request, base_model):
    config = TUNER_CONFIGS[request.param]() if request.param in TUNER_CONFIGS else preset_config(request.param, base_model)
    config.task_type = "CAUSAL_LM"
    model = get_peft_model(base_model, config).eval()
    yield request.param, model
    if not model.peft_config["default"].is_prompt_learning:
        model.unload()  # the base model's layers back as they were (prompt learning never changed them)


def prompts(batch):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 49152, (batch, 16), generator=g)
    return dict(input_ids=ids.to(DEVICE), attention_mask=torch.ones_like(ids).to(DEVICE))




@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("mode", ["plain_adapter", "two_forward", "one_forward"])
def test_decode(benchmark, peft_model, mode, batch):
    method, lora_model = peft_model
    inputs = prompts(batch)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    if mode == "plain_adapter":
        def run():
            with torch.no_grad():
                return lora_model.generate(**inputs, **settings)
    else:
        steered = SteeredModel(lora_model, mu=1.0, alpha=0.1, one_forward=(mode == "one_forward"))
        def run():
            return steered.generate(**inputs, **settings)
    out = benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=1)
    assert out.shape == (batch, 16 + NEW_TOKENS)
    # The steering op's own cost on one step's logits, for its share of a step.
    z = torch.randn(batch, 49152, device=DEVICE)
    svd_fast.steer_logits(z, z, 1.0)
    start = time.perf_counter()
    for _ in range(20):
        svd_fast.steer_logits(z, z, 1.0)
    op_ms = (time.perf_counter() - start) / 20 * 1e3
    benchmark.extra_info.update(method=method, mode=mode, batch=batch, new_tokens=NEW_TOKENS, device=DEVICE, machine=describe(DEVICE),
                                torch=torch.__version__, steer_op_ms=op_ms)
