"""Prompt tuning, P-tuning and prefix tuning (P-tuning v2) in one forward of 2B rows. The adapter rows carry
the virtual tokens (prompt embeddings, or the prefix keys and values) as PEFT's forward does, with PEFT's
positions (counted from the first virtual token). The base rows carry the same number of masked-out
positions, so their real tokens see exactly what the plain base model would."""
import torch

from ..caches import PairedCache
from .base import Route


class VirtualTokensRoute(Route):
    name = "virtual"
    mode = "one-forward (virtual tokens on adapter rows)"
    cache_class = PairedCache
    static_cache = True
    peft_types = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")

    def logits_pair(self, step, cache):
        steered = self.steered
        n, length, mask = step.batch, step.length, step.attention_mask
        virtual = steered.peft_config.num_virtual_tokens
        base = steered.model.get_base_model()
        # PEFT's prompt-learning forward embeds the real tokens with the embedding it found at wrapping time,
        # `word_embeddings`, which is the original even where modules_to_save holds a trained copy.
        embed = getattr(steered.model, "word_embeddings", None) or base.get_input_embeddings()
        embeds = embed(step.input_ids) if step.inputs_embeds is None else step.inputs_embeds
        embeds = torch.cat([embeds, embeds])
        if cache is None or cache.route is None:  # the first forward: none, or generate's empty static cache
            if steered.peft_type == "PREFIX_TUNING":
                prefix = steered.model.get_prompt(batch_size=2 * n)  # a DynamicCache holding the prefix
                if cache is None:
                    cache = prefix
                    cache.__class__ = PairedCache
                else:
                    cache.store(prefix)
            else:
                prompts = steered.model.get_prompt(batch_size=n).to(embeds.dtype)
                embeds = torch.cat([torch.cat([prompts, embeds[:n]], 1),
                                    torch.cat([torch.zeros_like(prompts), embeds[n:]], 1)])
                cache = cache if cache is not None else PairedCache()
            cache.virtual_tokens, cache.route = virtual, self.name
        ones = torch.ones(n, virtual, dtype=mask.dtype, device=mask.device)
        mask_adapted = torch.cat([ones, mask], 1)
        mask_base = torch.cat([torch.zeros_like(ones), mask], 1)
        width = embeds.shape[1]
        past = cache.stored_length()
        positions_adapted = (torch.arange(width, device=embeds.device) + past).expand(n, -1)
        # the base rows' virtual positions are masked out: position 0, as HF gives padding
        positions_base = torch.nn.functional.pad(step.position_ids, (width - length, 0))
        with steered.auxiliary.adapter_rows(n, width), cache.model_forward():
            out = base(inputs_embeds=embeds, attention_mask=cache.padded(torch.cat([mask_adapted, mask_base])),
                       position_ids=torch.cat([positions_adapted, positions_base]), use_cache=True,
                       **{steered.cache_kwarg: cache}, **step.extra)
        logits = out.logits[:, -length:]
        return logits[:n], logits[n:], cache
