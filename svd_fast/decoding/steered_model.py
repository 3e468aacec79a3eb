"""SteeredModel: a PEFT model that decodes with steered logits (SPEC 3 and 6).

Every step needs the adapted and the base model's logits on the same context. A route (`routes/`) gets
both, in one forward of 2B rows wherever the PEFT method allows, else in two; modules the adapter trains
outside its tuner layers (`modules_to_save`, `trainable_token_indices`) run the adapter's copy on the
adapter rows and the original module on the base rows in every route (`row_split.py`).

HuggingFace `generate` drives the decoding (`hf_generate.py`): greedy, sampling, beam search, logits
processors, stopping criteria and streamers all work as usual.
"""
import contextlib
import warnings

import torch
from transformers import Cache

from .. import ops
from . import routes
from .batching import collate, ensure_pad_token, positions_from_mask
from .caches import STEERED_CACHES, PairedStaticCache, cache_kwarg
from .row_split import AuxiliaryModuleRows
from .routes.base import Step


def _peft_type(peft_model, adapter):
    config = getattr(peft_model, "peft_config", {}).get(adapter)
    if config is None:
        raise ValueError(f"the model has no PEFT adapter named {adapter!r}: pass a peft.PeftModel "
                         "(e.g. from svd_fast.warm_start or PeftModel.from_pretrained)")
    return str(getattr(config.peft_type, "value", config.peft_type)).upper(), config


