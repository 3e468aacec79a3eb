"""Adapters whose trained weights live outside their tuner layers: PEFT's `modules_to_save` (whole modules
the adapter trains) and `trainable_token_indices` (trained rows of the embedding). On every route the base
rows must give the plain base model's logits and the adapter rows the PEFT model's own, at prefill and over
cached decode steps; a module that cannot be split per row takes two forwards, still correct."""
import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from svd_fast import reference
from svd_fast.decoding import SteeredModel, SteeringLogitsProcessor

from hf_models import char_tokenizer, tiny_model
from test_one_forward import assert_rows_over_cached_steps
from test_steering import PROMPTS, left_padded

ATTENTION = ["q_proj", "v_proj"]
CONFIGS = {
    # name: (PEFT config, tied embeddings, the route SteeredModel takes)
    "lora+lm_head": (lambda: LoraConfig(r=4, target_modules=ATTENTION, modules_to_save=["lm_head"]), False, "lora"),
    "lora+embed_tokens": (lambda: LoraConfig(r=4, target_modules=ATTENTION, modules_to_save=["embed_tokens"]), False,
                          "lora"),
    "lora+final_norm": (lambda: LoraConfig(r=4, target_modules=ATTENTION, modules_to_save=["norm"]), False, "lora"),
    "lora+trainable_tokens": (lambda: LoraConfig(r=4, target_modules=ATTENTION, trainable_token_indices=[5, 17, 40]),
                              False, "lora"),
    "lora+trainable_tokens_tied": (lambda: LoraConfig(r=4, target_modules=ATTENTION, trainable_token_indices=[5, 40]),
                                   True, "lora"),
    "lora_embed+lm_head": (lambda: LoraConfig(r=4, target_modules=ATTENTION + ["embed_tokens"],
                                              modules_to_save=["lm_head"]), False, "mixed"),
    "lora_embed+final_norm": (lambda: LoraConfig(r=4, target_modules=ATTENTION + ["embed_tokens"],
                                                 modules_to_save=["norm"]), False, "mixed"),
    "ia3+lm_head": (lambda: IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"],
                                      modules_to_save=["lm_head"]), False, "ia3"),
    "prompt+lm_head": (lambda: PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["lm_head"]), False, "virtual"),
    "prompt+embed_tokens": (lambda: PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["embed_tokens"]), False,
                            "virtual"),
    "prefix+lm_head": (lambda: PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16,
                                                  modules_to_save=["lm_head"]), False, "virtual"),
    # A whole decoder layer reads and writes the KV cache of every row: it cannot run per row.
    "lora+decoder_layer": (lambda: LoraConfig(r=4, target_modules=ATTENTION, modules_to_save=["model.layers.1"]),
                           False, "two"),
    "prompt+decoder_layer": (lambda: PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["model.layers.1"]),
                             False, "two"),
}


def build(name, seed=0):
    """(PEFT model with every trained weight moved away from its init, a separate plain base model)."""
    make_config, tie, _ = CONFIGS[name]
    config = make_config()
    config.task_type = "CAUSAL_LM"
    plain = tiny_model("llama", seed, tie=tie)
    model = get_peft_model(tiny_model("llama", seed, tie=tie), config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # LoRA / IA3 / prompt weights, the saved modules' copies, the token rows
                p.add_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.3))
    return model, plain


def expected_pair(model, plain, ids, mask):
    """The PEFT model's own last-position logits and the plain base model's (positions from the mask)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    adapted_kwargs = dict(input_ids=ids, attention_mask=mask)
    if not model.peft_config["default"].is_prompt_learning:
        adapted_kwargs["position_ids"] = pos
    with torch.no_grad():
        return (model(**adapted_kwargs).logits[:, -1],
                plain(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1])


@pytest.mark.parametrize("one_forward", ["auto", False])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_base_rows_are_the_plain_base_model(name, one_forward):
    model, plain = build(name)
    steered = SteeredModel(model, mu=1.0, one_forward=one_forward)
    assert steered.route == (CONFIGS[name][2] if one_forward == "auto" else "two")
    want_a, want_b = assert_rows_over_cached_steps(steered, lambda ids, mask: expected_pair(model, plain, ids, mask),
                                                   steps=3)
    assert (want_a - want_b).abs().max() > 1e-2  # the trained modules matter: a wrong base row would show


def test_the_field_case_lm_head_saved_beside_lora():
    """The reported case: LoRA on q_proj with the LM head trained too; steered logits = steer_logits of the
    PEFT model's and the untouched base model's logits."""
    model, plain = build("lora+lm_head")
    ids = torch.randint(3, 95, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.steer_logits(model(input_ids=ids).logits, plain(input_ids=ids).logits, 2.0, fill="keep")
    for one_forward in ("auto", False):
        got = SteeredModel(model, 2.0, fill="keep", one_forward=one_forward)(ids)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["lora+lm_head", "lora+trainable_tokens", "prompt+lm_head", "lora+decoder_layer"])
def test_greedy_generation_equals_the_two_model_loop(name):
    model, plain = build(name)
    batch = left_padded(char_tokenizer(), PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    out = SteeredModel(model, mu=3.0, alpha=0.3).generate(**batch, max_new_tokens=6, do_sample=False,
                                                           eos_token_id=None)
    for _ in range(6):
        z_a, z_b = expected_pair(model, plain, ids, mask)
        token = reference.steer_logits(z_a, z_b, 3.0, 0.3).argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    assert out.tolist() == ids.tolist()


def test_a_saved_module_with_another_output_takes_two_forwards():
    """A MoE router (transformers 5: a module returning a tuple; 4.x: a linear layer) saved beside LoRA:
    whichever route SteeredModel takes, the base rows are the plain Mixtral's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=99, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128)
    torch.manual_seed(0)
    plain = MixtralForCausalLM(config).eval()
    model = get_peft_model(copy.deepcopy(plain), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["gate"],
                                                            task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    steered = SteeredModel(model, mu=1.0)
    routers = [m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert routers and steered.route == ("lora" if isinstance(routers[0].original_module, torch.nn.Linear) else "two")
    assert_rows_over_cached_steps(steered, lambda ids, mask: expected_pair(model, plain, ids, mask), steps=2)


def test_one_forward_true_names_the_module_that_cannot_run_per_row():
    model, _ = build("lora+decoder_layer")
    assert "model.layers.1" in SteeredModel(model, mu=1.0).two_forward_reason
    with pytest.raises(ValueError, match=r"no one-forward path: .*model\.layers\.1.*one_forward=False"):
        SteeredModel(model, mu=1.0, one_forward=True)


def test_logits_processor_runs_the_original_modules_for_the_base():
    model, plain = build("prompt+lm_head")
    batch = left_padded(char_tokenizer(), PROMPTS)
    processor = SteeringLogitsProcessor(model, mu=2.0, fill="keep", attention_mask=batch["attention_mask"])
    with torch.no_grad():
        scores = model(**batch).logits[:, -1]
        got = processor(batch["input_ids"], scores)
    _, z_b = expected_pair(model, plain, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, reference.steer_logits(scores, z_b, 2.0, fill="keep"), rtol=1e-4, atol=1e-4)


def test_lora_bias_training_warns_that_the_base_is_modified():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=ATTENTION, bias="all")).eval()
    with pytest.warns(UserWarning, match="bias='all'.*no longer the pre-trained model's"):
        SteeredModel(model, mu=1.0)
