"""IA3 on linear layers, in one forward of 2B rows: the IA3 layers run as their base layer and hooks apply
each layer's learned scaling to the adapter rows, exactly as IA3's own forward does (to the input of
feed-forward layers, to the output of the others)."""
import contextlib

import torch

from ..row_split import PerRowSplit
from .base import PairedRowsRoute


class IA3Rows(PerRowSplit):
    def __init__(self, layers, adapter):
        self.layers, self.adapter = layers, adapter

    @staticmethod
    def layers_of(peft_model):
        from peft.tuners.ia3.layer import IA3Layer

        return [m for m in peft_model.modules() if isinstance(m, IA3Layer)]

    @staticmethod
    def takes(layers, adapter):
        from peft.tuners.ia3.layer import Linear

        return bool(layers) and all(isinstance(m, Linear) and not m.merged and adapter in m.ia3_l for m in layers)

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
