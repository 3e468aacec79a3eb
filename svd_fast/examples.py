"""Labelled examples {"prompt": str, "answer": str} as token batches for training and teacher forcing.

The loss and the calibration positions are the answer tokens only: prompt and padding get label -100.
"""
import warnings

import torch

IGNORE_INDEX = -100
_warned_pad = set()


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


def ensure_pad_token(tokenizer):
    """Tokenizers without a pad token get their EOS token as pad (one warning per tokenizer class)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
        name = type(tokenizer).__name__
        if name not in _warned_pad:
            _warned_pad.add(name)
            warnings.warn(f"{name} has no pad token; using its EOS token {tokenizer.eos_token!r} as pad", UserWarning,
                          stacklevel=3)
    return tokenizer


def encode_example(tokenizer, example, max_length=512):
    """(input_ids, labels) lists: prompt tokens then answer tokens; labels -100 on the prompt."""
    prompt_ids = tokenizer(example["prompt"], add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[-max_length:]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[-max_length:]
    return ids, labels


def collate(sequences, pad_id, padding_side="right", label_sequences=None):
    """Pads lists of ids to a batch: (input_ids, attention_mask[, labels]) tensors."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long) if label_sequences else None
    for i, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[i, span] = torch.tensor(seq, dtype=torch.long)
        mask[i, span] = 1
        if labels is not None:
            labels[i, span] = torch.tensor(label_sequences[i], dtype=torch.long)
    return (ids, mask) if labels is None else (ids, mask, labels)


def batches(tokenizer, examples, batch_size, max_length=512, padding_side="right"):
    """Yields (input_ids, attention_mask, labels) for consecutive slices of the examples."""
    ensure_pad_token(tokenizer)
    for start in range(0, len(examples), batch_size):
        encoded = [encode_example(tokenizer, ex, max_length) for ex in examples[start : start + batch_size]]
        yield collate([e[0] for e in encoded], tokenizer.pad_token_id, padding_side, [e[1] for e in encoded])
