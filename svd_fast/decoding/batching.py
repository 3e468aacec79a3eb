"""Token id lists as padded model input, and the pad token a tokenizer may lack: shared by steered scoring,
the warm start, calibration and the evaluation harness."""
import warnings

import torch

IGNORE_INDEX = -100  # the label of positions that are no target (prompt, padding)
_warned_pad = set()


def positions_from_mask(attention_mask):
    """Position ids of left-padded rows, as HF generate computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
