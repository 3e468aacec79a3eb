"""Steered decoding for HuggingFace + PEFT models (SPEC 3 and 6).

Every step needs the adapted and the base model's logits on the same context. Both come from ONE
batched forward of 2B rows, each row once with the adapter and once without, with one KV cache of 2B
rows: LoRA linear layers that add their update to the adapter rows only (PEFT's mixed-adapter batches
for other LoRA layers and variants), per-row scaling hooks for IA3, and
virtual tokens on the adapter rows only for prompt and prefix tuning. Modules the adapter trains
outside its tuner layers (`modules_to_save`, `trainable_token_indices`) run the adapter's copy on the
adapter rows and the original module on the base rows. Anything else (or one_forward=False) takes two
forwards, the base one under `disable_adapter()` with those modules' originals.

HuggingFace `generate` drives the decoding: `SteeredModel.generate` hands it a thin causal-LM whose
forward returns steered logits, so greedy, sampling, beam search, logits processors, stopping criteria
and streamers all work as usual.
"""
import contextlib
import copy
import inspect
import warnings

import torch
import torch.nn.functional as F
from transformers import Cache, DynamicCache, GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList, \
    PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import ops
from .examples import collate, ensure_pad_token
from .patching import replaced_forwards

# PEFT tuners whose layers take `adapter_names` for mixed batches, with "__base__" meaning no adapter
# (PEFT's LoHa and LoKr layers ignore adapter_names: they would steer the base rows too).
MIXED_BATCH_TUNERS = ("LORA",)
PROMPT_LEARNING_TUNERS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING")
VIRTUAL_TOKEN_TUNERS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
BASE_ADAPTER = "__base__"


def _peft_type(peft_model, adapter):
    config = getattr(peft_model, "peft_config", {}).get(adapter)
    if config is None:
        raise ValueError(f"the model has no PEFT adapter named {adapter!r}: pass a peft.PeftModel "
                         "(e.g. from svd_fast.warm_start or PeftModel.from_pretrained)")
    return str(getattr(config.peft_type, "value", config.peft_type)).upper(), config


def _cache_kwarg(model):
    """transformers >= 5.x calls the KV cache `cache`, earlier versions `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _positions(attention_mask):
    """Position ids of left-padded rows, as HF generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _PairedCache(DynamicCache):
    """The KV cache of a 2B-row batch: rows [0, n) adapted, [n, 2n) base. Beam search reorders both.

    With prompt or prefix tuning its first `virtual_tokens` positions hold the virtual tokens (masked out
    for the base rows). HF generate reads get_seq_length() as the number of tokens of the sequence it
    holds (to continue from a returned cache), the model's own forward as the number of positions stored
    (masks, query offsets): it counts the real tokens only, except inside `model_forward()`."""

    virtual_tokens = 0
    route = None  # the SteeredModel route that filled it
    _in_model_forward = False

    def get_seq_length(self, *args, **kwargs):
        stored = super().get_seq_length(*args, **kwargs)
        return stored if self._in_model_forward else max(0, stored - self.virtual_tokens)

    def stored_length(self):
        return super().get_seq_length()

    @contextlib.contextmanager
    def model_forward(self):
        self._in_model_forward = True
        try:
            yield
        finally:
            self._in_model_forward = False

    def reorder_cache(self, beam_idx):
        """beam_idx picks adapted rows; the base rows follow. It may also grow the batch (one prompt's cache
        shared by several continuations)."""
        filled = [layer.keys for layer in self.layers if getattr(layer, "keys", None) is not None]
        half = filled[0].shape[0] // 2 if filled else beam_idx.numel()
        super().reorder_cache(torch.cat([beam_idx, beam_idx + half]))


class _TwoCaches(DynamicCache):
    """Separate KV caches for the adapted and the base forward."""

    route = "two"

    def __init__(self):
        super().__init__()
        self.adapted, self.base = DynamicCache(), DynamicCache()

    def get_seq_length(self, *args, **kwargs):
        return self.adapted.get_seq_length(*args, **kwargs)

    @property
    def is_linear(self):  # read by HF generate (>= 5) to decide how much of a continued prompt is cached
        return self.adapted.is_linear

    def reorder_cache(self, beam_idx):
        self.adapted.reorder_cache(beam_idx)
        self.base.reorder_cache(beam_idx)


