"""Calibrating the steering strength mu once per task (SPEC 4).

Teacher-force the adapted and the base model over labelled examples; at every answer position the
fused `token_mu` op gives mu* (and its two terms); they are reduced to one scalar mu_bar. Memory is
bounded by one batch: only the per-position scalars are kept across batches. Under torch.distributed
each rank takes a shard and the per-position values are gathered, so every rank gets the same result.
"""
import dataclasses
import hashlib
import json
import math
import os

import torch

from tqdm.auto import tqdm

from .. import ops
from .._version import __version__
from ..decoding import SteeredModel
from .examples import batches, check_examples

REDUCERS = ("mean", "median", "trimmed", "ratio")
CONFIG_NAME = "steering_config.json"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclasses.dataclass
class CalibrationResult:
    """mu_bar and what it was computed from. `values` (per-position mu*) is kept in memory only."""

    mu_bar: float
    reduce: str
    alpha: float
    fill: object
    n_tokens: int            # positions that gave a mu*
    n_skipped: int           # answer positions with ||delta_K||^2 < eps
    mean: float
    median: float
    std: float
    quantiles: dict
    histogram: dict          # {"edges": [...], "counts": [...]} over the 1%-99% range
    reductions: dict         # mu_bar under every reducer, for comparison
    trim: float = 0.1
    base_model: str = None
    adapter: str = None
    data_fingerprint: str = None
    library_version: str = __version__
    values: torch.Tensor = dataclasses.field(default=None, repr=False, compare=False)

    def to_dict(self):
        data = dataclasses.asdict(self)
        data.pop("values")
        data["fill"] = self.fill if isinstance(self.fill, str) or math.isfinite(self.fill) else str(self.fill)
        return data

    def save(self, directory):
        """Writes steering_config.json into `directory` (beside the adapter files); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        os.replace(tmp, path)  # never a half-written config
        return path

    @classmethod
    def load(cls, directory):
        path = directory if directory.endswith(".json") else os.path.join(directory, CONFIG_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: run svd_fast.calibrate(...) and .save() first")
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): recalibrate to rewrite it") from None
        fields = {f.name for f in dataclasses.fields(cls)} - {"values"}
        missing = {"mu_bar", "alpha", "reduce"} - data.keys()
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: it is not a svd_fast steering config")
        data = {k: v for k, v in data.items() if k in fields}
        if data.get("fill") in ("-inf", "inf"):
            data["fill"] = float(data["fill"])
        defaults = dict(reduce="mean", fill=float("-inf"), n_tokens=0, n_skipped=0, mean=math.nan, median=math.nan,
                        std=math.nan, quantiles={}, histogram={}, reductions={})
        return cls(**{**defaults, **data})


def reduce_mu(mu_star, numerator=None, norm_sq=None, reduce="mean", trim=0.1, eps=1e-12):
    """mu_bar from per-position values (float64). `ratio` needs the numerators and norms.

    mean; median; trimmed: the mean of the (1 - trim) fraction of values closest to the median;
    ratio: sum numerator / (sum norm_sq + n eps). The sign is never clipped."""
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {REDUCERS}, got {reduce!r}")
    if not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must lie in [0, 1), got {trim}")
    values = mu_star.double()
    if reduce == "mean":
        return float(values.mean())
    if reduce == "median":
        return float(values.median())
    if reduce == "trimmed":
        distance = (values - values.median()).abs()
        keep = max(1, int(math.ceil(len(values) * (1.0 - trim))))
        return float(values[distance.argsort()[:keep]].mean())
    if numerator is None or norm_sq is None:
        raise ValueError("reduce='ratio' needs the numerators and norms (token_mu(..., return_terms=True))")
    return float(numerator.double().sum() / (norm_sq.double().sum() + len(values) * eps))


def fingerprint(examples):
    """A short hash of the calibration data, to tell later which data a mu_bar came from."""
    blob = json.dumps([[ex["prompt"], ex["answer"]] for ex in examples], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(tensors):
    """Concatenates each rank's 1-D tensors in rank order (identity without torch.distributed)."""
    if not _distributed():
        return tensors
    world = torch.distributed.get_world_size()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, [t.cpu() for t in tensors])
    return [torch.cat([g[i] for g in gathered]) for i in range(len(tensors))]


@torch.no_grad()
def calibrate(peft_model, tokenizer, calib_examples, alpha=0.1, reduce="mean", batch_size=8, max_length=512,
              eps=1e-12, trim=0.1, fill=float("-inf"), adapter_name=None, progress=True):
    """Per-position mu* over the answer tokens of `calib_examples`, reduced to mu_bar (SPEC 4).

    calib_examples: [{"prompt": str, "answer": str}, ...], disjoint from the warm-start data.
    Returns a CalibrationResult (mu_bar, counts, mean, median, std, quantiles, histogram, ...).
    """
    return calibrate_sweep(peft_model, tokenizer, calib_examples, [alpha], reduce, batch_size, max_length, eps, trim,
                           fill, adapter_name, progress)[alpha]


