"""SteeredModel against a plain loop that runs the base and the adapted model separately, with full
recompute and the reference op, on tiny random Llama, Qwen2 and GPT-2 models."""
import pytest
import torch
from peft import (AdaLoraConfig, HRAConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PrefixTuningConfig,
                  PromptTuningConfig, VeraConfig, get_peft_model)

from svd_fast import reference
from svd_fast.decoding import SteeredModel, SteeringLogitsProcessor

from hf_models import char_tokenizer, tiny_model

ARCHS = ["llama", "qwen2", "gpt2"]


def adapter_config(method, arch):
    attention = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    if method == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=attention, init_lora_weights=False, task_type="CAUSAL_LM")
    if method == "lora_embed":  # an embedding layer among the targets: PEFT's mixed-adapter batch path
        return LoraConfig(r=4, lora_alpha=8, target_modules=attention + ["embed_tokens"], init_lora_weights=False,
                          task_type="CAUSAL_LM")
    if method == "loha":
        return LoHaConfig(r=4, alpha=8, target_modules=attention, init_weights=False, task_type="CAUSAL_LM")
    if method == "lokr":
        return LoKrConfig(r=4, alpha=8, target_modules=attention, init_weights=False, task_type="CAUSAL_LM")
    if method == "dora":
        return LoraConfig(r=4, lora_alpha=8, target_modules=attention, use_dora=True, init_lora_weights=False,
                          task_type="CAUSAL_LM")
    if method == "vera":
        return VeraConfig(r=4, target_modules=attention, task_type="CAUSAL_LM")
    if method == "oft":
        return OFTConfig(r=0, oft_block_size=8, target_modules=attention, init_weights=False, task_type="CAUSAL_LM")
    if method == "adalora":
        return AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=attention, task_type="CAUSAL_LM")
    if method == "ia3":
        ff = ["c_fc"] if arch == "gpt2" else ["down_proj"]
        return IA3Config(target_modules=attention + ff, feedforward_modules=ff, init_ia3_weights=False,
                         task_type="CAUSAL_LM")
    if method == "prompt":
        return PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    return PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16, task_type="CAUSAL_LM")