class _AdapterRows:
    """The adapter rows of one forward of 2n sequences of `width` positions, as a layer sees them: the first
    n of its input's first dimension when that is the batch, the first n * width when the batch and the
    positions are flattened into it (batch-major, as a mixture-of-experts gate sees them). Any other input
    (the tokens a MoE expert was routed) mixes adapter and base rows: refused, never split wrongly."""

    def __init__(self, n=0, width=1):
        self.n, self.width = n, width

    def of(self, x, layer):
        if x.shape[0] == 2 * self.n:
            return self.n
        if x.dim() == 2 and x.shape[0] == 2 * self.n * self.width:
            return self.n * self.width
        raise RuntimeError(f"svd_fast: {type(layer).__name__} got an input of shape {tuple(x.shape)}, whose rows are not "
                           f"the {2 * self.n} sequences of the batch (a mixture-of-experts layer routes tokens to it): "
                           "its adapter cannot run on the adapter rows alone; use SteeredModel(..., one_forward=False)")


class _PerRowSplit:
    """What the per-row adapter paths share: the adapter rows of the forward running now (`rows`), set by
    `adapter_rows(n, width)` around it, and the module forwards it replaces for that time."""

    rows = _AdapterRows()
    forwards = ()

    @contextlib.contextmanager
    def adapter_rows(self, n, width=1):
        previous, self.rows = self.rows, _AdapterRows(n, width)
        try:
            with self._installed():
                yield
        finally:
            self.rows = previous

    def _installed(self):
        return replaced_forwards(self.forwards)


class _PerRowIA3(_PerRowSplit):
    """IA3 on the adapter rows of a batch only. Inside `adapter_rows(n, width)` the IA3 layers run as their
    base layer (adapters disabled) and hooks apply each layer's learned scaling to the adapter rows, exactly
    as IA3's own forward does: to the input of feed-forward layers, to the output of the others."""

    def __init__(self, peft_model, adapter):
        from peft.tuners.ia3.layer import IA3Layer, Linear

        self.layers = [m for m in peft_model.modules() if isinstance(m, IA3Layer)]
        self.adapter = adapter
        self.supported = bool(self.layers) and all(
            isinstance(m, Linear) and not m.merged and adapter in m.ia3_l for m in self.layers)

    @contextlib.contextmanager
    def _installed(self):
        def scale_input(module, args, kwargs):
            x, scale = args[0], module.ia3_l[self.adapter]
            n = self.rows.of(x, module)
            scaled = (x[:n].to(scale.dtype) * scale.flatten()).to(x.dtype)
            return (torch.cat([scaled, x[n:]]), *args[1:]), kwargs

        def scale_output(module, args, result):
            scale, n = module.ia3_l[self.adapter], self.rows.of(args[0], module)
            return torch.cat([(result[:n] * scale.flatten()).to(result.dtype), result[n:]])

        handles, disabled = [], [m._disable_adapters for m in self.layers]
        try:
            for m in self.layers:
                m._disable_adapters = True
                handles.append(m.register_forward_pre_hook(scale_input, with_kwargs=True) if m.is_feedforward
                               else m.register_forward_hook(scale_output))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for m, flag in zip(self.layers, disabled):
                m._disable_adapters = flag


