"""Plain LoRA on linear layers, in one forward of 2B rows: each LoRA layer adds B(A(x)) * scaling to the
slice of adapter rows, with one addmm_ (PEFT's mixed-adapter batch registers a hook on every module at each
forward and gathers the rows by index: ~12 ms of a ~75 ms SmolLM2-135M CPU decode step)."""
import torch
import torch.nn.functional as F

from ..row_split import PerRowSplit, check_unmerged
from .base import PairedRowsRoute


class LoraRows(PerRowSplit):
    """Inside `adapter_rows(n, width)` each LoRA linear layer returns base(x) + B(A(dropout(x))) * scaling on
    the adapter rows and base(x) on the others, as PEFT's mixed-adapter batch does."""

    def __init__(self, layers, adapter):
        self.forwards = [(m, self._row_forward(m, adapter)) for m in layers]

    @staticmethod
    def layers(peft_model):
        from peft.tuners.lora.layer import LoraLayer

        return [m for m in peft_model.modules() if isinstance(m, LoraLayer)]

    @staticmethod
    def takes(layers, adapter):
        from peft.tuners.lora.layer import Linear

        return bool(layers) and all(type(m) is Linear and not m.merged and adapter in m.lora_A
                                    and adapter not in m.lora_variant for m in layers)

    def _row_forward(self, layer, adapter):
        lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
        dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]

        def forward(x, *args, **kwargs):
            result = layer.base_layer(x, *args, **kwargs)
            if layer.disable_adapters:
                return result
            check_unmerged(layer)
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


class LoraRowsRoute(PairedRowsRoute):
    name = "lora"
    mode = "one-forward (LoRA on adapter rows)"
    peft_types = ("LORA",)

    @classmethod
    def why_not(cls, steered):
        if not LoraRows.takes(LoraRows.layers(steered.model), steered.adapter):
            return "LoRA layers other than plain linear ones (embeddings, variants such as DoRA, merged)"
        return None

    def per_row_split(self, steered):
        return LoraRows(LoraRows.layers(steered.model), steered.adapter)
