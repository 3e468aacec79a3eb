"""The short PEFT warm start that gives the adapted model (SPEC 5)."""
import math
import random

import torch
from tqdm.auto import tqdm

from ..decoding.batching import IGNORE_INDEX
from ..distributed import all_reduce_sum, rank_and_world
from .examples import batches, check_examples

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FEED_FORWARD = ["up_proj", "down_proj"]
METHODS = ("lora", "ia3", "prompt", "ptuning_v2")


def _has_modules(model, names):
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return all(n in present for n in names)


def preset_config(method, model):
    """SPEC 5's settings as a peft config. Target modules are the paper's (q/k/v/o, up/down) where the
    model has them (Llama, Qwen2, Mistral, ...), else PEFT's defaults for its architecture."""
    import peft

    if method == "lora":
        targets = ATTENTION if _has_modules(model, ATTENTION) else None
        return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=targets, task_type="CAUSAL_LM")
    if method == "ia3":
        if _has_modules(model, ATTENTION + FEED_FORWARD):
            return peft.IA3Config(target_modules=ATTENTION + FEED_FORWARD, feedforward_modules=FEED_FORWARD,
                                  task_type="CAUSAL_LM")
        return peft.IA3Config(task_type="CAUSAL_LM")
    if method == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")
    if method == "ptuning_v2":  # prefix tuning with a reparameterising (2-layer MLP) encoder
        return peft.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=128,
                                       task_type="CAUSAL_LM")
    raise ValueError(f"method must be one of {METHODS} or a peft config, got {method!r}")


def _answer_loss_sum(peft_model, input_ids, mask, labels):
    """The summed cross-entropy over the answer tokens (labels shifted by one), float32; and their count.
    The LM head runs only at the columns that predict an answer token in some row (HF's logits_to_keep as
    indices): at Gemma 3's 262,144-token vocabulary it is most of a forward over the prompt positions."""
    targets = labels[:, 1:]
    columns = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    config = peft_model.active_peft_config
    # prompt tuning and P-tuning put their virtual tokens' logits first
    virtual = config.num_virtual_tokens if config.is_prompt_learning and config.peft_type != "PREFIX_TUNING" else 0
    try:
        logits = peft_model(input_ids=input_ids, attention_mask=mask, logits_to_keep=columns + virtual).logits
    except TypeError:  # a model whose forward has no logits_to_keep (OPT, BLOOM, GPT-Neo on transformers 4.x)
        logits = peft_model(input_ids=input_ids, attention_mask=mask).logits
    if logits.shape[1] != columns.numel():  # the model computed every column (it ignored logits_to_keep)
        logits = logits[:, columns + virtual]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[:, columns].flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def warm_start(model, tokenizer, train_examples, method="lora", epochs=1, lr=5e-5, batch_size=1, max_length=512,
               seed=0, progress=True, adapter_name="default"):
    """Fine-tunes a fresh PEFT adapter on train_examples briefly; returns the PeftModel in eval mode.

    method: "lora" | "ia3" | "prompt" | "ptuning_v2" (SPEC 5's settings) or any peft config. The loss is
    the mean cross-entropy over the answer tokens of a batch of `batch_size` examples. Seeded and
    deterministic; on CUDA it runs under bf16 autocast.

    Data parallel under torch.distributed (torchrun; gloo on CPUs, NCCL on GPUs): every rank takes its share
    of each batch (examples rank, rank + world, ...), the gradients of the batch's summed loss are summed
    across ranks and divided by its answer-token count, so each step is the single-process step, up to
    float rounding and dropout's random draws (drawn per rank). Every rank returns the same adapter.
    (Not the DDP wrapper: a batch smaller than the world leaves some ranks without examples, which DDP's
    hooks cannot skip; the trainable parameters here are few.)
    """
    import peft

    examples = check_examples(train_examples, "train_examples")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if isinstance(model, peft.PeftModel):
        raise ValueError("model already carries a PEFT adapter: pass the base model to warm_start")
    config = method if isinstance(method, peft.PeftConfig) else preset_config(method, model)
    rank, world = rank_and_world()
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    if world > 1:
        torch.manual_seed(seed + rank)  # dropout: each rank its own draws
    device = model.device
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    order = random.Random(seed)
    peft_model.train()
    steps = math.ceil(len(examples) / batch_size)
    for epoch in range(epochs):
        shuffled = examples[:]
        order.shuffle(shuffled)
        running, running_tokens = 0.0, 0
        bar = tqdm(range(0, len(shuffled), batch_size), total=steps, unit="batch", disable=not (progress and rank == 0),
                   desc=f"warm start ({method if isinstance(method, str) else type(method).__name__}) "
                        f"epoch {epoch + 1}/{epochs}" + (f", {world} processes" if world > 1 else ""))
        for step, start in enumerate(bar, 1):
            share = shuffled[start:start + batch_size][rank::world]
            total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, answer tokens
            if share:
                input_ids, mask, labels = next(batches(tokenizer, share, len(share), max_length))
                with autocast:
                    loss, tokens = _answer_loss_sum(peft_model, input_ids.to(device), mask.to(device), labels.to(device))
                total += torch.stack([loss.detach().double(), tokens.double()])
            all_reduce_sum(total)
            if not torch.isfinite(total[0]):
                raise FloatingPointError(f"the loss became {total[0].item()} at epoch {epoch + 1}, step {step}: "
                                         f"lower lr (now {lr})")
            if share:
                (loss / total[1].clamp(min=1)).backward()
            if world > 1:  # every rank sums every gradient, also a rank without examples in this batch
                for p in trainable:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    all_reduce_sum(p.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running, running_tokens = running + total[0].item(), running_tokens + int(total[1].item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{running / max(1, running_tokens):.4f}")
    return peft_model.eval()


@torch.no_grad()
def answer_nll(peft_model, tokenizer, examples, batch_size=8, max_length=512):
    """The model's cross-entropy per answer token (nats, float) over labelled examples: the warm start's
    objective on held-out data, how the evaluation picks a method's learning rate on the calibration split.
    Not sharded under torchrun: every rank computes the same value."""
    examples = check_examples(examples, "examples")
    device = peft_model.get_base_model().device
    was_training = peft_model.training
    peft_model.eval()
    loss, tokens = 0.0, 0
    try:
        for input_ids, mask, labels in batches(tokenizer, examples, batch_size, max_length):
            summed, count = _answer_loss_sum(peft_model, input_ids.to(device), mask.to(device), labels.to(device))
            loss, tokens = loss + float(summed), tokens + int(count)
    finally:
        peft_model.train(was_training)
    if tokens == 0:
        raise ValueError("the examples have no answer tokens after tokenization (max_length too short?)")
    return loss / tokens