class _PerRowLoRA(_PerRowSplit):
    """Plain LoRA on the adapter rows of a batch only: inside `adapter_rows(n, width)` each LoRA linear layer
    returns base(x) + B(A(dropout(x))) * scaling on the adapter rows and base(x) on the others, as PEFT's
    mixed-adapter batch does, without its per-forward hook registration over every module and its
    index gathers (the adapter rows are a slice)."""

    def __init__(self, peft_model, adapter):
        from peft.tuners.lora.layer import Linear, LoraLayer

        layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        self.supported = bool(layers) and all(
            type(m) is Linear and not m.merged and adapter in m.lora_A and adapter not in m.lora_variant
            for m in layers)
        self.forwards = [(m, self._row_forward(m, adapter)) for m in layers] if self.supported else []

    def _row_forward(self, layer, adapter):
        lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
        dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]

        def forward(x, *args, **kwargs):
            result = layer.base_layer(x, *args, **kwargs)
            if layer.disable_adapters:
                return result
            if layer.merged:
                raise RuntimeError("the LoRA adapter was merged into the weights after SteeredModel was built; the base "
                                   "rows need the plain weights: call model.unmerge_adapter() before steering")
            n = self.rows.of(x, layer)
            a, b = lora_A.weight, lora_B.weight
            if (lora_B.bias is None and result.is_contiguous() and result.dtype == a.dtype == b.dtype
                    and not torch.is_grad_enabled()):
                # the adapter rows are the first ones of the flattened activations
                rows = n * (x.numel() // max(1, x.shape[0] * x.shape[-1]))
                h = dropout(x.reshape(-1, x.shape[-1])[:rows].to(a.dtype))
                result.view(-1, result.shape[-1])[:rows].addmm_(F.linear(h, a), b.t(), alpha=scaling)
                return result
            update = lora_B(lora_A(dropout(x[:n].to(a.dtype)))) * scaling
            result[:n] += update.to(result.dtype)
            return result

        return forward


def _auxiliary_wrapper_types():
    """PEFT's wrappers of modules an adapter trains outside its tuner layers: `modules_to_save` and
    `trainable_token_indices` (AuxiliaryTrainingWrapper since peft 0.15)."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper

        return (AuxiliaryTrainingWrapper,)
    except ImportError:  # pragma: no cover - older peft
        from peft.utils.other import ModulesToSaveWrapper

        return (ModulesToSaveWrapper,)


def _splits_per_row(module):
    """Whether a module maps each row of its input (dim 0) to the same row of one output tensor, with no
    state across rows: linear, embedding and norm layers (a decoder block holds the KV cache of every row,
    a MoE router returns a tuple)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, Conv1D)):
        return True
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and not any(True for _ in module.children())


class _PerRowAuxiliaryModules(_PerRowSplit):
    """Modules the adapter trains outside its tuner layers (`modules_to_save` copies, `trainable_token_indices`
    embeddings) on the adapter rows only: inside `adapter_rows(n, width)` each runs the adapter's own copy on
    the adapter rows, through PEFT's per-adapter forward, and the original module on the other rows (n = 0:
    the base model on every row). Only modules whose rows are independent can be split so
    (`_splits_per_row`); `unsplittable` names the others."""

    def __init__(self, peft_model, adapter):
        wrappers = [(name, m) for name, m in peft_model.named_modules()
                    if isinstance(m, _auxiliary_wrapper_types()) and adapter in getattr(m, "_adapters", ())]
        self.unsplittable = [name for name, m in wrappers if not _splits_per_row(m.original_module)]
        self.adapter = adapter
        self.forwards = [(m, self._row_forward(m)) for _, m in wrappers]

    def _row_forward(self, wrapper):
        def forward(x, *args, **kwargs):
            kwargs.pop("adapter_names", None)  # PEFT's mixed-batch hook: the split below replaces it
            if self.rows.n == 0 or wrapper.disable_adapters or self.adapter not in wrapper.active_adapters:
                return wrapper.original_module(x, *args, **kwargs)
            n = self.rows.of(x, wrapper.original_module)
            adapted = wrapper._forward_wrapped_mixed_batch(x[:n], self.adapter, *args, **kwargs)
            return torch.cat([adapted, wrapper.original_module(x[n:], *args, **kwargs).to(adapted.dtype)])

        return forward


