"""The KV caches of steered decoding: one of 2B rows for the one-forward routes, a pair for two forwards."""
import contextlib
import inspect

import torch
from transformers import DynamicCache, StaticCache


def cache_kwarg(model):
    """transformers >= 5.x calls the KV cache `cache`, earlier versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PairedRows:
    """What the KV caches of a 2B-row batch share: rows [0, n) adapted, [n, 2n) base. Beam search reorders both.

    With prompt or prefix tuning its first `virtual_tokens` positions hold the virtual tokens (masked out
    for the base rows). HF generate reads get_seq_length() as the number of tokens of the sequence it
    holds (to continue from a returned cache), the model's own forward as the number of positions stored
    (masks, query offsets): it counts the real tokens only, except inside `model_forward()`."""

    virtual_tokens = 0
    route = None  # the name of the route that filled it
    _in_model_forward = False

    def get_seq_length(self, *args, **kwargs):
        stored = super().get_seq_length(*args, **kwargs)
        if self._in_model_forward or not self.virtual_tokens:
            return stored
        real = stored - self.virtual_tokens  # a tensor for static caches (compiled steps read it)
        return real.clamp(min=0) if torch.is_tensor(real) else max(0, real)

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


class PairedCache(PairedRows, DynamicCache):
    """The dynamic KV cache of a 2B-row batch (see PairedRows)."""

    def padded(self, attention_mask):
        return attention_mask


class PairedStaticCache(PairedRows, StaticCache):
    """HF's static KV cache (`cache_implementation="static"`, the compile path) of a 2B-row batch: fixed-size
    tensors of 2B rows and max_cache_len positions (plus the virtual tokens of prompt learning), allocated at
    the first forward (see PairedRows). HF generate makes it (SteeredCausalLM._prepare_static_cache)."""

    positions = 0  # what it holds: max_cache_len, virtual tokens included

    def padded(self, attention_mask):
        """A 2D mask of the stored positions and the new ones (virtual tokens included) padded with zeros to the
        cache's width: one shape at every step, so that a compiled step does not recompile as the sequence grows."""
        return torch.nn.functional.pad(attention_mask, (0, self.positions - attention_mask.shape[1]))

    def padded_tokens_mask(self, attention_mask):
        """The same for generate's mask of the real tokens, which the virtual tokens' columns will precede."""
        return torch.nn.functional.pad(attention_mask, (0, self.positions - self.virtual_tokens - attention_mask.shape[1]))

    def store(self, cache):
        """Writes a dynamic cache of the `virtual_tokens` prefix-tuning positions into the first positions. A
        sliding-window layer of it keeps only the last window - 1 of them: the older ones are stored as zeros,
        which no later query's window reaches, so that every layer counts all the virtual positions."""
        for index, layer in enumerate(cache.layers):
            dropped = (0, 0, self.virtual_tokens - layer.keys.shape[-2], 0)
            self.update(torch.nn.functional.pad(layer.keys, dropped), torch.nn.functional.pad(layer.values, dropped),
                        index)


class TwoCaches(DynamicCache):
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


STEERED_CACHES = (PairedCache, PairedStaticCache, TwoCaches)  # what SteeredModel.generate hands back, and takes back