class SteeredModel:
    """A PEFT model that decodes with steered logits (SPEC 3).

    steered = SteeredModel(peft_model, mu=cal.mu_bar, alpha=0.1)
    out = steered.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=32)
    logits = steered(input_ids, attention_mask=mask)        # steered logits at every position

    Both distributions come from one forward of 2B rows wherever the PEFT method allows (see `mode`, and
    `two_forward_reason` where it does not); one_forward=False forces two forwards (the base one under
    disable_adapter()), one_forward=True refuses them.
    Base rows behave as the plain base model on left-padded input (positions from the attention mask),
    also where the adapter trains whole modules (`modules_to_save`) or token embeddings
    (`trainable_token_indices`): the base rows run the original modules; adapter rows as the PEFT model's
    own forward. On the CPU, generate runs the frozen linear layers of decode steps through the
    small-batch kernel (`svd_fast.cpu_decode`); cpu_linear_kernel=False turns that off.

    fill=-inf (the default) leaves only the keep set finite. When a logits processor that runs after the
    steering (min_new_tokens banning EOS, suppress_tokens, bad_words_ids, ...) removes every kept token of a
    row, generate falls back, for that row and step, to the adapter's own distribution (unsteered, with the
    same processors applied) and warns once per call; fill="keep" never meets this.
    """

    def __init__(self, peft_model, mu, alpha=0.1, fill=float("-inf"), adapter_name=None, one_forward="auto",
                 cpu_linear_kernel=True):
        adapter = adapter_name or getattr(peft_model, "active_adapter", None)
        if not isinstance(adapter, str):
            raise ValueError("pass adapter_name=...: the model has no single active PEFT adapter")
        self.peft_type, self.peft_config = _peft_type(peft_model, adapter)
        # Checked here, once, so a bad setting fails before any forward.
        ops._check_alpha(alpha)
        ops._fill_args(fill)
        if not isinstance(mu, torch.Tensor):
            ops._check_mu_value(mu)
        if one_forward not in ("auto", True, False):
            raise ValueError(f"one_forward must be 'auto', True or False, got {one_forward!r}")
        if getattr(self.peft_config, "bias", "none") != "none":
            warnings.warn(f"the adapter's config has bias={self.peft_config.bias!r}: PEFT trains the base model's own "
                          "bias terms in place for it, so the 'base' distribution steered against is no longer the "
                          "pre-trained model's once they are trained; use bias='none' (lora_bias=True trains a bias "
                          "of the adapter's own)", UserWarning, stacklevel=2)
        self.model, self.adapter = peft_model, adapter
        self.mu, self.alpha, self.fill = mu, alpha, fill
        self.cache_kwarg = cache_kwarg(peft_model.get_base_model())
        self.auxiliary = AuxiliaryModuleRows(peft_model, adapter)
        self._route, self.two_forward_reason = routes.choose(self, one_forward)
        self._lm = None
        self.cpu_linear_kernel = bool(cpu_linear_kernel)

    @property
    def mode(self):
        """How the two distributions are computed."""
        return self._route.mode

    @property
    def route(self):
        """The route's name: "lora", "mixed", "ia3", "tuner", "virtual" or "two"."""
        return self._route.name

    # ---------------------------------------------------------------------------------------------
    # Both models' logits.

    def logits_pair(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=None,
                    inputs_embeds=None):
        """(z_adapted, z_base, cache): both models' logits on the same context, [B, T, V] each.

        input_ids [B, T] (or inputs_embeds [B, T, H] instead, as HF models take them); attention_mask covers
        the cached tokens and the new ones (None: no padding); position_ids are the base rows' (default: from
        the attention mask, as HF generate computes them); cache: None at the first step, then the one
        returned (None from a route that keeps none)."""
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        self._check_placement(tokens, attention_mask, inputs_embeds is not None)
        n, length = tokens.shape[:2]
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(n, past + length, dtype=torch.long, device=tokens.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -length:]
        extra = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        return self._route.logits_pair(Step(input_ids, inputs_embeds, attention_mask, position_ids, extra), cache)

    def _check_placement(self, tokens, attention_mask, embeds):
        """Inputs on another device than the model (or embeddings of another dtype): one line, not a stack."""
        base = self.model.get_base_model()
        device = base.device
        for name, tensor in (("inputs_embeds" if embeds else "input_ids", tokens), ("attention_mask", attention_mask)):
            if tensor is not None and tensor.device != device:
                raise ValueError(f"{name} is on {tensor.device} but the model on {device}: move the inputs with "
                                 f".to({str(device)!r}) (e.g. tokenizer(...).to(model.device))")
        if embeds and tokens.dtype != base.dtype:
            raise ValueError(f"inputs_embeds are {tokens.dtype} but the model's weights {base.dtype}: cast them with "
                             f".to({base.dtype})")

    def steer(self, z_adapted, z_base, fill=None):
        """Steered logits; `fill` overrides the model's fill for this call."""
        if z_adapted.shape[-1] != z_base.shape[-1]:
            raise ValueError(f"the adapter changes the vocabulary ({z_adapted.shape[-1]} tokens) from the base model's "
                             f"({z_base.shape[-1]}): steering needs both distributions over the same tokens")
        return ops.steer_logits(z_adapted, z_base, self.mu, self.alpha, self.fill if fill is None else fill)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None):
        """Steered logits at every position of the (right- or left-padded) batch, float32 [B, T, V]."""
        z_a, z_b, _ = self.logits_pair(input_ids, attention_mask)
        return self.steer(z_a, z_b)

    # ---------------------------------------------------------------------------------------------
    # Generation.

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        """HuggingFace `generate` on the steered distribution: same arguments, same outputs.

        Prompts come as input_ids (left-padded, with their attention_mask) or as inputs_embeds (then the
        output holds the new tokens only, as in HF). To continue a generation, pass the `past_key_values`
        this method returned (return_dict_in_generate=True) with the full sequences; a cache from anywhere
        else is refused."""
        inputs_embeds = kwargs.get("inputs_embeds")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("generate needs input_ids (e.g. **tokenizer(prompts, return_tensors='pt', padding=True)) "
                             "or inputs_embeds")
        if attention_mask is not None and attention_mask.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("the batch is right-padded; decoder-only generation needs left padding: "
                             "set tokenizer.padding_side = 'left'")
        no_cache_route = self._route.cache_class is None
        if inputs_embeds is not None and no_cache_route:
            raise ValueError(f"inputs_embeds needs a KV cache, and this route ({self.mode}) keeps none: PEFT adds "
                             f"{self.peft_type} virtual tokens on full forwards only; pass input_ids instead")
        for key in ("past_key_values", "cache"):
            if kwargs.get(key) is not None:
                self._check_cache(kwargs[key], kwargs.get("use_cache", True))
        if self._lm is None:
            from .hf_generate import SteeredCausalLM

            self._lm = SteeredCausalLM(self)
        if no_cache_route:
            kwargs.setdefault("use_cache", False)
        try:
            with self._decode_linears():
                return self._lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._lm.last_adapted_logits = None  # a view of the last step's logits: do not keep them alive

    def _check_cache(self, cache, use_cache=True):
        """A cache handed back to generate must be one this model filled: another cache lacks the base rows
        (or the adapter's), and its length would make HF skip the tokens it claims to hold."""
        if isinstance(cache, Cache) and not isinstance(cache, STEERED_CACHES) and cache.get_seq_length() == 0:
            return  # an empty cache: nothing to continue from
        if isinstance(cache, PairedStaticCache) and cache.route is None:
            return  # the static cache HF generate made for this call (SteeredCausalLM._prepare_static_cache)
        if self._route.cache_class is None:
            raise ValueError(f"this route ({self.mode}) keeps no KV cache, so it cannot continue from one: pass the "
                             "whole sequence as input_ids without past_key_values")
        if not use_cache:
            raise ValueError("past_key_values to continue from, but use_cache=False: drop use_cache=False, or pass the "
                             "whole sequence without past_key_values")
        if not isinstance(cache, STEERED_CACHES):
            raise ValueError(f"past_key_values is a {type(cache).__name__}, not a cache returned by SteeredModel.generate: "
                             "steering needs the adapted and the base model's keys and values; pass the "
                             "past_key_values of an earlier SteeredModel.generate(..., return_dict_in_generate=True) "
                             "call, or none")
        if cache.route != self.route:
            raise ValueError(f"past_key_values was filled by a SteeredModel of another route ({cache.route}); this one "
                             f"is {self.route}: continue with the SteeredModel that returned it")

    def _decode_linears(self):
        """On the CPU, decode steps (few rows) run the frozen linear layers through the small-batch kernel,
        which reads each weight once for all rows; prefill and large batches keep the stock path."""
        if not self.cpu_linear_kernel or self.model.get_base_model().device.type != "cpu":
            return contextlib.nullcontext()
        from .cpu_linear import small_batch_linears

        return small_batch_linears(self.model)

    # ---------------------------------------------------------------------------------------------
    # Multiple choice.

    @torch.no_grad()
    def score_choices(self, tokenizer, prompts, choices, batch_size=8, fill="keep"):
        """Log-likelihood of each choice's tokens after its prompt, under the steered distribution.

        choices[i] is the list of answer strings for prompts[i]. Returns (sum, mean) tensors of shape
        [len(prompts), max number of choices] (NaN where a prompt has fewer choices): the summed and the
        length-normalised log-probability. fill defaults to "keep": with fill=-inf any choice token outside
        the keep set scores -inf, and choices would tie at -inf.
        """
        if len(prompts) != len(choices):
            raise ValueError(f"prompts has {len(prompts)} entries but choices has {len(choices)}")
        ensure_pad_token(tokenizer)
        rows = []  # (prompt index, choice index, ids, first answer position)
        for i, (prompt, options) in enumerate(zip(prompts, choices)):
            if not options:
                raise ValueError(f"choices[{i}] is empty")
            prompt_ids = tokenizer(prompt)["input_ids"]
            for j, option in enumerate(options):
                answer_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
                if not answer_ids:
                    raise ValueError(f"choices[{i}][{j}] = {option!r} tokenizes to nothing")
                rows.append((i, j, prompt_ids + answer_ids, len(prompt_ids)))
        width = max(len(options) for options in choices)
        total = torch.full((len(prompts), width), float("nan"))
        mean = total.clone()
        device = self.model.get_base_model().device
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = collate([seq for _, _, seq, _ in chunk], tokenizer.pad_token_id, "right")
            z_a, z_b, _ = self.logits_pair(ids.to(device), mask.to(device))
            log_probs = self.steer(z_a, z_b, fill).log_softmax(-1).cpu()
            for k, (i, j, seq, first) in enumerate(chunk):
                targets = torch.tensor(seq[first:])
                picked = log_probs[k, first - 1 : len(seq) - 1].gather(-1, targets[:, None]).squeeze(-1)
                total[i, j] = picked.sum()
                mean[i, j] = picked.mean()
        return total, mean