class SteeredModel:
    """A PEFT model that decodes with steered logits (SPEC 3).

    steered = SteeredModel(peft_model, mu=cal.mu_bar, alpha=0.1)
    out = steered.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=32)
    logits = steered(input_ids, attention_mask=mask)        # steered logits at every position

    Both distributions come from one forward of 2B rows wherever the PEFT method allows (see `mode`);
    one_forward=False forces two forwards (the base one under disable_adapter()).
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
        self.prompt_learning = self.peft_type in PROMPT_LEARNING_TUNERS
        self._aux = _PerRowAuxiliaryModules(peft_model, adapter)
        self._ia3 = _PerRowIA3(peft_model, adapter) if self.peft_type == "IA3" else None
        self._lora = _PerRowLoRA(peft_model, adapter) if self.peft_type == "LORA" else None
        self.two_forward_reason = None
        if self._aux.unsplittable:
            one_route = None
            self.two_forward_reason = (f"{', '.join(self._aux.unsplittable)} (trained by the adapter outside its "
                                       "tuner layers) cannot run per row")
        elif self._lora is not None and self._lora.supported:
            one_route = "lora"
        elif self.peft_type in MIXED_BATCH_TUNERS and not getattr(self.peft_config, "use_dora", False):
            one_route = "mixed"
        elif self._ia3 is not None and self._ia3.supported:
            one_route = "ia3"
        elif self.peft_type in VIRTUAL_TOKEN_TUNERS:
            one_route = "virtual"
        else:
            one_route = None
            self.two_forward_reason = (f"PEFT has no mixed-adapter batches for {self.peft_type} adapters"
                                       + (" with DoRA" if getattr(self.peft_config, "use_dora", False) else ""))
        if one_forward is True and one_route is None:
            raise ValueError(f"this adapter has no one-forward path: {self.two_forward_reason}; use one_forward=False")
        self.route = one_route if one_forward in ("auto", True) and one_route else "two"
        self._cache_kwarg = _cache_kwarg(peft_model.get_base_model())
        self._lm = None
        self.cpu_linear_kernel = bool(cpu_linear_kernel)

    @property
    def mode(self):
        """How the two distributions are computed."""
        return {"lora": "one-forward (LoRA on adapter rows)", "mixed": "one-forward (mixed-adapter batch)",
                "ia3": "one-forward (per-row IA3)", "virtual": "one-forward (virtual tokens on adapter rows)"}.get(
            self.route, "two-forward (no cache)" if self.prompt_learning else "two-forward")

    # ---------------------------------------------------------------------------------------------
    # Both models' logits.

    def logits_pair(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=None,
                    inputs_embeds=None):
        """(z_adapted, z_base, cache): both models' logits on the same context, [B, T, V] each.

        input_ids [B, T] (or inputs_embeds [B, T, H] instead, as HF models take them); attention_mask covers
        the cached tokens and the new ones (None: no padding); position_ids are the base rows' (default: from
        the attention mask, as HF generate computes them)."""
        extra = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        n, length = tokens.shape[:2]
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(n, past + length, dtype=torch.long, device=tokens.device)
        if position_ids is None:
            position_ids = _positions(attention_mask)[:, -length:]
        inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        if self.route == "virtual":
            return self._virtual_token_pair(input_ids, inputs_embeds, attention_mask, cache, extra)
        if self.route == "two" and self.prompt_learning:  # PEFT adds the virtual tokens on full forwards only
            z_a = self.model(**inputs, attention_mask=attention_mask, **extra).logits
            with self._as_base_model():
                z_b = self.model(**inputs, attention_mask=attention_mask, position_ids=position_ids, **extra).logits
            return z_a[:, -z_b.shape[1]:], z_b, None
        if self.route in ("lora", "mixed", "ia3"):
            if cache is None:
                cache = _PairedCache()
                cache.route = self.route
            kwargs = dict(**{k: torch.cat([v, v]) for k, v in inputs.items()},
                          attention_mask=torch.cat([attention_mask] * 2),
                          position_ids=torch.cat([position_ids, position_ids]), use_cache=True,
                          **{self._cache_kwarg: cache}, **extra)
            with self._aux.adapter_rows(n, length):
                if self.route == "mixed":
                    logits = self.model(**kwargs, adapter_names=[self.adapter] * n + [BASE_ADAPTER] * n).logits
                else:
                    with (self._lora if self.route == "lora" else self._ia3).adapter_rows(n, length):
                        logits = self.model(**kwargs).logits
            return logits[:n], logits[n:], cache
        if cache is None:
            cache = _TwoCaches()
        kwargs = dict(**inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra)
        z_a = self.model(**kwargs, **{self._cache_kwarg: cache.adapted}).logits
        with self._as_base_model():
            z_b = self.model(**kwargs, **{self._cache_kwarg: cache.base}).logits
        return z_a, z_b, cache

    @contextlib.contextmanager
    def _as_base_model(self):
        """The PEFT model as its base model: adapters disabled, and the original of every module the adapter
        trains outside its tuner layers (PEFT's disable_adapter leaves those active for prompt learning)."""
        with self.model.disable_adapter(), self._aux.adapter_rows(0):
            yield

    def _virtual_token_pair(self, input_ids, inputs_embeds, attention_mask, cache, extra):
        """Prompt tuning / P-tuning / prefix tuning in one forward of 2B rows. The adapter rows carry the
        virtual tokens (prompt embeddings, or the prefix keys and values) as PEFT's forward does, with
        PEFT's positions (counted from the first virtual token). The base rows carry the same number of
        masked-out positions, so their real tokens see exactly what the plain base model would."""
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        n, length = tokens.shape[:2]
        virtual = self.peft_config.num_virtual_tokens
        base = self.model.get_base_model()
        # PEFT's prompt-learning forward embeds the real tokens with the embedding it found at wrapping time,
        # `word_embeddings`, which is the original even where modules_to_save holds a trained copy.
        embed = getattr(self.model, "word_embeddings", None) or base.get_input_embeddings()
        embeds = embed(input_ids) if inputs_embeds is None else inputs_embeds
        embeds = torch.cat([embeds, embeds])
        if cache is None:
            if self.peft_type == "PREFIX_TUNING":
                cache = self.model.get_prompt(batch_size=2 * n)  # a DynamicCache holding the prefix
                cache.__class__ = _PairedCache
            else:
                prompts = self.model.get_prompt(batch_size=n).to(embeds.dtype)
                embeds = torch.cat([torch.cat([prompts, embeds[:n]], 1), torch.cat([torch.zeros_like(prompts),
                                                                                      embeds[n:]], 1)])
                cache = _PairedCache()
            cache.virtual_tokens, cache.route = virtual, self.route
        ones = torch.ones(n, virtual, dtype=attention_mask.dtype, device=attention_mask.device)
        mask_adapted = torch.cat([ones, attention_mask], 1)
        mask_base = torch.cat([torch.zeros_like(ones), attention_mask], 1)
        width = embeds.shape[1]
        past = cache.stored_length()
        positions_adapted = torch.arange(past, past + width, device=tokens.device).expand(n, -1)
        positions_base = _positions(mask_base)[:, -width:]
        with self._aux.adapter_rows(n, width), cache.model_forward():
            out = base(inputs_embeds=embeds, attention_mask=torch.cat([mask_adapted, mask_base]),
                       position_ids=torch.cat([positions_adapted, positions_base]), use_cache=True,
                       **{self._cache_kwarg: cache}, **extra)
        logits = out.logits[:, -length:]
        return logits[:n], logits[n:], cache

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
        no_cache_route = self.route == "two" and self.prompt_learning
        if inputs_embeds is not None and no_cache_route:
            raise ValueError(f"inputs_embeds needs a KV cache, and this route ({self.mode}) keeps none: PEFT adds "
                             f"{self.peft_type} virtual tokens on full forwards only; pass input_ids instead")
        for key in ("past_key_values", "cache"):
            if kwargs.get(key) is not None:
                self._check_cache(kwargs[key], kwargs.get("use_cache", True))
        if self._lm is None:
            self._lm = _SteeredCausalLM(self)
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
        if isinstance(cache, Cache) and not isinstance(cache, (_PairedCache, _TwoCaches)) and cache.get_seq_length() == 0:
            return  # an empty cache: nothing to continue from
        if self.route == "two" and self.prompt_learning:
            raise ValueError(f"this route ({self.mode}) keeps no KV cache, so it cannot continue from one: pass the "
                             "whole sequence as input_ids without past_key_values")
        if not use_cache:
            raise ValueError("past_key_values to continue from, but use_cache=False: drop use_cache=False, or pass the "
                             "whole sequence without past_key_values")
        if not isinstance(cache, (_PairedCache, _TwoCaches)):
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
        from .cpu_decode import small_batch_linears

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


class _SteeredCausalLM(PreTrainedModel, GenerationMixin):
    """What HF `generate` drives: a causal LM whose logits are the steered ones."""

    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, steered):
        base = steered.model.get_base_model()
        super().__init__(copy.deepcopy(base.config))
        self.steered = steered
        self.inner = steered.model  # registered, so .device and .dtype follow the real weights
        self.generation_config = copy.deepcopy(base.generation_config)
        self.last_adapted_logits = None  # z_a at the last position of the last step, for _EmptyKeepSetFallback

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=True, logits_to_keep=None, inputs_embeds=None, **_):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            self.steered._check_cache(cache, use_cache)
        if not use_cache or not isinstance(cache, (_PairedCache, _TwoCaches)):
            cache = None  # generate's own empty cache (or none wanted): ours replaces it
        z_a, z_b, cache = self.steered.logits_pair(input_ids, attention_mask, position_ids, cache, logits_to_keep,
                                                   inputs_embeds)
        self.last_adapted_logits = z_a[:, -1]
        output = CausalLMOutputWithPast(logits=self.steered.steer(z_a, z_b))
        if use_cache:
            output["past_key_values"] = cache
        return output

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache

    def _get_logits_processor(self, *args, **kwargs):
        # HF's private builder of a generate call's processors (same signature in transformers 4.56 to 5.24,
        # tested in CI on both): wrapped to give rows whose keep set the processors empty a fallback.
        processors = super()._get_logits_processor(*args, **kwargs)
        config = kwargs.get("generation_config", args[0] if args else None)
        beams = isinstance(config, GenerationConfig) and (config.num_beams or 1) > 1
        return _EmptyKeepSetFallback(processors, self, log_probs=beams)


