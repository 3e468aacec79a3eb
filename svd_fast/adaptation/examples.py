"""Labelled examples {"prompt": str, "answer": str} as token batches for training and teacher forcing.

The loss and the calibration positions are the answer tokens only: prompt and padding get label -100.
"""
from ..decoding.batching import IGNORE_INDEX, collate, ensure_pad_token


def check_examples(examples, what="examples"):
    """A list of {"prompt": str, "answer": str}; one clear error otherwise."""
    if not isinstance(examples, (list, tuple)):
        raise TypeError(f"{what} must be a list of {{'prompt': str, 'answer': str}} dicts, got {type(examples).__name__}")
    if not examples:
        raise ValueError(f"{what} is empty: give at least one {{'prompt': ..., 'answer': ...}} example")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) or not isinstance(ex.get("answer"), str):
            raise ValueError(f"{what}[{i}] must be a dict with string 'prompt' and 'answer', got {ex!r:.80}")
        if not ex["answer"]:
            raise ValueError(f"{what}[{i}] has an empty 'answer': there is nothing to learn or calibrate on")
    return list(examples)


def encode_example(tokenizer, example, max_length=512):
    """(input_ids, labels) lists: prompt tokens then answer tokens; labels -100 on the prompt."""
    prompt_ids = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[-max_length:]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[-max_length:]
    return ids, labels


def batches(tokenizer, examples, batch_size, max_length=512, padding_side="right"):
    """Yields (input_ids, attention_mask, labels) for consecutive slices of the examples."""
    ensure_pad_token(tokenizer)
    for start in range(0, len(examples), batch_size):
        encoded = [encode_example(tokenizer, ex, max_length) for ex in examples[start : start + batch_size]]
        yield collate([e[0] for e in encoded], tokenizer.pad_token_id, padding_side, [e[1] for e in encoded])
