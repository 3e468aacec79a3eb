"""The interface every route implements, and the forward of 2B rows that the per-row routes share.

A route is one way of getting both distributions of a decoding step, the adapted model's and the base
model's. `SteeredModel` asks each route in turn (routes/__init__.py) whether it takes the PEFT model and
keeps the first that does; a new way is a new file with a subclass of `Route`, listed in
ONE_FORWARD_ROUTES there.
"""
import contextlib
import dataclasses

import torch

from ..caches import PairedCache

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


@dataclasses.dataclass
class Step:
    """One forward's inputs: input_ids [B, T] or inputs_embeds [B, T, H]; attention_mask [B, cached + T];
    position_ids [B, T], the base rows' (from the mask); extra keyword arguments (logits_to_keep)."""

    input_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    extra: dict

    @property
    def tokens(self):
        return self.input_ids if self.inputs_embeds is None else self.inputs_embeds

    @property
    def batch(self):
        return self.tokens.shape[0]

    @property
    def length(self):
        return self.tokens.shape[1]

    def inputs(self, repeat=1):
        """{"input_ids": ...} or {"inputs_embeds": ...}, the batch `repeat` times over."""
        name = "input_ids" if self.inputs_embeds is None else "inputs_embeds"
        return {name: torch.cat([self.tokens] * repeat) if repeat > 1 else self.tokens}


class Route:
    """Both distributions of a step. `name` is stored on the caches the route fills; `mode` is what
    `SteeredModel.mode` says; `cache_class` is the cache it fills (None: it keeps none, every step recomputes
    the sequence); `peft_types` are the PEFT methods it may take (empty: any). `steered` is the
    SteeredModel: the PEFT model, its adapter, type and config (`model`, `adapter`, `peft_type`,
    `peft_config`), the keyword its model takes the KV cache under (`cache_kwarg`) and the per-row runner of
    the adapter's saved modules (`auxiliary`)."""

    name = ""
    mode = ""
    cache_class = None
    static_cache = False  # whether it can fill a PairedStaticCache (HF's static cache and compile path)
    why_not_compiled = None  # why torch.compile cannot trace its forward, if it cannot
    peft_types = ()

    def __init__(self, steered):
        self.steered = steered

    @classmethod
    def why_not(cls, steered):
        """None when the route takes this PEFT model (of one of its peft_types), else why not, in one clause."""
        return None

    def logits_pair(self, step, cache):
        """(z_adapted, z_base, cache) for the step: [B, T, V] logits each; `cache` None at the first step."""
        raise NotImplementedError


class PairedRowsRoute(Route):
    """One forward of 2B rows, the batch twice: rows [0, B) with the adapter, [B, 2B) without, one KV cache.
    A subclass says how its tuner layers run on the adapter rows only: the PerRowSplit that replaces their
    forwards for the length of a forward (`per_row_split`), or extra keyword arguments of the model's
    forward (`forward_kwargs`)."""

    cache_class = PairedCache
    static_cache = True

    def __init__(self, steered):
        super().__init__(steered)
        self.split = self.per_row_split(steered)

    def per_row_split(self, steered):
        return None

    def forward_kwargs(self, n):
        return {}

    def adapter_rows(self, n, width):
        """A context inside which the tuner layers act on the first n (of 2n) sequences of `width` positions."""
        return contextlib.nullcontext() if self.split is None else self.split.adapter_rows(n, width)

    def logits_pair(self, step, cache):
        cache = cache if cache is not None else PairedCache()
        if cache.route is None:
            cache.route = self.name
        n, steered = step.batch, self.steered
        kwargs = dict(**step.inputs(repeat=2), attention_mask=cache.padded(torch.cat([step.attention_mask] * 2)),
                      position_ids=torch.cat([step.position_ids] * 2), use_cache=True,
                      **{steered.cache_kwarg: cache}, **step.extra, **self.forward_kwargs(n))
        with steered.auxiliary.adapter_rows(n, step.length), self.adapter_rows(n, step.length):
            logits = steered.model(**kwargs).logits
        return logits[:n], logits[n:], cache
