"""What steered generate promises beyond the tokens of one call: continuing from the cache it returned,
inputs_embeds, logits processors that empty the keep set, and SteeringLogitsProcessor never steering
silently against the wrong context."""
import copy

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel
from peft import LoraConfig, get_peft_model

from svd_fast import reference
from svd_fast.decoding import SteeredModel, SteeringLogitsProcessor

from hf_models import char_tokenizer, tiny_model
from test_steering import PROMPTS, adapted, left_padded

# (method, one_forward) -> the route SteeredModel takes
ROUTES = {("lora", "auto"): "lora", ("lora_embed", "auto"): "mixed", ("ia3", "auto"): "ia3",
          ("prompt", "auto"): "virtual", ("ptuning_v2", "auto"): "virtual", ("lora", False): "two",
          ("loha", "auto"): "tuner", ("dora", "auto"): "tuner"}
CACHED_ROUTES = list(ROUTES)
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def steered_for(method, one_forward, **kwargs):
    steered = SteeredModel(adapted("llama", method), mu=2.0, alpha=0.3, one_forward=one_forward, **kwargs)
    assert steered.route == ROUTES[(method, one_forward)]
    return steered


# ---------------------------------------------------------------------------------------------------
# Continuing from a returned cache.


@pytest.mark.parametrize("method,one_forward", CACHED_ROUTES)
def test_continuing_from_the_returned_cache_equals_one_call(method, one_forward):
    steered = steered_for(method, one_forward)
    batch = left_padded(char_tokenizer(), PROMPTS)
    whole = steered.generate(**batch, max_new_tokens=6, **GREEDY)
    first = steered.generate(**batch, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(first.sequences[:, batch["input_ids"].shape[1]:])], 1)
    second = steered.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                              max_new_tokens=4, **GREEDY)
    assert second.tolist() == whole.tolist()


def test_the_field_case_prompt_tuning_continues_exactly():
    steered = steered_for("prompt", "auto")
    ids = torch.tensor([[10, 20, 30, 40, 50, 60]])
    whole = steered.generate(input_ids=ids, max_new_tokens=4, **GREEDY)
    first = steered.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    second = steered.generate(input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=2,
                              **GREEDY)
    assert second.tolist() == whole.tolist()


def test_a_cache_it_did_not_fill_is_refused():
    steered = steered_for("lora", "auto")
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        plain = steered.model.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    with pytest.raises(ValueError, match="not a cache returned by SteeredModel.generate"):
        steered.generate(input_ids=plain.sequences, past_key_values=plain.past_key_values, max_new_tokens=2, **GREEDY)
    other = steered_for("prompt", "auto").generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True,
                                                   **GREEDY)
    with pytest.raises(ValueError, match="another route"):
        steered.generate(input_ids=other.sequences, past_key_values=other.past_key_values, max_new_tokens=2, **GREEDY)
    assert steered.generate(input_ids=ids, past_key_values=DynamicCache(), max_new_tokens=2, **GREEDY).shape == (1, 6)


def test_the_route_without_a_cache_refuses_to_continue_from_one():
    steered = steered_for("prompt", "auto")
    ids = torch.tensor([[10, 20, 30, 40]])
    first = steered.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    no_cache = SteeredModel(steered.model, mu=2.0, alpha=0.3, one_forward=False)
    with pytest.raises(ValueError, match="keeps no KV cache"):
        no_cache.generate(input_ids=first.sequences, past_key_values=first.past_key_values, max_new_tokens=2, **GREEDY)


# ---------------------------------------------------------------------------------------------------
# inputs_embeds.


@pytest.mark.parametrize("method,one_forward", CACHED_ROUTES)
def test_inputs_embeds_as_hf_generate_takes_them(method, one_forward):
    steered = steered_for(method, one_forward)
    batch = left_padded(char_tokenizer(), PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        embeds = steered.model.get_base_model().get_input_embeddings()(ids)
    from_ids = steered.generate(**batch, max_new_tokens=5, **GREEDY)
    only_embeds = steered.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, **GREEDY)
    both = steered.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, **GREEDY)
    assert both[:, ids.shape[1]:].tolist() == only_embeds.tolist()  # HF returns the new tokens only
    if method != "lora_embed":  # LoRA on the embedding acts on input_ids; embeddings given bypass it, in PEFT too
        assert both.tolist() == from_ids.tolist()