class _EmptyKeepSetFallback(LogitsProcessorList):
    """HF's logits processors for a steered generate call, with a fallback for rows they leave no token in.

    Under fill=-inf only the keep set is finite; a processor that runs after steering (min_new_tokens
    banning EOS, suppress_tokens, bad_words_ids, ...) can remove all of it. Such a row then takes, at that
    step, the adapter's own distribution through the same processors (log-probabilities under beam search,
    which scores log-probabilities), with one warning per generate call. The processors then run twice at
    that step (a stateful one advances twice). Greedy, sampling and beam search; modes that score other
    rows than the last forward's (assisted decoding, transformers 4.x group beam search) get no fallback."""

    def __init__(self, processors, lm, log_probs):
        super().__init__(processors)
        self.lm, self.log_probs, self.warned = lm, log_probs, False

    def __call__(self, input_ids, scores, **kwargs):
        adapted = self.lm.last_adapted_logits  # before the processors: one of them may run the model again
        processed = super().__call__(input_ids, scores, **kwargs)
        if adapted is None or adapted.shape != scores.shape or self.lm.steered.fill != float("-inf"):
            return processed
        emptied = (processed == float("-inf")).all(-1) & ~(scores == float("-inf")).all(-1)
        if not bool(emptied.any()):
            return processed
        fallback = adapted.to(scores.dtype)
        fallback = super().__call__(input_ids, fallback.log_softmax(-1) if self.log_probs else fallback, **kwargs)
        if not self.warned:
            self.warned = True
            warnings.warn(f"svd_fast: logits processors applied after steering removed every token of the keep set "
                          f"(fill=-inf) in {int(emptied.sum())} row(s) at step {input_ids.shape[1]}, e.g. min_new_tokens "
                          "banning EOS or suppress_tokens; those rows take the adapter's own (unsteered) distribution "
                          "at such steps. fill='keep' keeps the masked tokens available instead.", UserWarning,
                          stacklevel=2)
        return torch.where(emptied[:, None], fallback, processed)


