"""Two forwards per step, the base one under `disable_adapter()` (with the originals of the adapter's saved
modules): the route of last resort, and what one_forward=False asks for. Prompt-learning adapters keep no
cache here: PEFT inserts their virtual tokens on full forwards only, so every step recomputes the sequence."""
from ..caches import TwoCaches
from ..row_split import as_base_model
from .base import Route


class TwoForwardsRoute(Route):
    name = "two"

    def __init__(self, steered):
        super().__init__(steered)
        # Decided per model, not per class: whether it is prompt learning.
        self.prompt_learning = steered.peft_config.is_prompt_learning
        self.mode = "two-forward (no cache)" if self.prompt_learning else "two-forward"
        self.cache_class = None if self.prompt_learning else TwoCaches

    def logits_pair(self, step, cache):
        steered = self.steered
        mask, inputs = step.attention_mask, step.inputs()
        if self.prompt_learning:
            z_a = steered.model(**inputs, attention_mask=mask, **step.extra).logits
            with as_base_model(steered.model, steered.auxiliary):
                z_b = steered.model(**inputs, attention_mask=mask, position_ids=step.position_ids, **step.extra).logits
            return z_a[:, -z_b.shape[1]:], z_b, None
        if cache is None:
            cache = TwoCaches()
        kwargs = dict(**inputs, attention_mask=mask, position_ids=step.position_ids, use_cache=True, **step.extra)
        z_a = steered.model(**kwargs, **{steered.cache_kwarg: cache.adapted}).logits
        with as_base_model(steered.model, steered.auxiliary):
            z_b = steered.model(**kwargs, **{steered.cache_kwarg: cache.base}).logits
        return z_a, z_b, cache