def test_inputs_embeds_on_the_route_without_a_cache_is_refused():
    steered = SteeredModel(adapted("llama", "prompt"), mu=2.0, one_forward=False)
    embeds = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="inputs_embeds needs a KV cache"):
        steered.generate(inputs_embeds=embeds, max_new_tokens=2, **GREEDY)
    with pytest.raises(ValueError, match="needs input_ids .* or inputs_embeds"):
        steered.generate(max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------
# Logits processors that remove the whole keep set (fill=-inf): the row falls back to the adapter.


def emptying_case(method="lora"):
    """alpha = 1 keeps exactly the top token; banning it as EOS under min_new_tokens empties the keep set."""
    steered = steered_for(method, "auto") if method != "lora" else SteeredModel(adapted("llama", "lora"), mu=2.0,
                                                                                 alpha=1.0)
    steered.alpha = 1.0
    batch = left_padded(char_tokenizer(), PROMPTS)
    with torch.no_grad():
        z_a, z_b, _ = steered.logits_pair(batch["input_ids"], batch["attention_mask"])
    kept = reference.steer_logits(z_a[:, -1], z_b[:, -1], 2.0, 1.0).argmax(-1)
    return steered, batch, z_a[:, -1], kept


@pytest.mark.parametrize("banning", ["min_new_tokens", "suppress_tokens", "bad_words_ids"])
def test_greedy_falls_back_to_the_adapter_when_processors_empty_the_keep_set(banning):
    steered, batch, z_a, kept = emptying_case()
    row = 0
    token = int(kept[row])
    ban = {"min_new_tokens": dict(min_new_tokens=1, eos_token_id=token),
           "suppress_tokens": dict(suppress_tokens=[token], eos_token_id=None),
           "bad_words_ids": dict(bad_words_ids=[[token]], eos_token_id=None)}[banning]
    with pytest.warns(UserWarning, match="removed every token of the keep set"):
        out = steered.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=0, **ban)
    fallback = z_a[row].clone()
    fallback[token] = float("-inf")
    assert int(out[row, -1]) == int(fallback.argmax())  # the adapter's best allowed token, not token 0


def test_sampling_and_beam_search_survive_an_emptied_keep_set():
    steered, batch, _, kept = emptying_case()
    token = int(kept[0])
    for kwargs in (dict(do_sample=True, top_k=10), dict(num_beams=3, do_sample=False)):
        torch.manual_seed(0)
        with pytest.warns(UserWarning, match="adapter's own"):
            out = steered.generate(**batch, max_new_tokens=2, min_new_tokens=2, eos_token_id=token, pad_token_id=0,
                                   **kwargs)
        assert out.shape == (len(PROMPTS), batch["input_ids"].shape[1] + 2) and not (out[:, -2:] == token).any()


def test_fill_keep_never_empties_the_keep_set():
    steered, batch, _, kept = emptying_case()
    steered.fill = "keep"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = steered.generate(**batch, max_new_tokens=1, min_new_tokens=1, eos_token_id=int(kept[0]),
                               do_sample=False, pad_token_id=0)
    assert int(out[0, -1]) != int(kept[0])


# ---------------------------------------------------------------------------------------------------
# SteeringLogitsProcessor: never against the wrong context.


def gpt2_field_case():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                                       initializer_range=0.5)).eval()
    base = copy.deepcopy(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                  init_lora_weights=False)).eval()
    ids = torch.tensor([[95, 95, 95, 95, 11, 22, 33], [40, 41, 42, 43, 44, 45, 46]])
    return peft_model, base, ids, (ids != 95).long()