def adapted(arch="llama", method="lora", seed=0):
    model = get_peft_model(tiny_model(arch, seed), adapter_config(method, arch)).eval()
    if method == "ia3":  # IA3's init is identity-ish; move it so the adapter matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "ia3_l" in name:
                    p.uniform_(0.5, 1.5)
    if method in ("prompt", "ptuning_v2"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "prompt_encoder" in name:
                    p.normal_(0, 1.0)
    if method in ("vera", "adalora"):  # initialised to the identity: move every trained weight
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def left_padded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def full_recompute_pair(peft_model, ids, mask):
    """Last-position logits of the PEFT model's own forward (PEFT places virtual tokens and their
    positions itself) and of the plain base model on the left-padded batch (positions from the mask)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_learning = peft_model.peft_config["default"].is_prompt_learning
    adapted_kwargs = dict(input_ids=ids, attention_mask=mask) if prompt_learning else dict(
        input_ids=ids, attention_mask=mask, position_ids=pos)
    with torch.no_grad():
        z_a = peft_model(**adapted_kwargs).logits[:, -1]
        with peft_model.disable_adapter():
            z_b = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    return z_a, z_b


def reference_greedy(peft_model, input_ids, attention_mask, mu, alpha, fill, steps, eos=2, pad=0):
    """Both models run separately on the whole sequence at every step; the reference op steers. Rows
    that emitted EOS continue with padding, and the loop ends when all have, as in HF generate."""
    ids, mask = input_ids.clone(), attention_mask.clone()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        if finished.all():
            break
        z_a, z_b = full_recompute_pair(peft_model, ids, mask)
        next_token = reference.steer_logits(z_a, z_b, mu, alpha, fill).argmax(-1, keepdim=True)
        next_token[finished] = pad
        finished |= next_token[:, 0] == eos
        ids = torch.cat([ids, next_token], -1)
        mask = torch.cat([mask, torch.ones_like(next_token)], -1)
    return ids


PROMPTS = ["The cat sat", "A", "Steering vectors decode"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "ptuning_v2", "loha"])
def test_greedy_matches_two_model_reference(arch, method):
    if method == "loha" and arch == "gpt2":
        pytest.skip("PEFT's LoHa has no GPT-2 Conv1D layer")
    model = adapted(arch, method)
    tok = char_tokenizer()
    batch = left_padded(tok, PROMPTS)
    steered = SteeredModel(model, mu=4.0, alpha=0.3)
    assert steered.mode.startswith("one-forward")
    out = steered.generate(**batch, max_new_tokens=10, do_sample=False)
    expected = reference_greedy(model, batch["input_ids"], batch["attention_mask"], 4.0, 0.3, float("-inf"), 10)
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_with_left_padding_equals_one_by_one(arch):
    model = adapted(arch)
    tok = char_tokenizer()
    steered = SteeredModel(model, mu=2.0, alpha=0.2, fill="keep")
    batch = left_padded(tok, PROMPTS)
    together = steered.generate(**batch, max_new_tokens=8, do_sample=False)
    for i, prompt in enumerate(PROMPTS):
        alone = steered.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=8, do_sample=False)[0]
        row = together[i, batch["input_ids"].shape[1] - len(tok(prompt)["input_ids"]):]
        assert row[: len(alone)].tolist() == alone.tolist()
        assert torch.all(row[len(alone):] == tok.pad_token_id)  # the batch went on after this row's EOS


@pytest.mark.parametrize("arch", ARCHS)
def test_mu_zero_keep_reproduces_plain_adapter_generation(arch):
    model = adapted(arch)
    tok = char_tokenizer()
    batch = left_padded(tok, PROMPTS)
    steered = SteeredModel(model, mu=0.0, fill="keep")
    for kwargs in (dict(do_sample=False), dict(num_beams=3, do_sample=False),
                   dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8)):
        torch.manual_seed(1)
        ours = steered.generate(**batch, max_new_tokens=8, **kwargs)
        torch.manual_seed(1)
        with torch.no_grad():
            plain = model.generate(**batch, max_new_tokens=8, **kwargs)
        assert ours.tolist() == plain.tolist(), kwargs


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_search_cache_reordering(arch):
    """Beam search with the 2B-row cache = with two caches = with no cache at all (full recompute)."""
    model = adapted(arch)
    batch = left_padded(char_tokenizer(), PROMPTS)
    kwargs = dict(max_new_tokens=8, num_beams=4, num_return_sequences=2, do_sample=False)
    one = SteeredModel(model, mu=3.0, alpha=0.2).generate(**batch, **kwargs)
    two = SteeredModel(model, mu=3.0, alpha=0.2, one_forward=False).generate(**batch, **kwargs)
    none = SteeredModel(model, mu=3.0, alpha=0.2).generate(**batch, use_cache=False, **kwargs)
    assert one.tolist() == two.tolist() == none.tolist()


def test_steered_forward_at_every_position():
    model = adapted("qwen2")
    tok = char_tokenizer()
    tok.padding_side = "right"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    steered = SteeredModel(model, mu=1.5, alpha=0.1)
    logits = steered(batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        z_a = model(**batch).logits
        with model.disable_adapter():
            z_b = model(**batch).logits
    expected = reference.steer_logits(z_a, z_b, 1.5, 0.1)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[keep], expected[keep], rtol=1e-4, atol=1e-4)


def test_logits_processor_form_matches_steered_model():
    model = adapted("llama")
    batch = left_padded(char_tokenizer(), PROMPTS)
    ours = SteeredModel(model, mu=3.0, alpha=0.2).generate(**batch, max_new_tokens=6, do_sample=False)
    processor = SteeringLogitsProcessor(model, mu=3.0, alpha=0.2, attention_mask=batch["attention_mask"])
    with torch.no_grad():
        theirs = model.generate(**batch, max_new_tokens=6, do_sample=False, logits_processor=[processor])
    assert ours.tolist() == theirs.tolist()


def test_streamer_and_stopping_criteria():
    from transformers import StoppingCriteria

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.chunks.append("end")

    model = adapted("llama")
    tok = char_tokenizer()
    batch = tok(["abcde"], return_tensors="pt")
    streamer = Collect()
    out = SteeredModel(model, mu=1.0).generate(**batch, max_new_tokens=20, do_sample=False, streamer=streamer,
                                               stopping_criteria=[StopAfter()])
    assert out.shape[1] == 9 and streamer.chunks[-1] == "end" and len(streamer.chunks) == 1 + 4 + 1


def test_bad_input():
    model = adapted("llama")
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="alpha must lie in"):
        SteeredModel(model, mu=1.0, alpha=2.0)
    with pytest.raises(ValueError, match="mu must be finite"):
        SteeredModel(model, mu=float("nan"))
    with pytest.raises(ValueError, match="no PEFT adapter named 'other'"):
        SteeredModel(model, mu=1.0, adapter_name="other")
    with pytest.raises(ValueError, match="no one-forward path: no one-forward route takes HRA adapters"):
        SteeredModel(get_peft_model(tiny_model("llama"), HRAConfig(r=2, target_modules=["q_proj"])), mu=1.0,
                     one_forward=True)
    tok.padding_side = "right"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="left padding"):
        SteeredModel(model, mu=1.0).generate(**batch, max_new_tokens=2)


def test_tokenizer_without_pad_token_gets_eos_with_one_warning():
    model = adapted("llama")
    tok = char_tokenizer(pad=False)
    steered = SteeredModel(model, mu=1.0)
    with pytest.warns(UserWarning, match="no pad token"):
        total, mean = steered.score_choices(tok, ["Q: 1+1="], [["2", "3 or 4"]])
    assert tok.pad_token == tok.eos_token
    assert total.shape == (1, 2) and torch.isfinite(total).all()


def test_tied_embeddings():
    model = get_peft_model(tiny_model("llama", tie=True), adapter_config("lora", "llama")).eval()
    batch = left_padded(char_tokenizer(), PROMPTS)
    out = SteeredModel(model, mu=2.0, alpha=0.2).generate(**batch, max_new_tokens=5, do_sample=False)
    expected = reference_greedy(model, batch["input_ids"], batch["attention_mask"], 2.0, 0.2, float("-inf"), 5)
    assert out.tolist() == expected.tolist()


def test_score_choices_matches_reference_log_likelihood():
    model = adapted("llama")
    tok = char_tokenizer()
    steered = SteeredModel(model, mu=2.0, alpha=0.1)
    prompts, choices = ["Q: sky? A:", "Q: 2+2? A:"], [[" blue", " green"], [" 4", " 5", " four"]]
    total, mean = steered.score_choices(tok, prompts, choices)
    for i, (prompt, options) in enumerate(zip(prompts, choices)):
        for j, option in enumerate(options):
            p_ids = tok(prompt)["input_ids"]
            ids = torch.tensor([p_ids + tok(option, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                z_a = model(input_ids=ids).logits
                with model.disable_adapter():
                    z_b = model(input_ids=ids).logits
            lp = reference.steer_logits(z_a, z_b, 2.0, 0.1, "keep").log_softmax(-1)[0]
            picked = lp[len(p_ids) - 1 : -1].gather(-1, ids[0, len(p_ids):, None]).squeeze(-1)
            assert total[i, j].item() == pytest.approx(picked.sum().item(), rel=1e-4, abs=1e-4)
            assert mean[i, j].item() == pytest.approx(picked.mean().item(), rel=1e-4, abs=1e-4)
    assert torch.isnan(total[0, 2])


def test_adapter_that_resized_the_vocabulary_is_refused():
    base = tiny_model("llama")
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    model = get_peft_model(base, config).eval()
    wrapper = model.base_model.model.lm_head  # PEFT's ModulesToSaveWrapper: the adapter's own copy
    old = wrapper.modules_to_save["default"]
    wrapper.modules_to_save["default"] = torch.nn.Linear(old.in_features, old.out_features + 5, bias=False)
    batch = char_tokenizer()(["abc"], return_tensors="pt")
    with pytest.raises(ValueError, match="adapter changes the vocabulary"):
        SteeredModel(model, mu=1.0, one_forward=False).generate(**batch, max_new_tokens=2)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_cpu_decode_steps_use_the_small_batch_kernel(method, monkeypatch):
    """Decode steps (2B <= 16 rows) run the frozen linears through the kernel, prefill does not; the
    switch turns it off; scores agree with the stock path and greedy tokens are identical."""
    import svd_fast.decoding.cpu_linear as cpu_decode

    model = adapted("llama", method)
    tok = char_tokenizer()
    batch = left_padded(tok, PROMPTS)
    rows_seen = []
    real = cpu_decode._small_batch_forward

    def counting(linear, stock_forward, max_rows):
        kernel_forward = real(linear, stock_forward, max_rows)

        def forward(x):
            rows_seen.append(x.numel() // x.shape[-1])
            return kernel_forward(x)
        return forward

    monkeypatch.setattr(cpu_decode, "_small_batch_forward", counting)
    settings = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with_kernel = SteeredModel(model, mu=4.0, alpha=0.3).generate(**batch, **settings)  # on by default
    decode_rows = [r for r in rows_seen if r <= 16]
    assert decode_rows and max(rows_seen) > 16  # decode steps hit the kernel path, prefill the stock one
    rows_seen.clear()
    stock = SteeredModel(model, mu=4.0, alpha=0.3, cpu_linear_kernel=False).generate(**batch, **settings)
    assert not rows_seen
    assert with_kernel.sequences.tolist() == stock.sequences.tolist()
    for a, b in zip(with_kernel.scores, stock.scores):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite)
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=1e-4)
    # the layers are back as they were
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_inputs_on_another_device_or_dtype_are_one_clear_error():
    steered = SteeredModel(adapted("llama", "lora"), mu=1.0)
    batch = left_padded(char_tokenizer(), PROMPTS)
    with pytest.raises(ValueError, match="input_ids is on meta but the model on cpu: move the inputs"):
        steered.logits_pair(batch["input_ids"].to("meta"), batch["attention_mask"])
    embeds = steered.model.get_base_model().get_input_embeddings()(batch["input_ids"]).double()
    with pytest.raises(ValueError, match="inputs_embeds are torch.float64 but the model's weights torch.float32"):
        steered.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=2)


def test_device_and_dtype_names():
    from svd_fast.evaluation import models

    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert models.resolve_dtype("auto", "cpu") == torch.float32 and models.resolve_dtype("float16") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.resolve_dtype("fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            models.resolve_device("cuda:0")
