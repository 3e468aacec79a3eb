"""One forward of 2B rows for every PEFT method the paper uses: the base rows must give the plain base
model's logits and the adapter rows the PEFT model's, at prefill and across cached decode steps."""
import pytest
import torch

from svd_fast.decoding import SteeredModel

from hf_models import char_tokenizer
from test_steering import PROMPTS, adapted, full_recompute_pair, left_padded

TUNERS = ["dora", "loha", "lokr", "vera", "oft", "adalora"]  # the generic route of tuner layers on adapter rows
METHODS = ["lora", "lora_embed", "ia3", "prompt", "ptuning_v2", *TUNERS]
EXPECTED_MODE = {"lora": "one-forward (LoRA on adapter rows)", "lora_embed": "one-forward (mixed-adapter batch)",
                 "ia3": "one-forward (per-row IA3)",
                 "prompt": "one-forward (virtual tokens on adapter rows)",
                 "ptuning_v2": "one-forward (virtual tokens on adapter rows)",
                 **{method: "one-forward (tuner layers on adapter rows)" for method in TUNERS}}


def assert_rows_over_cached_steps(steered, expected_pair, steps):
    """steered.logits_pair's last-position rows against expected_pair(ids, mask) -> (z_adapted, z_base) at
    prefill and over `steps` decode steps of random tokens, each continuing the returned cache (or, on the
    route that keeps none, recomputing). Returns the last expected pair."""
    batch = left_padded(char_tokenizer(), PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z_a, z_b, cache = steered.logits_pair(ids, mask)
        for step in range(steps + 1):
            want_a, want_b = expected_pair(ids, mask)
            torch.testing.assert_close(z_a[:, -1], want_a, rtol=1e-4, atol=1e-4, msg=f"adapter rows, step {step}")
            torch.testing.assert_close(z_b[:, -1], want_b, rtol=1e-4, atol=1e-4, msg=f"base rows, step {step}")
            new = torch.randint(4, 99, (ids.shape[0], 1), generator=g)
            ids, mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
            z_a, z_b, cache = (steered.logits_pair(new, mask, cache=cache) if cache is not None
                               else steered.logits_pair(ids, mask))
    return want_a, want_b


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("method", METHODS)
def test_rows_equal_base_and_peft_model_over_16_cached_steps(method, arch):
    model = adapted(arch, method)
    steered = SteeredModel(model, mu=1.0)
    assert steered.mode == EXPECTED_MODE[method]
    assert_rows_over_cached_steps(steered, lambda ids, mask: full_recompute_pair(model, ids, mask), steps=16)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_and_beam_one_forward_equal_two_forwards(method, arch, batch_size):
    model = adapted(arch, method)
    prompts = (PROMPTS + ["x"])[:batch_size]
    batch = left_padded(char_tokenizer(), prompts)
    one = SteeredModel(model, mu=3.0, alpha=0.2)
    two = SteeredModel(model, mu=3.0, alpha=0.2, one_forward=False)
    assert one.mode.startswith("one-forward") and two.mode.startswith("two-forward")
    for kwargs in (dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False)):
        a = one.generate(**batch, max_new_tokens=10, **kwargs)
        b = two.generate(**batch, max_new_tokens=10, **kwargs)
        assert a.tolist() == b.tolist(), kwargs


def test_lora_rows_with_gradients_and_after_a_merge():
    model = adapted("llama", "lora")
    steered = SteeredModel(model, mu=1.0)
    batch = left_padded(char_tokenizer(), PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        want_a, want_b, _ = steered.logits_pair(ids, mask)  # the in-place fast path
    z_a, z_b, _ = steered.logits_pair(ids, mask)  # with autograd: the out-of-place path
    torch.testing.assert_close(z_a, want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_b, want_b, rtol=1e-5, atol=1e-5)
    z_a.sum().backward()
    lora_a = next(p for name, p in model.named_parameters() if "lora_A" in name)
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        steered.logits_pair(ids, mask)


def test_adapter_rows_of_a_layer_input():
    """The per-row paths find the adapter rows of a layer's input: batch first, or batch and positions
    flattened (a MoE gate); tokens routed to a MoE expert mix both halves and are refused, never split."""
    from svd_fast.decoding.row_split import AdapterRows

    rows, layer = AdapterRows(n=3, width=5), torch.nn.Linear(4, 4)
    assert rows.of(torch.zeros(6, 5, 4), layer) == 3
    assert rows.of(torch.zeros(6, 4), layer) == 3
    assert rows.of(torch.zeros(30, 4), layer) == 15
    with pytest.raises(RuntimeError, match="routes tokens to it.*one_forward=False"):
        rows.of(torch.zeros(11, 4), layer)


def test_why_there_is_no_one_forward_route():
    """The reason names what the route of the adapter's own kind refused, not just the kind."""
    model = adapted("llama", "loha")
    model.merge_adapter()
    steered = SteeredModel(model, mu=1.0)
    assert steered.route == "two" and steered.two_forward_reason == "tuner: the adapter is merged into the weights"
