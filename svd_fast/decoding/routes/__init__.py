"""The ways of getting both distributions of a step, one file each; `choose` takes the first one-forward
route that supports the PEFT model, else two forwards."""
from .base import Route, Step
from .ia3_rows import IA3RowsRoute
from .lora_rows import LoraRowsRoute
from .mixed_batch import MixedBatchRoute
from .tuner_rows import TunerRowsRoute
from .two_forwards import TwoForwardsRoute
from .virtual_tokens import VirtualTokensRoute

ONE_FORWARD_ROUTES = (LoraRowsRoute, MixedBatchRoute, IA3RowsRoute, TunerRowsRoute, VirtualTokensRoute)

__all__ = ["Route", "Step", "choose", "ONE_FORWARD_ROUTES", "TwoForwardsRoute"]


def choose(steered, one_forward="auto"):
    """(route, why there is no one-forward route or None). one_forward: "auto", True (refuse two forwards)
    or False (two forwards)."""
    if one_forward is False:
        return TwoForwardsRoute(steered), None
    if steered.auxiliary.unsplittable:
        reason = (f"{', '.join(steered.auxiliary.unsplittable)} (trained by the adapter outside its tuner layers) "
                  "cannot run per row")
    else:
        reasons = []
        for route in ONE_FORWARD_ROUTES:
            if route.peft_types and steered.peft_type not in route.peft_types:
                continue
            why = route.why_not(steered)
            if why is None:
                return route(steered), None
            reasons.append(f"{route.name}: {why}")
        reason = "; ".join(reasons) or f"no one-forward route takes {steered.peft_type} adapters"
    if one_forward is True:
        raise ValueError(f"this adapter has no one-forward path: {reason}; use one_forward=False")
    return TwoForwardsRoute(steered), reason
