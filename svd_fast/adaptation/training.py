"""The short PEFT warm start that gives the adapted model (SPEC 5)."""
import math
import random

import torch
from tqdm.auto import tqdm

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


def warm_start(model, tokenizer, train_examples, method="lora", epochs=1, lr=5e-5, batch_size=1, max_length=512,
               seed=0, progress=True, adapter_name="default"):
    """Fine-tunes a fresh PEFT adapter on train_examples briefly; returns the PeftModel in eval mode.

    method: "lora" | "ia3" | "prompt" | "ptuning_v2" (SPEC 5's settings) or any peft config. The loss is
    on the answer tokens only. Seeded and deterministic; on CUDA it runs under bf16 autocast.
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
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name)
    device = model.device
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    order = random.Random(seed)
    peft_model.train()
    steps = math.ceil(len(examples) / batch_size)
    for epoch in range(epochs):
        shuffled = examples[:]
        order.shuffle(shuffled)
        running = 0.0
        bar = tqdm(batches(tokenizer, shuffled, batch_size, max_length), total=steps, unit="batch", disable=not progress,
                   desc=f"warm start ({method if isinstance(method, str) else type(method).__name__}) "
                        f"epoch {epoch + 1}/{epochs}")
        for step, (input_ids, mask, labels) in enumerate(bar, 1):
            with autocast:
                loss = peft_model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                  labels=labels.to(device)).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at epoch {epoch + 1}, step {step}: "
                                         f"lower lr (now {lr})")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{running / step:.4f}")
    return peft_model.eval()
