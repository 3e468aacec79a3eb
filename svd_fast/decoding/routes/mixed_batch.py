"""LoRA layers other than plain linear ones (embeddings, variants except DoRA) through PEFT's own
mixed-adapter batch: the adapter's name for the first B rows, "__base__" for the rest."""
from .base import BASE_ADAPTER, PairedRowsRoute


class MixedBatchRoute(PairedRowsRoute):
    name = "mixed"
    mode = "one-forward (mixed-adapter batch)"

    peft_types = ("LORA",)  # PEFT's LoHa and LoKr layers take adapter_names but ignore them
    why_not_compiled = "PEFT's mixed-adapter batch registers forward hooks at every forward"

    @classmethod
    def why_not(cls, steered):
        if getattr(steered.peft_config, "use_dora", False):
            return "PEFT's mixed-adapter batches do not serve DoRA"
        return None

    def forward_kwargs(self, n):
        return {"adapter_names": [self.steered.adapter] * n + [BASE_ADAPTER] * n}
