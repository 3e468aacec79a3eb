"""SteeringLogitsProcessor: steering as a HuggingFace logits processor, for users who keep calling HF
generate on their own adapted model."""
import torch
from transformers import LogitsProcessor

from .. import ops
from .batching import positions_from_mask
from .row_split import AuxiliaryModuleRows, as_base_model, holds_adapter_layers


class SteeringLogitsProcessor(LogitsProcessor):
    """Steering as a `LogitsProcessor`, for users who keep calling HF generate on their adapted model.

    adapted.generate(**inputs, logits_processor=[SteeringLogitsProcessor(base_model, mu, alpha,
                                                                         attention_mask=inputs["attention_mask"])])

    base_model: the PeftModel itself (its base is then run under disable_adapter(), with the original of
    every module the adapter trains outside its tuner layers), or an untouched base model. Not the model
    get_peft_model was given: PEFT injects the adapter's layers into it in place, so it is no longer the
    base (refused with an error).
    A logits processor does not see the attention mask: for a padded batch pass the prompt's
    `attention_mask=`; a prompt holding the pad token without it is refused, since the base model would
    read the padding as text (also where the pad token is EOS or BOS: pass the mask then too). With a mask,
    the processor is bound to the prompt batch of its first generate call (the mask's masked positions
    must hold the pad token where it is known); a later call with another prompt batch is refused: give
    each batch its own processor.
    Each step reruns the base model on the whole sequence, without a cache: a full extra forward per
    step, much slower than SteeredModel. Processors listed after this one can empty the keep set under
    fill=-inf (SteeredModel.generate falls back in that case; this processor cannot see them).
    """

    def __init__(self, base_model, mu, alpha=0.1, fill=float("-inf"), attention_mask=None, pad_token_id=None):
        ops._check_alpha(alpha)
        ops._fill_args(fill)
        if not isinstance(mu, torch.Tensor):
            ops._check_mu_value(mu)
        self._aux = None
        if hasattr(base_model, "peft_config") and hasattr(base_model, "disable_adapter"):
            self._aux = AuxiliaryModuleRows(base_model, base_model.active_adapter)
        elif holds_adapter_layers(base_model):
            raise ValueError("base_model holds PEFT adapter layers: get_peft_model injects them into the model it is "
                             "given, in place, so that model now computes the adapted logits, not the base ones. Pass "
                             "the PeftModel itself (its adapters are disabled for the base forward) or a base model "
                             "loaded separately")
        self.base_model, self.mu, self.alpha, self.fill = base_model, mu, alpha, fill
        self.prompt_mask = attention_mask
        config = getattr(base_model, "generation_config", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(config, "pad_token_id", None)
        self._prompt = None  # the prompt batch of the current generate call (every later step extends it)
        self._bound_prompt = None  # with a mask: the (one row per prompt) batch that mask belongs to

    def _mask(self, input_ids):
        prompt = self._prompt
        if (prompt is None or input_ids.shape[0] != prompt.shape[0] or input_ids.shape[1] <= prompt.shape[1]
                or not torch.equal(input_ids[:, : prompt.shape[1]], prompt)):  # a new generate call
            self._check_prompt(input_ids)
            self._prompt = input_ids.clone()
        mask = torch.ones_like(input_ids)
        if self.prompt_mask is not None:
            prompt_mask = self.prompt_mask.to(input_ids.device)
            mask[:, : prompt_mask.shape[1]] = prompt_mask.repeat_interleave(input_ids.shape[0] // prompt_mask.shape[0], 0)
        return mask

    def _check_prompt(self, input_ids):
        """At the first step of a generate call, input_ids is the prompt batch (one row per beam or sample)."""
        if self.prompt_mask is None:
            pad = self.pad_token_id
            fix = "pass SteeringLogitsProcessor(..., attention_mask=inputs['attention_mask'])"
            if pad is not None and bool((input_ids == pad).any()):
                raise ValueError(f"the prompt holds the pad token (id {pad}) but SteeringLogitsProcessor got no "
                                 f"attention_mask: the base model would read the padding as text; {fix}")
            if pad is None and not bool((input_ids == input_ids[:1]).all()):
                raise ValueError(f"a batch of {input_ids.shape[0]} different prompts and no attention_mask: a logits "
                                 "processor cannot see whether they are padded (the base model has no pad_token_id "
                                 f"either), and would read padding as text; {fix}, or pad_token_id=")
            return
        rows, width = self.prompt_mask.shape
        fix = "give each prompt batch its own SteeringLogitsProcessor with that batch's attention_mask"
        if width != input_ids.shape[1] or input_ids.shape[0] % rows:
            raise ValueError(f"attention_mask is {rows} x {width} but this generate call's prompt is "
                             f"{input_ids.shape[0]} x {input_ids.shape[1]} (rows may repeat per beam or sample): {fix}")
        prompts = input_ids[:: input_ids.shape[0] // rows]  # beams and samples of a prompt are adjacent rows
        if self._bound_prompt is None:
            masked = self.prompt_mask.to(input_ids.device) == 0
            if self.pad_token_id is not None and not bool((prompts[masked] == self.pad_token_id).all()):
                raise ValueError(f"attention_mask masks tokens that are not the pad token (id {self.pad_token_id}): it "
                                 f"belongs to another prompt batch; {fix}")
            self._bound_prompt = prompts.clone()
        elif not torch.equal(prompts, self._bound_prompt.to(prompts.device)):
            raise ValueError(f"this SteeringLogitsProcessor's attention_mask belongs to the prompt batch of its first "
                             f"generate call, not this one; {fix}")

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        mask = self._mask(input_ids)
        kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        if self._aux is not None:
            with as_base_model(self.base_model, self._aux):
                z_base = self.base_model(**kwargs).logits[:, -1]
        else:
            z_base = self.base_model(**kwargs).logits[:, -1]
        if z_base.shape[-1] != scores.shape[-1]:
            raise ValueError(f"base_model has a vocabulary of {z_base.shape[-1]} tokens but the generating model "
                             f"{scores.shape[-1]}: pass the base model of the adapted model that generates")
        return ops.steer_logits(scores, z_base.to(scores.dtype), self.mu, self.alpha, self.fill)
