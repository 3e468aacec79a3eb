"""Decoding with steered logits: SteeredModel (its routes, caches and HF generate glue), the logits
processor form, and the CPU routing of decode-step linears to the small-batch kernel."""
from .logits_processor import SteeringLogitsProcessor
from .steered_model import SteeredModel

__all__ = ["SteeredModel", "SteeringLogitsProcessor"]