@torch.no_grad()
def calibrate_sweep(peft_model, tokenizer, calib_examples, alphas, reduce="mean", batch_size=8, max_length=512,
                    eps=1e-12, trim=0.1, fill=float("-inf"), adapter_name=None, progress=True):
    """calibrate() for several confidence masks from one teacher-forced pass: {alpha: CalibrationResult}."""
    examples = check_examples(calib_examples, "calib_examples")
    alphas = list(alphas)
    if not alphas:
        raise ValueError("alphas is empty: give at least one alpha in (0, 1]")
    for alpha in alphas:
        ops._check_alpha(alpha)
    if reduce not in REDUCERS:
        raise ValueError(f"reduce must be one of {REDUCERS}, got {reduce!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    steered = SteeredModel(peft_model, mu=0.0, alpha=alphas[0], fill=fill, adapter_name=adapter_name)
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _distributed() else (0, 1)
    shard = examples[rank::world]
    device = peft_model.get_base_model().device
    was_training = peft_model.training
    peft_model.eval()
    terms = {alpha: ([], [], []) for alpha in alphas}  # mu*, numerator, norm_sq of the valid positions
    n_targets = 0
    n_batches = math.ceil(len(shard) / batch_size)
    try:
        for input_ids, mask, labels in tqdm(batches(tokenizer, shard, batch_size, max_length), total=n_batches,
                                            desc="calibrating mu", unit="batch", disable=not (progress and rank == 0)):
            z_a, z_b, _ = steered.logits_pair(input_ids.to(device), mask.to(device))
            targets = labels[:, 1:].to(device)  # logits at t predict the token at t + 1
            n_targets += int((targets != -100).sum())
            for alpha in alphas:
                mu_star, valid, numerator, norm_sq = ops.token_mu(z_a[:, :-1], z_b[:, :-1], targets, alpha, eps,
                                                                  return_terms=True)
                for kept, value in zip(terms[alpha], (mu_star, numerator, norm_sq)):
                    kept.append(value[valid].double().cpu())
    finally:
        peft_model.train(was_training)
    n_targets = int(_gather([torch.tensor([n_targets])])[0].sum())
    if n_targets == 0:
        raise ValueError("the calibration examples have no answer tokens after tokenization (max_length too short?)")
    config = peft_model.peft_config[steered.adapter]
    empty = torch.zeros(0, dtype=torch.float64)
    results = {}
    for alpha in alphas:
        mu_star, numerator, norm_sq = _gather([torch.cat(kept) if kept else empty for kept in terms[alpha]])
        if mu_star.numel() == 0:
            raise ValueError(f"all {n_targets} answer positions were skipped at alpha={alpha}: ||delta_K||^2 < eps={eps} "
                             "everywhere, i.e. the adapted and base models agree on them (is the adapter trained, "
                             "or alpha too strict?)")
        results[alpha] = _summarise(mu_star, numerator, norm_sq, n_targets, alpha, reduce, trim, eps, fill)
        results[alpha].base_model = getattr(config, "base_model_name_or_path", None)
        results[alpha].adapter = steered.adapter
        results[alpha].data_fingerprint = fingerprint(examples)
    return results


def _summarise(mu_star, numerator, norm_sq, n_targets, alpha, reduce, trim, eps, fill):
    reductions = {name: reduce_mu(mu_star, numerator, norm_sq, name, trim, eps) for name in REDUCERS}
    low, high = torch.quantile(mu_star, torch.tensor([0.01, 0.99], dtype=torch.float64)).tolist()
    if high <= low:
        low, high = low - 0.5, high + 0.5
    counts, edges = torch.histogram(mu_star.clamp(low, high), bins=20, range=(low, high))
    return CalibrationResult(
        mu_bar=reductions[reduce], reduce=reduce, alpha=alpha, fill=fill, n_tokens=int(mu_star.numel()),
        n_skipped=n_targets - int(mu_star.numel()), mean=float(mu_star.mean()), median=float(mu_star.median()),
        std=float(mu_star.std()) if mu_star.numel() > 1 else 0.0,
        quantiles={str(q): v for q, v in zip(QUANTILES, torch.quantile(
            mu_star, torch.tensor(QUANTILES, dtype=torch.float64)).tolist())},
        histogram={"edges": edges.tolist(), "counts": [int(c) for c in counts.tolist()]},
        reductions=reductions, trim=trim, values=mu_star)
