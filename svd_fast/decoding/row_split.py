"""Running a PEFT model's adapter on some rows of a batch only: which rows a layer's input holds for the
adapter, module forwards replaced for the length of one forward, and the modules an adapter trains
outside its tuner layers (`modules_to_save`, `trainable_token_indices`), run per row."""
import contextlib

import torch

from .patching import replaced_forwards


class AdapterRows:
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


class PerRowSplit:
    """What the per-row adapter paths share: the adapter rows of the forward running now (`rows`), set by
    `adapter_rows(n, width)` around it, and the module forwards it replaces for that time."""

    rows = AdapterRows()
    forwards = ()

    @contextlib.contextmanager
    def adapter_rows(self, n, width=1):
        previous, self.rows = self.rows, AdapterRows(n, width)
        try:
            with self._installed():
                yield
        finally:
            self.rows = previous

    def _installed(self):
        return replaced_forwards(self.forwards)


def check_unmerged(layer):
    """The per-row paths need the base weights apart from the adapter's: a merged adapter is refused."""
    if layer.merged:
        raise RuntimeError("the adapter was merged into the weights after SteeredModel was built; the base rows need the "
                           "plain weights: call model.unmerge_adapter() before steering")


def auxiliary_wrapper_types():
    """PEFT's wrappers of modules an adapter trains outside its tuner layers: `modules_to_save` and
    `trainable_token_indices` (AuxiliaryTrainingWrapper since peft 0.15)."""
    try:
        from peft.utils.other import AuxiliaryTrainingWrapper

        return (AuxiliaryTrainingWrapper,)
    except ImportError:  # pragma: no cover - older peft
        from peft.utils.other import ModulesToSaveWrapper

        return (ModulesToSaveWrapper,)


def splits_per_row(module):
    """Whether a module maps each row of its input (dim 0) to the same row of one output tensor, with no
    state across rows: linear, embedding and norm layers (a decoder block holds the KV cache of every row,
    a MoE router returns a tuple)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, Conv1D)):
        return True
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and not any(True for _ in module.children())


class AuxiliaryModuleRows(PerRowSplit):
    """Modules the adapter trains outside its tuner layers (`modules_to_save` copies, `trainable_token_indices`
    embeddings) on the adapter rows only: inside `adapter_rows(n, width)` each runs the adapter's own copy on
    the adapter rows, through PEFT's per-adapter forward, and the original module on the other rows (n = 0:
    the base model on every row). Only modules whose rows are independent can be split so
    (`splits_per_row`); `unsplittable` names the others."""

    def __init__(self, peft_model, adapter):
        wrappers = [(name, m) for name, m in peft_model.named_modules()
                    if isinstance(m, auxiliary_wrapper_types()) and adapter in getattr(m, "_adapters", ())]
        self.unsplittable = [name for name, m in wrappers if not splits_per_row(m.original_module)]
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


@contextlib.contextmanager
def as_base_model(peft_model, auxiliary):
    """The PEFT model as its base model: adapters disabled, and the original of every module the adapter
    trains outside its tuner layers (PEFT's disable_adapter leaves those active for prompt learning)."""
    with peft_model.disable_adapter(), auxiliary.adapter_rows(0):
        yield


def holds_adapter_layers(model):
    """Whether get_peft_model has injected adapter layers (or saved-module wrappers) into `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, (BaseTunerLayer, *auxiliary_wrapper_types())) for m in model.modules())
