"""Decode-step linears on CPU through svd_fast's small-batch kernel.

    with torch.no_grad(), small_batch_linears(model):
        out = model.generate(...)

While the context is active, every frozen ``torch.nn.Linear`` on CPU inside ``module`` (the LM head
included; a head tied to the embeddings shares its weight, which is fine) runs
``svd_fast.ops.small_batch_linear`` when its input has at most ``max_rows`` rows and no gradient is
needed, and its own forward otherwise (prefill, training). The original forwards come back on exit,
also when the body raises.
"""
import contextlib

import torch

from .. import ops
from .patching import replaced_forwards

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _eligible(linear):
    # Subclasses that override forward (quantized or adapter layers) compute something else.
    if type(linear).forward is not torch.nn.Linear.forward:
        return False
    params = [linear.weight] + ([linear.bias] if linear.bias is not None else [])
    return all(p.device.type == "cpu" and p.dtype in _KERNEL_DTYPES and not p.requires_grad for p in params)


def _small_batch_forward(linear, stock_forward, max_rows):
    op = torch.ops.svd_fast.small_batch_linear

    def forward(x):
        weight, bias = linear.weight, linear.bias
        if (x.dtype == weight.dtype and x.is_cpu and weight.is_cpu and x.dim() > 0 and x.shape[-1] == weight.shape[1]
                and 0 < x.numel() <= max_rows * weight.shape[1]
                and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return op(x, weight, bias)
        return stock_forward(x)

    return forward


@contextlib.contextmanager
def small_batch_linears(module, max_rows=ops.SMALL_BATCH_MAX_ROWS):
    """Route the few-row forwards of the frozen CPU ``nn.Linear`` layers in ``module`` to the
    small-batch kernel while the context is active. Yields the number of layers routed (0 when the
    compiled kernels are missing or the torch backend is forced: then nothing changes)."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= ops.SMALL_BATCH_MAX_ROWS:
        raise ValueError(f"max_rows must be an int in [1, {ops.SMALL_BATCH_MAX_ROWS}], got {max_rows!r}")
    if not ops.native_available() or ops.get_backend() == "torch":
        yield 0
        return
    layers = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear) and _eligible(layer)]
    with replaced_forwards([(layer, _small_batch_forward(layer, layer.forward, max_rows)) for layer in layers]):
        yield len(layers)