class SteeringLogitsProcessor(LogitsProcessor):
    """Steering as a `LogitsProcessor`, for users who keep calling HF generate on their adapted model.

    adapted.generate(**inputs, logits_processor=[SteeringLogitsProcessor(base_model, mu, alpha,
                                                                         attention_mask=inputs["attention_mask"])])

    base_model: the PeftModel itself (its base is then run under disable_adapter(), with the original of
    every module the adapter trains outside its tuner layers), or an untouched base model. Not the model
    get_peft_model was given: PEFT injects the adapter's layers into it in place, so it is no longer the
    base (refused with an error).
    A logits processor does not see the attention mask: for a padded batch pass the prompt's
    `attention_mask=`; a prompt holding the pad token without it is refused, since the base model would
    read the padding as text (also where the pad token is EOS or BOS: pass the mask then too). With a mask,
    the processor is bound to the prompt batch of its first generate call (the mask's masked positions
    must hold the pad token where it is known); a later call with another prompt batch is refused: give
    each batch its own processor.
    Each step reruns the base model on the whole sequence, without a cache: a full extra forward per
    step, much slower than SteeredModel. Processors listed after this one can empty the keep set under
    fill=-inf (SteeredModel.generate falls back in that case; this processor cannot see them).
    """

    def __init__(self, base_model, mu, alpha=0.1, fill=float("-inf"), attention_mask=None, pad_token_id=None):
        ops._check_alpha(alpha)
        ops._fill_args(fill)
        if not isinstance(mu, torch.Tensor):
            ops._check_mu_value(mu)
        self._aux = None
        if hasattr(base_model, "peft_config") and hasattr(base_model, "disable_adapter"):
            self._aux = _PerRowAuxiliaryModules(base_model, base_model.active_adapter)
        elif _holds_adapter_layers(base_model):
            raise ValueError("base_model holds PEFT adapter layers: get_peft_model injects them into the model it is "
                             "given, in place, so that model now computes the adapted logits, not the base ones. Pass "
                             "the PeftModel itself (its adapters are disabled for the base forward) or a base model "
                             "loaded separately")
        self.base_model, self.mu, self.alpha, self.fill = base_model, mu, alpha, fill
        self.prompt_mask = attention_mask
        config = getattr(base_model, "generation_config", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        self._prompt = None  # the prompt batch of the current generate call (every later step extends it)
        self._bound_prompt = None  # with a mask: the (one row per prompt) batch that mask belongs to

    def _mask(self, input_ids):
        prompt = self._prompt
        if (prompt is None or input_ids.shape[0] != prompt.shape[0] or input_ids.shape[1] <= prompt.shape[1]
                or not torch.equal(input_ids[:, : prompt.shape[1]], prompt)):  # a new generate call
            self._check_prompt(input_ids)
            self._prompt = input_ids.clone()
        mask = torch.ones_like(input_ids)
        if self.prompt_mask is not None:
            prompt_mask = self.prompt_mask.to(input_ids.device)
            mask[:, : prompt_mask.shape[1]] = prompt_mask.repeat_interleave(input_ids.shape[0] // prompt_mask.shape[0], 0)
        return mask

    def _check_prompt(self, input_ids):
        """At the first step of a generate call, input_ids is the prompt batch (one row per beam or sample)."""
        if self.prompt_mask is None:
            pad = self.pad_token_id
            fix = "pass SteeringLogitsProcessor(..., attention_mask=inputs['attention_mask'])"
            if pad is not None and bool((input_ids == pad).any()):
                raise ValueError(f"the prompt holds the pad token (id {pad}) but SteeringLogitsProcessor got no "
                                 f"attention_mask: the base model would read the padding as text; {fix}")
            if pad is None and not bool((input_ids == input_ids[:1]).all()):
                raise ValueError(f"a batch of {input_ids.shape[0]} different prompts and no attention_mask: a logits "
                                 "processor cannot see whether they are padded (the base model has no pad_token_id "
                                 f"either), and would read padding as text; {fix}, or pad_token_id=")
            return
        rows, width = self.prompt_mask.shape
        fix = "give each prompt batch its own SteeringLogitsProcessor with that batch's attention_mask"
        if width != input_ids.shape[1] or input_ids.shape[0] % rows:
            raise ValueError(f"attention_mask is {rows} x {width} but this generate call's prompt is "
                             f"{input_ids.shape[0]} x {input_ids.shape[1]} (rows may repeat per beam or sample): {fix}")
        prompts = input_ids[:: input_ids.shape[0] // rows]  # beams and samples of a prompt are adjacent rows
        if self._bound_prompt is None:
            masked = self.prompt_mask.to(input_ids.device) == 0
            if self.pad_token_id is not None and not bool((prompts[masked] == self.pad_token_id).all()):
                raise ValueError(f"attention_mask masks tokens that are not the pad token (id {self.pad_token_id}): it "
                                 f"belongs to another prompt batch; {fix}")
            self._bound_prompt = prompts.clone()
        elif not torch.equal(prompts, self._bound_prompt.to(prompts.device)):
            raise ValueError(f"this SteeringLogitsProcessor's attention_mask belongs to the prompt batch of its first "
                             f"generate call, not this one; {fix}")

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        mask = self._mask(input_ids)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask))
        if self._aux is not None:
            with self.base_model.disable_adapter(), self._aux.adapter_rows(0):
                z_base = self.base_model(**kwargs).logits[:, -1]
        else:
            z_base = self.base_model(**kwargs).logits[:, -1]
        if z_base.shape[-1] != scores.shape[-1]:
            raise ValueError(f"base_model has a vocabulary of {z_base.shape[-1]} tokens but the generating model "
                             f"{scores.shape[-1]}: pass the base model of the adapted model that generates")
        return ops.steer_logits(scores, z_base.to(scores.dtype), self.mu, self.alpha, self.fill)


def _holds_adapter_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, (BaseTunerLayer, *_auxiliary_wrapper_types())) for m in model.modules())
