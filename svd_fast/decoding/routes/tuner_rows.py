"""PEFT tuners without a mixed-adapter batch (DoRA, LoHa, LoKr, VeRA, OFT, AdaLoRA) in one forward of 2B
rows: inside the model's forward each tuner layer runs PEFT's own adapted forward on the adapter rows and
its base layer on the base rows, so there is one KV cache and one pass over the model.

Where the tuner starts from its base layer's output on the layer's own input (LoHa, LoKr, VeRA and AdaLoRA
add an update to it; DoRA rescales it) the base layer runs once over all 2B rows, reading its weights once
as the LoRA route does, and PEFT's forward on the adapter rows is served that output instead of computing
it again: its own arithmetic, exactly. OFT rotates the input before its base layer, so there the adapter
rows run PEFT's whole forward and the base rows the base layer.
"""
import torch

from ..patching import replaced_forwards
from ..row_split import PerRowSplit, check_unmerged
from .base import PairedRowsRoute

# tuner -> whether its layers read base_layer(x) on their own input x (the base output can be served)
SERVES_BASE_OUTPUT = {"LORA": True, "LOHA": True, "LOKR": True, "VERA": True, "ADALORA": True, "OFT": False}


def tuner_layers(peft_model, peft_type):
    """The adapter's own layers (not, say, the trainable-token layers that saved-module wrappers hold)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    package = f"peft.tuners.{peft_type.lower()}."
    return [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer) and type(m).__module__.startswith(package)]


class TunerLayerRows(PerRowSplit):
    def __init__(self, layers, serve_base_output):
        self.forwards = [(m, self._row_forward(m, serve_base_output)) for m in layers]

    def _row_forward(self, layer, serve_base_output):
        own_forward = type(layer).forward  # PEFT's adapted forward (the instance's is the one replaced here)

        def forward(x, *args, **kwargs):
            if self.rows.n == 0 or layer.disable_adapters:
                return own_forward(layer, x, *args, **kwargs)
            check_unmerged(layer)
            n = self.rows.of(x, layer)
            if not serve_base_output:
                adapted = own_forward(layer, x[:n], *args, **kwargs)
                return torch.cat([adapted, layer.base_layer(x[n:], *args, **kwargs).to(adapted.dtype)])
            base = layer.base_layer(x, *args, **kwargs)
            served = base[:n].clone()  # a tuner may add to it in place
            with replaced_forwards([(layer.base_layer, lambda *_, **__: served)]):
                adapted = own_forward(layer, x[:n], *args, **kwargs)
            return torch.cat([adapted, base[n:].to(adapted.dtype)])

        return forward


class TunerRowsRoute(PairedRowsRoute):
    name = "tuner"
    mode = "one-forward (tuner layers on adapter rows)"
    peft_types = tuple(SERVES_BASE_OUTPUT)

    @classmethod
    def why_not(cls, steered):
        if steered.peft_type == "LORA" and not getattr(steered.peft_config, "use_dora", False):
            return "plain LoRA takes the LoRA rows or the mixed-batch route"
        if any(layer.merged for layer in tuner_layers(steered.model, steered.peft_type)):
            return "the adapter is merged into the weights"
        return None

    def __init__(self, steered):
        super().__init__(steered)
        if getattr(steered.peft_config, "use_dora", False):
            self.why_not_compiled = "PEFT's DoRA forward checks its weights' classes, which dynamo cannot trace"

    def per_row_split(self, steered):
        return TunerLayerRows(tuner_layers(steered.model, steered.peft_type), SERVES_BASE_OUTPUT[steered.peft_type])
