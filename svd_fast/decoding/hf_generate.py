"""What HuggingFace `generate` drives for SteeredModel: a thin causal LM whose logits are the steered ones,
and the fallback for rows whose keep set the logits processors empty."""
import copy
import warnings

import torch
from transformers import __version__ as transformers_version
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .batching import positions_from_mask
from .caches import STEERED_CACHES, PairedStaticCache


class SteeredCausalLM(PreTrainedModel, GenerationMixin):
    """What HF `generate` drives: a causal LM whose logits are the steered ones."""

    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, steered):
        base = steered.model.get_base_model()
        super().__init__(copy.deepcopy(base.config))
        self.steered = steered
        self.inner = steered.model  # registered, so .device and .dtype follow the real weights
        self.generation_config = copy.deepcopy(base.generation_config)
        self.last_adapted_logits = None  # z_a at the last position of the last step, for EmptyKeepSetFallback

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=True, logits_to_keep=None, inputs_embeds=None, **_):
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            self.steered._check_cache(cache, use_cache)
        if not use_cache or not isinstance(cache, STEERED_CACHES):
            cache = None  # generate's own empty cache (or none wanted): ours replaces it
        z_a, z_b, cache = self.steered.logits_pair(input_ids, attention_mask, position_ids, cache, logits_to_keep,
                                                   inputs_embeds)
        self.last_adapted_logits = z_a[:, -1]
        output = CausalLMOutputWithPast(logits=self.steered.steer(z_a, z_b))
        if use_cache:
            output["past_key_values"] = cache
        return output

    # ---------------------------------------------------------------------------------------------
    # HF's static cache (cache_implementation="static"), which its compile path needs.

    def _prepare_static_cache(self, cache_implementation, batch_size, max_cache_len, *args, **kwargs):
        """transformers >= 5.10: the static cache of a generate call, here one of 2B rows (adapted and base rows)
        and room for the virtual tokens of prompt learning."""
        route = self.steered._route
        if not route.static_cache:
            raise ValueError(f"cache_implementation={cache_implementation!r} needs a one-forward route, and this adapter "
                             f"decodes with {route.mode} ({self.steered.two_forward_reason or 'one_forward=False'}): "
                             "drop cache_implementation (and compile_config) to decode with dynamic caches")
        virtual = getattr(self.steered.peft_config, "num_virtual_tokens", 0) if route.name == "virtual" else 0
        cache = super()._prepare_static_cache(cache_implementation, 2 * batch_size, max_cache_len + virtual, *args,
                                              **kwargs)
        cache.__class__ = PairedStaticCache
        # HF keeps a cache as long as the longest earlier one of this model, so that compiled steps do not recompile
        cache.positions = max(max_cache_len + virtual, getattr(self, "_previous_max_cache_length", 0))
        cache.virtual_tokens = virtual
        return cache

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config):
        """HF compiles the forward of decode steps when the cache is static (on CUDA by default, elsewhere with a
        compile_config). A route whose forward torch.compile cannot trace in one graph compiles with graph
        breaks (fullgraph=False, HF's default), and says so in one error where fullgraph=True is asked for."""
        compiles = super()._valid_auto_compile_criteria(model_kwargs, generation_config)
        why_not = self.steered._route.why_not_compiled
        if compiles and why_not and getattr(generation_config.compile_config, "fullgraph", False):
            raise ValueError(f"this adapter decodes with {self.steered.mode}, which does not compile in one graph "
                             f"({why_not}): set compile_config.fullgraph=False (graph breaks), or pass "
                             "disable_compile=True to decode with the static cache uncompiled")
        return compiles

    def _get_cache(self, cache_implementation, *args, **kwargs):
        """The static cache builder of transformers before 5.10, whose static caches take a cache_position."""
        raise ValueError(f"cache_implementation={cache_implementation!r} with steering needs transformers 5.10 or later "
                         f"(this is {transformers_version}): upgrade transformers, or drop cache_implementation")

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        key = "cache" if "cache" in kwargs else "past_key_values"  # transformers >= 5.2x calls it cache
        kwargs["inputs_embeds"] = inputs_embeds  # a named parameter: HF generate looks for it before taking embeds
        if not isinstance(kwargs.get(key), PairedStaticCache):
            return super().prepare_inputs_for_generation(input_ids, **kwargs)
        # HF turns the 2D mask into a 4D one of B rows for a static cache. The routes build the 2B rows' mask
        # from the 2D one, given here padded to the cache's width: the same shapes at every decode step, so
        # that a compiled step compiles once (the positions come from the unpadded mask).
        cache = kwargs.pop(key)
        inputs = super().prepare_inputs_for_generation(input_ids, **{key: None}, **kwargs)
        mask = inputs.get("attention_mask")
        if mask is not None:
            room = cache.positions - cache.virtual_tokens
            if mask.shape[1] > room:
                raise ValueError(f"the static cache holds {room} tokens and this step needs {mask.shape[1]}: give the "
                                 f"generate call that made it room for the whole sequence (max_cache_len=...), or pass "
                                 "the whole sequence without past_key_values")
            if inputs.get("position_ids") is None:
                length = (inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
                inputs["position_ids"] = positions_from_mask(mask)[:, -length:]
            inputs["attention_mask"] = cache.padded_tokens_mask(mask)
        inputs[key] = cache
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache

    def _get_logits_processor(self, *args, **kwargs):
        # HF's private builder of a generate call's processors (same signature in transformers 4.56 to 5.24,
        # tested in CI on both): wrapped to give rows whose keep set the processors empty a fallback.
        processors = super()._get_logits_processor(*args, **kwargs)
        config = kwargs.get("generation_config", args[0] if args else None)
        beams = isinstance(config, GenerationConfig) and (config.num_beams or 1) > 1
        return EmptyKeepSetFallback(processors, self, log_probs=beams)


class EmptyKeepSetFallback(LogitsProcessorList):
    """HF's logits processors for a steered generate call, with a fallback for rows they leave no token in.

    Under fill=-inf only the keep set is finite; a processor that runs after steering (min_new_tokens
    banning EOS, suppress_tokens, bad_words_ids, ...) can remove all of it. Such a row then takes, at that
    step, the adapter's own distribution through the same processors (log-probabilities under beam search,
    which scores log-probabilities), with one warning per generate call. The processors then run twice at
    that step (a stateful one advances twice). Greedy, sampling and beam search; modes that score other
    rows than the last forward's (assisted decoding, transformers 4.x group beam search) get no fallback."""

    def __init__(self, processors, lm, log_probs):
        super().__init__(processors)
        self.lm, self.log_probs, self.warned = lm, log_probs, False

    def __call__(self, input_ids, scores, **kwargs):
        adapted = self.lm.last_adapted_logits  # before the processors: one of them may run the model again
        processed = super().__call__(input_ids, scores, **kwargs)
        if adapted is None or adapted.shape != scores.shape or self.lm.steered.fill != float("-inf"):
            return processed
        emptied = (processed == float("-inf")).all(-1) & ~(scores == float("-inf")).all(-1)
        if not bool(emptied.any()):
            return processed
        fallback = adapted.to(scores.dtype)
        fallback = super().__call__(input_ids, fallback.log_softmax(-1) if self.log_probs else fallback, **kwargs)
        if not self.warned:
            self.warned = True
            warnings.warn(f"svd_fast: logits processors applied after steering removed every token of the keep set "
                          f"(fill=-inf) in {int(emptied.sum())} row(s) at step {input_ids.shape[1]}, e.g. min_new_tokens "
                          "banning EOS or suppress_tokens; those rows take the adapter's own (unsteered) distribution "
                          "at such steps. fill='keep' keeps the masked tokens available instead.", UserWarning,
                          stacklevel=2)
        return torch.where(emptied[:, None], fallback, processed)
