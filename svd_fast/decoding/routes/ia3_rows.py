"""IA3 on linear layers, in one forward of 2B rows: each IA3 layer runs its base layer and applies its
learned scaling to the adapter rows only, exactly as IA3's own forward does (to the input of
feed-forward layers, to the output of the others)."""
import torch

from ..row_split import PerRowSplit, check_unmerged
from .base import PairedRowsRoute


class IA3Rows(PerRowSplit):
    """Inside `adapter_rows(n, width)` each IA3 linear layer scales the adapter rows as IA3's own forward does
    (the input of feed-forward layers, the output of the others) and passes the base rows through its base
    layer unchanged. Replaced forwards, not hooks: registering hooks at each forward breaks torch.compile."""

    def __init__(self, layers, adapter):
        self.forwards = [(m, self._row_forward(m, adapter)) for m in layers]

    @staticmethod
    def layers_of(peft_model):
        from peft.tuners.ia3.layer import IA3Layer

        return [m for m in peft_model.modules() if isinstance(m, IA3Layer)]

    @staticmethod
    def takes(layers, adapter):
        from peft.tuners.ia3.layer import Linear

        return bool(layers) and all(isinstance(m, Linear) and not m.merged and adapter in m.ia3_l for m in layers)

    def _row_forward(self, layer, adapter):
        def forward(x, *args, **kwargs):
            if layer.disable_adapters:
                return layer.base_layer(x, *args, **kwargs)
            check_unmerged(layer)
            n, scale = self.rows.of(x, layer), layer.ia3_l[adapter]
            if layer.is_feedforward:
                scaled = (x[:n].to(scale.dtype) * scale.flatten()).to(x.dtype)
                return layer.base_layer(torch.cat([scaled, x[n:]]), *args, **kwargs)
            result = layer.base_layer(x, *args, **kwargs)
            return torch.cat([(result[:n] * scale.flatten()).to(result.dtype), result[n:]])

        return forward


class IA3RowsRoute(PairedRowsRoute):
    name = "ia3"
    mode = "one-forward (per-row IA3)"

    peft_types = ("IA3",)

    @classmethod
    def why_not(cls, steered):
        if not IA3Rows.takes(IA3Rows.layers_of(steered.model), steered.adapter):
            return "IA3 layers other than unmerged linear ones"
        return None

    def per_row_split(self, steered):
        return IA3Rows(IA3Rows.layers_of(steered.model), steered.adapter)