def test_processor_on_a_left_padded_batch_needs_the_mask():
    peft_model, base, ids, mask = gpt2_field_case()
    kw = dict(do_sample=False, max_new_tokens=6, pad_token_id=95, eos_token_id=None)
    with torch.no_grad(), pytest.raises(ValueError, match="no attention_mask: a logits processor cannot see"):
        peft_model.generate(input_ids=ids, attention_mask=mask,
                            logits_processor=[SteeringLogitsProcessor(base, mu=2.0, fill="keep")], **kw)
    with torch.no_grad(), pytest.raises(ValueError, match=r"holds the pad token \(id 95\)"):
        peft_model.generate(input_ids=ids, attention_mask=mask, **kw, logits_processor=[
            SteeringLogitsProcessor(base, mu=2.0, fill="keep", pad_token_id=95)])
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=ids, attention_mask=mask, **kw, logits_processor=[
            SteeringLogitsProcessor(base, mu=2.0, fill="keep", attention_mask=mask)])
    ours = SteeredModel(peft_model, 2.0, fill="keep").generate(input_ids=ids, attention_mask=mask, **kw)
    assert theirs.tolist() == ours.tolist()


def test_processor_refuses_a_model_that_is_not_the_base():
    base = tiny_model("llama")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(ValueError, match="base_model holds PEFT adapter layers"):
        SteeringLogitsProcessor(base, mu=1.0)  # get_peft_model injected LoRA into it
    other_vocab = tiny_model("gpt2")
    other_vocab.resize_token_embeddings(50)
    processor = SteeringLogitsProcessor(other_vocab, mu=1.0)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), pytest.raises(ValueError, match="vocabulary of 50 tokens"):
        processor(ids, peft_model(input_ids=ids).logits[:, -1])


def test_processor_mask_belongs_to_one_prompt_batch():
    model = adapted("llama")
    tok = char_tokenizer()
    batch = left_padded(tok, PROMPTS)
    processor = SteeringLogitsProcessor(model, mu=2.0, attention_mask=batch["attention_mask"])
    kw = dict(do_sample=False, max_new_tokens=3)
    with torch.no_grad():
        model.generate(**batch, logits_processor=[processor], **kw)
        beams = model.generate(**batch, logits_processor=[processor], num_beams=2, **kw)  # same prompts, 2 rows each
        assert beams.shape[0] == len(PROMPTS)
        other = left_padded(tok, ["a much longer prompt than before"])
        with pytest.raises(ValueError, match="give each prompt batch its own SteeringLogitsProcessor"):
            model.generate(**other, logits_processor=[processor], **kw)
        # the same shape, other prompts and other padding: refused too, by the processor bound to PROMPTS ...
        same_shape = left_padded(tok, ["Steering vectors decodX", "B", "The dog sat"])
        assert same_shape["input_ids"].shape == batch["input_ids"].shape
        with pytest.raises(ValueError, match="belongs to the prompt batch of its first generate call"):
            model.generate(**same_shape, logits_processor=[processor], **kw)
        # ... and by a new processor given the old mask, whose masked positions hold real tokens here
        fresh = SteeringLogitsProcessor(model, mu=2.0, attention_mask=batch["attention_mask"])
        with pytest.raises(ValueError, match="masks tokens that are not the pad token"):
            model.generate(**same_shape, logits_processor=[fresh], **kw)


def test_a_cache_with_use_cache_false_is_refused_with_the_right_reason():
    steered = steered_for("lora", "auto")
    ids = torch.tensor([[10, 20, 30, 40]])
    first = steered.generate(input_ids=ids, max_new_tokens=2, return_dict_in_generate=True, **GREEDY)
    with pytest.raises(ValueError, match="but use_cache=False"):
        steered.generate(input_ids=first.sequences, past_key_values=first.past_key_values, use_cache=False,
                         max_new_tokens=2, **GREEDY)


@pytest.mark.skipif(Version(transformers.__version__) >= Version("5.10"), reason="tested in test_static_cache.py")
def test_static_cache_on_an_older_transformers_is_one_clear_error():
    steered = steered_for("lora", "auto")
    with pytest.raises(ValueError, match="needs transformers 5.10 or later"):
        steered.generate(**left_padded(char_tokenizer(), PROMPTS), max_new_tokens=2, cache_implementation="static",
                         **GREEDY)
