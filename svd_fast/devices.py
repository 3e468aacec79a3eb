"""Where a model runs and in which dtype, from the names users give: "auto", "cpu", "cuda", "cuda:N";
"auto", "float32", "bfloat16", "float16". A device this machine lacks is one clear error."""
import torch

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device="auto"):
    """torch.device for "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"; a CUDA device
    this machine lacks is one clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda (cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA device here: "
                             "use --device cpu (or auto)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s) (under torchrun: one process per GPU, --nproc-per-node at most that many)")
    elif resolved.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda (cuda:N)")
    return resolved


def resolve_dtype(dtype="auto", device="cpu"):
    """torch dtype of the weights: "auto" is bfloat16 on CUDA (float16 on GPUs without native bf16) and float32
    on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        device = torch.device(device)
        if device.type != "cuda":
            return torch.float32
        with torch.cuda.device(device):  # native bf16 only (Ampere and later), not emulated
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)
