"""PEFT tuners without a mixed-adapter batch (DoRA, LoHa, LoKr, VeRA, OFT, AdaLoRA) in one forward of 2B
rows: inside the model's forward each tuner layer runs PEFT's own adapted forward on the adapter rows and
its base layer on the base rows, so there is one KV cache and one pass over the model.

Where the tuner adds its update to the base layer's output (LoHa, LoKr, VeRA, AdaLoRA: base(x) + delta(x))
the base layer runs once over all 2B rows, reading its weights once as the LoRA route does, and the
tuner's own forward gives delta(x) for the adapter rows with its base layer answering zeros. Where the
update acts on the base computation itself (DoRA rescales the base output by a weight norm, OFT rotates
the input) the adapter rows run PEFT's whole forward and the base rows the base layer.
"""
import torch

from ..patching import replaced_forwards
from ..row_split import PerRowSplit, check_unmerged
from .base import PairedRowsRoute

ADDITIVE = ("LOHA", "LOKR", "VERA", "ADALORA")  # the layer's output is base(x) + delta(x)
TUNERS = ADDITIVE + ("OFT",)  # and LoRA with DoRA


def _tuner_layers(peft_model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]


class TunerLayerRows(PerRowSplit):
    def __init__(self, peft_model, additive):
        self.forwards = [(m, self._row_forward(m, additive)) for m in _tuner_layers(peft_model)]

    def _row_forward(self, layer, additive):
        own_forward = type(layer).forward  # PEFT's adapted forward (the instance's is the one replaced here)

        def forward(x, *args, **kwargs):
            if self.rows.n == 0 or layer.disable_adapters:
                return own_forward(layer, x, *args, **kwargs)
            check_unmerged(layer)
            n = self.rows.of(x, layer)
            if not additive:
                adapted = own_forward(layer, x[:n], *args, **kwargs)
                return torch.cat([adapted, layer.base_layer(x[n:], *args, **kwargs).to(adapted.dtype)])
            result = layer.base_layer(x, *args, **kwargs)
            zeros = torch.zeros_like(result[:n])
            with replaced_forwards([(layer.base_layer, lambda *_, **__: zeros)]):
                delta = own_forward(layer, x[:n], *args, **kwargs)  # base(x) + delta(x) with base(x) = 0
            if torch.is_grad_enabled():
                return torch.cat([result[:n] + delta.to(result.dtype), result[n:]])
            result[:n] += delta.to(result.dtype)
            return result

        return forward


class TunerRowsRoute(PairedRowsRoute):
    name = "tuner"
    mode = "one-forward (tuner layers on adapter rows)"

    @classmethod
    def unsupported(cls, steered):
        dora = steered.peft_type == "LORA" and getattr(steered.peft_config, "use_dora", False)
        if steered.peft_type not in TUNERS and not dora:
            return f"no per-row forward for {steered.peft_type} adapters here (covered: DoRA, " + ", ".join(TUNERS) + ")"
        if any(layer.merged for layer in _tuner_layers(steered.model)):
            return "the adapter is merged into the weights"
        return None

    def per_row_split(self, steered):
        return TunerLayerRows(steered.model, additive=steered.peft_type in ADDITIVE)
