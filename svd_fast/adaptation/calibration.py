"""Calibrating the steering strength mu once per task (SPEC 4).

Teacher-force the adapted and the base model over labelled examples; at every answer position the
fused `token_mu` op gives mu* (and its two terms); they are reduced to one scalar mu_bar. Only the answer
positions' logits are kept from a batch ([rows, answer tokens, V]); across batches they are kept while they
fit in `cache_bytes` (then the Newton passes below run no forward), else memory is bounded by one batch and
the per-position scalars. Under torch.distributed
each rank takes a shard and the per-position values are gathered, so every rank gets the same result.

The likelihood-optimal strength (reduce="nll"), svd_fast's addition to SPEC 4. The first-order mu* is a
per-token least-squares fit; what decoding uses is the steered distribution itself. On the answer tokens
t with labels y_t, for the mask (alpha) and fill of decoding,

    L(mu) = sum_t [ logsumexp_y z_hat_t(mu)[y] - z_hat_t(mu)[y_t] ],
    z_hat_t(mu)[y] = z_a[y] + mu * s[y],   s = delta on the keep set K, 0 off it ("keep"),
                                           lambda off it (finite fill); off K under fill = -inf the
                                           token leaves the softmax.

Every term is a log-sum-exp of functions affine in mu minus an affine function, so L is convex, with

    L'(mu)  = sum_t ( E_{p_hat_t}[s] - s(y_t) ),     L''(mu) = sum_t Var_{p_hat_t}[s] >= 0.

Under fill = -inf a position whose label is off K has infinite loss for every mu: it is left out of L
and counted (n_nll_excluded). The fused op `svd_fast.steered_nll` gives each position's three terms for
K strengths in one pass over its logits. The first pass evaluates L on a grid of strengths (NLL_GRID);
with reduce="nll" safeguarded Newton steps follow (one pass over the answer positions each, from the cache
or teacher-forced again), inside the bracket where L' changes sign, until the step is below 1e-4 (1 + |mu|) (L is flat
there: L'' per token ~0.03 on the demo, so that step changes L by ~1e-10 per token). Otherwise
mu_nll is the grid's estimate: one Newton step from the grid's best strength, kept inside its bracket.
"""
import dataclasses
import hashlib
import json
import math
import os
import warnings

import torch

from tqdm.auto import tqdm

from .. import ops
from .._version import __version__
from ..decoding import SteeredModel
from ..distributed import gather_tensors, rank_and_world
from ..statistics import bootstrap_ratio_ci
from .examples import batches, check_examples

REDUCERS = ("mean", "median", "trimmed", "ratio", "nll")
FIRST_ORDER_REDUCERS = REDUCERS[:4]
NLL_GRID = (-64.0, -32.0, -16.0, -8.0, -4.0, -2.0, -1.0, -0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0,
            8.0, 16.0, 32.0, 64.0)
NEWTON_MAX_STEPS = 12
NEWTON_TOLERANCE = 1e-4  # stop when the next Newton step is below this times (1 + |mu|)
MU_LIMIT = 1024.0  # |mu_nll| at most: where L still falls at the limit, its infimum lies at infinity
CONFIG_NAME = "steering_config.json"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CACHE_BYTES = 4 << 30  # answer-position logits kept across the passes (calibrate_sweep's cache_bytes)


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
    mu_nll: float = math.nan  # the minimiser of L(mu): exact with reduce="nll", else the grid's estimate
    nll_refined: bool = False  # whether Newton steps refined mu_nll
    nll_curve: dict = dataclasses.field(default_factory=dict)  # {"mu", "loss", "d_loss", "d2_loss"}: L / n on the grid
    nll_trace: list = dataclasses.field(default_factory=list)  # one {"mu", "loss", "d_loss", "d2_loss"} per Newton pass
    n_nll_tokens: int = 0     # positions in L
    n_nll_excluded: int = 0   # positions left out of L: label ruled out (fill=-inf), or NaN logits
    # the calibration NLL per token at mu = 0 and at mu_bar, their difference ("improvement", nats per token)
    # and its 95% bootstrap interval over examples
    nll_gain: dict = dataclasses.field(default_factory=dict)
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
        """Writes steering_config.json into `directory` (beside the adapter files); returns its path. Keys of an
        existing file that are not this result's fields stay (the evaluation harness keeps its alpha sweep there)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        kept = {}
        try:
            with open(path) as f:
                kept = {k: v for k, v in json.load(f).items() if k not in self.to_dict()}
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable: written anew
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({**kept, **self.to_dict()}, f, indent=2)
        os.replace(tmp, path)  # never a half-written config
        return path

    @classmethod
    def from_dict(cls, data):
        """The result of to_dict() (as read back from JSON)."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"values"}
        data = {k: v for k, v in data.items() if k in fields}
        if data.get("fill") in ("-inf", "inf"):
            data["fill"] = float(data["fill"])
        defaults = dict(reduce="mean", fill=float("-inf"), n_tokens=0, n_skipped=0, mean=math.nan, median=math.nan,
                        std=math.nan, quantiles={}, histogram={}, reductions={})
        return cls(**{**defaults, **data})

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
        missing = {"mu_bar", "alpha", "reduce"} - data.keys()
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: it is not a svd_fast steering config")
        return cls.from_dict(data)


def reduce_mu(mu_star, numerator=None, norm_sq=None, reduce="mean", trim=0.1, eps=1e-12):
    """mu_bar from per-position values (float64). `ratio` needs the numerators and norms.

    mean; median; trimmed: the mean of the (1 - trim) fraction of values closest to the median;
    ratio: sum numerator / (sum norm_sq + n eps). The sign is never clipped. ("nll" is not a reduction of
    mu*: calibrate() minimises L(mu) itself.)"""
    if reduce not in FIRST_ORDER_REDUCERS:
        raise ValueError(f"reduce must be one of {FIRST_ORDER_REDUCERS}, got {reduce!r}")
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


@torch.no_grad()
def answer_positions(z_a, z_b, targets):
    """The rows' answer positions only: z_a, z_b [B, T, V] and targets [B, T] (-100 off the answers) ->
    [B, A, V], [B, A, V], [B, A], A the most answer positions of a row; each row's positions in order, then
    -100 padding. Every per-position statistic of the calibration is unchanged, on T / A times fewer rows."""
    valid = targets != -100
    counts = valid.sum(1)
    width = max(int(counts.max()), 1) if targets.numel() else 1
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]  # answer positions first
    picked = order[..., None].expand(-1, -1, z_a.shape[-1])
    kept = torch.arange(width, device=targets.device) < counts[:, None]
    return z_a.gather(1, picked), z_b.gather(1, picked), torch.where(kept, targets.gather(1, order), -100)


def calibrate(peft_model, tokenizer, calib_examples, alpha=0.1, reduce="mean", batch_size=8, max_length=512,
              eps=1e-12, trim=0.1, fill=float("-inf"), adapter_name=None, progress=True, measure_gain=True,
              cache_bytes=CACHE_BYTES):
    """Per-position mu* over the answer tokens of `calib_examples`, reduced to mu_bar (SPEC 4).

    calib_examples: [{"prompt": str, "answer": str}, ...], disjoint from the warm-start data.
    reduce: "mean" (the paper's), "median", "trimmed", "ratio" (SPEC 4), or "nll": the exact minimiser of
    the steered NLL L(mu) of the answer tokens under this alpha and fill (module docstring; a grid pass,
    then one teacher-forced pass per Newton step). Every reducer's value is in `reductions`.
    measure_gain: the NLL at mu_bar for nll_gain; unless mu_bar is the exact strength (or a grid point) that
    costs one more teacher-forced pass, which measure_gain=False skips (nll_gain is then left empty).
    Returns a CalibrationResult (mu_bar, counts, mean, median, std, quantiles, histogram, the NLL curve on
    the grid, mu_nll and its Newton trace, nll_gain, ...). With reduce="nll" and ||delta_K||^2 < eps at
    every position the first-order statistics are NaN (any other reducer raises ValueError then).
    """
    return calibrate_sweep(peft_model, tokenizer, calib_examples, [alpha], reduce, batch_size, max_length, eps, trim,
                           fill, adapter_name, progress, measure_gain, cache_bytes)[alpha]


class _NllSearch:
    """Safeguarded Newton steps on the convex L(mu) of one alpha, started from its sums on the grid."""

    def __init__(self, mus, sums, n, excluded):
        loss, d_loss, d2_loss = (row.tolist() for row in sums)
        self.n, self.excluded, self.trace, self.at_limit = n, excluded, [], False
        self.curve = {"mu": list(mus), **{name: [v / max(n, 1) for v in values] for name, values in
                                          (("loss", loss), ("d_loss", d_loss), ("d2_loss", d2_loss))}}
        self.lo = max([mu for mu, d in zip(mus, d_loss) if d < 0], default=-math.inf)  # L' < 0 at lo, > 0 at hi
        self.hi = min([mu for mu, d in zip(mus, d_loss) if d > 0], default=math.inf)
        best = min(range(len(mus)), key=lambda i: (loss[i], abs(mus[i])))  # a flat L gives 0
        self.mu, self.d, self.d2 = mus[best], d_loss[best], d2_loss[best]
        self.best = (loss[best], mus[best])  # the lowest L evaluated so far, and where
        self.done = n == 0 or self.d == 0.0

    def candidate(self):
        """A step outward (doubling |mu|, up to MU_LIMIT) while L' has one sign over every strength so far;
        then the Newton step from the last point when it stays inside the bracket, else bisection."""
        if self.d == 0.0:
            return self.mu
        if math.isfinite(self.lo) and not math.isfinite(self.hi):  # L falls past the last strength: step out
            return min(MU_LIMIT, self.lo + 2.0 * max(1.0, abs(self.lo)))
        if math.isfinite(self.hi) and not math.isfinite(self.lo):
            return max(-MU_LIMIT, self.hi - 2.0 * max(1.0, abs(self.hi)))
        if self.d2 > 0:
            newton = self.mu - self.d / self.d2
            if self.lo < newton < self.hi:
                return newton
        return 0.5 * (self.lo + self.hi)

    def estimate(self):
        """mu_nll without Newton passes: the candidate inside a closed bracket, else the best strength
        evaluated (an outward step would be an extrapolation never evaluated)."""
        return self.candidate() if math.isfinite(self.lo) and math.isfinite(self.hi) else self.best[1]

    def update(self, mu, loss, d_loss, d2_loss):
        self.trace.append({"mu": mu, "loss": loss / self.n, "d_loss": d_loss / self.n, "d2_loss": d2_loss / self.n})
        self.best = min(self.best, (loss, mu))
        if d_loss < 0:
            self.lo = mu
        elif d_loss > 0:
            self.hi = mu
        self.mu, self.d, self.d2 = mu, d_loss, d2_loss
        tol = NEWTON_TOLERANCE * (1.0 + abs(mu))
        step = abs(d_loss / d2_loss) if d2_loss > 0 else math.inf
        self.at_limit = abs(mu) >= MU_LIMIT and (d_loss < 0 if mu > 0 else d_loss > 0)  # L still falls outward
        self.done = d_loss == 0.0 or step <= tol or self.hi - self.lo <= tol or self.at_limit


def _as_evaluated(mu):
    """mu as the op takes it (float32): the strength a pass actually evaluates, and the key it is kept under."""
    return float(torch.tensor(mu, dtype=torch.float32))


class _NllTotals:
    """steered_nll's outputs at K strengths summed over the calibration positions (float64): L, L', L'' and
    the count of positions in L and left out; and per example, its loss sums and its positions in L."""

    def __init__(self, strengths):
        self.mus = torch.as_tensor(strengths, dtype=torch.float32).reshape(-1)
        self.sums = torch.zeros(3, self.mus.numel(), dtype=torch.float64)
        self.n = self.excluded = 0
        self.example_loss, self.example_tokens = [], []

    def add(self, z_a, z_b, targets, alpha, fill):
        outputs = ops.steered_nll(z_a, z_b, targets, self.mus.to(z_a.device), alpha, fill)
        target = targets != -100
        usable = target & torch.isfinite(outputs[0][..., 0])
        for i, values in enumerate(outputs):
            self.sums[i] += torch.where(usable[..., None], values, 0.0).double().sum((0, 1)).cpu()
        self.example_loss.append(torch.where(usable[..., None], outputs[0], 0.0).double().sum(1).cpu())
        self.example_tokens.append(usable.sum(1).cpu())
        self.n += int(usable.sum())
        self.excluded += int((target & ~usable).sum())

    def gathered(self, n_examples):
        """Every rank's totals: (sums [3, K], n, excluded, per-example loss [examples, K], tokens [examples]),
        examples in the order of the calibration set (rank r held examples r, r + world, ...)."""
        k = self.mus.numel()
        empty = torch.zeros(0, k, dtype=torch.float64)
        flat = torch.cat([self.sums.reshape(-1), torch.tensor([self.n, self.excluded], dtype=torch.float64)])
        loss = torch.cat(self.example_loss) if self.example_loss else empty
        tokens = torch.cat(self.example_tokens).double() if self.example_tokens else torch.zeros(0, dtype=torch.float64)
        world = rank_and_world()[1]
        flat, loss, tokens = gather_tensors([flat, loss.reshape(-1), tokens])
        flat = flat.reshape(world, -1).sum(0)
        order = torch.cat([torch.arange(rank, n_examples, world) for rank in range(world)])
        example_loss, example_tokens = torch.empty(n_examples, k, dtype=torch.float64), torch.empty(n_examples)
        example_loss[order], example_tokens[order] = loss.reshape(-1, k), tokens.float()
        return flat[:3 * k].reshape(3, k), int(flat[3 * k]), int(flat[3 * k + 1]), example_loss, example_tokens


@torch.no_grad()
def calibrate_sweep(peft_model, tokenizer, calib_examples, alphas, reduce="mean", batch_size=8, max_length=512,
                    eps=1e-12, trim=0.1, fill=float("-inf"), adapter_name=None, progress=True, measure_gain=True,
                    cache_bytes=CACHE_BYTES):
    """calibrate() for several confidence masks from the same teacher-forced passes: {alpha: CalibrationResult}.

    cache_bytes: the answer positions' logits of both models (2 x rows x the batch's longest answer x V x the
    logits' element size: ~0.8 GB for 64 examples of ~6 answer tokens at Gemma 3's V = 262,144 in float32, on
    the model's device) are kept after the first pass when they fit in this many bytes, and the Newton passes
    and the gain's pass reuse them instead of running the model again (0: never; memory then stays bounded
    by one batch)."""
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
    ops._fill_args(fill)
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise ValueError(f"cache_bytes must be a non-negative int (0: no cache), got {cache_bytes!r}")
    steered = SteeredModel(peft_model, mu=0.0, alpha=alphas[0], fill=fill, adapter_name=adapter_name)
    rank, world = rank_and_world()
    shard = examples[rank::world]
    device = peft_model.get_base_model().device
    n_batches = math.ceil(len(shard) / batch_size)

    cache = {"batches": [], "bytes": 0, "complete": False}

    def teacher_forced(desc):
        """(z_a, z_b, targets) of every batch of this rank's shard at its answer positions only ([rows, A, V]:
        the logits predicting each answer token, and the token). Kept in memory while they fit in cache_bytes,
        so that the Newton passes need no forward."""
        if cache["complete"]:
            yield from cache["batches"]
            return
        if cache["bytes"] is not None:  # refilled by every pass until one completes
            cache["batches"], cache["bytes"] = [], 0
        for input_ids, mask, labels in tqdm(batches(tokenizer, shard, batch_size, max_length), total=n_batches,
                                            desc=desc, unit="batch", disable=not (progress and rank == 0)):
            z_a, z_b, _ = steered.logits_pair(input_ids.to(device), mask.to(device))
            batch = answer_positions(z_a[:, :-1], z_b[:, :-1], labels[:, 1:].to(device))
            if cache["bytes"] is not None:
                cache["bytes"] += sum(t.numel() * t.element_size() for t in batch)
                cache["batches"].append(batch)
                if cache["bytes"] > cache_bytes:
                    cache["batches"], cache["bytes"] = [], None  # too big: every pass runs the forwards
            yield batch
        cache["complete"] = cache["bytes"] is not None

    def evaluate(strengths, desc):
        """{alpha: gathered _NllTotals at strengths[alpha]} from one pass over the calibration set."""
        totals = {alpha: _NllTotals(mus) for alpha, mus in strengths.items()}
        for z_a, z_b, targets in teacher_forced(desc):
            for alpha, total in totals.items():
                total.add(z_a, z_b, targets, alpha, fill)
        return {alpha: total.gathered(len(examples)) for alpha, total in totals.items()}

    was_training = peft_model.training
    peft_model.eval()
    terms = {alpha: ([], [], []) for alpha in alphas}  # mu*, numerator, norm_sq of the valid positions
    grid = {alpha: _NllTotals(NLL_GRID) for alpha in alphas}
    n_targets = 0
    try:
        for z_a, z_b, targets in teacher_forced("calibrating mu"):
            n_targets += int((targets != -100).sum())
            for alpha in alphas:
                mu_star, valid, numerator, norm_sq = ops.token_mu(z_a, z_b, targets, alpha, eps, return_terms=True)
                for kept, value in zip(terms[alpha], (mu_star, numerator, norm_sq)):
                    kept.append(value[valid].double().cpu())
                grid[alpha].add(z_a, z_b, targets, alpha, fill)
        n_targets = int(gather_tensors([torch.tensor([n_targets])])[0].sum())
        if n_targets == 0:
            raise ValueError("the calibration examples have no answer tokens after tokenization (max_length too short?)")
        empty = torch.zeros(0, dtype=torch.float64)
        first_order = {alpha: gather_tensors([torch.cat(kept) if kept else empty for kept in terms[alpha]]) for alpha in alphas}
        for alpha, (mu_star, _, _) in first_order.items():
            if mu_star.numel() == 0 and reduce != "nll":  # the exact strength needs no mu*
                raise ValueError(f"all {n_targets} answer positions were skipped at alpha={alpha}: ||delta_K||^2 < "
                                 f"eps={eps} everywhere, i.e. the adapted and base models agree on them (is the "
                                 "adapter trained, or alpha too strict?)")
        # per alpha: {strength: (per-example loss sums, per-example tokens)} for the gain at the chosen strength
        evaluated = {alpha: {} for alpha in alphas}
        searches = {}
        for alpha in alphas:
            sums, n, excluded, example_loss, tokens = grid[alpha].gathered(len(examples))
            searches[alpha] = _NllSearch(NLL_GRID, sums, n, excluded)
            evaluated[alpha].update({mu: (example_loss[:, k], tokens) for k, mu in enumerate(NLL_GRID)})
        if reduce == "nll":
            _refine_nll(searches, evaluate, fill, evaluated)
        results = {alpha: _summarise(*first_order[alpha], n_targets, alpha, reduce, trim, eps, fill, searches[alpha],
                                     refined=reduce == "nll") for alpha in alphas}
        _measure_gains(results, evaluated, evaluate if measure_gain else None)
    finally:
        peft_model.train(was_training)
    config = peft_model.peft_config[steered.adapter]
    for result in results.values():
        result.base_model = getattr(config, "base_model_name_or_path", None)
        result.adapter = steered.adapter
        result.data_fingerprint = fingerprint(examples)
    return results


def _refine_nll(searches, evaluate, fill, evaluated):
    """Newton passes until every alpha's step is below tolerance: each pass evaluates L, L', L'' at each
    unfinished alpha's candidate over the whole calibration set."""
    for alpha, search in searches.items():
        if search.n == 0:
            raise ValueError(f"reduce='nll' at alpha={alpha}: all {search.excluded} answer positions have a label "
                             f"that fill={fill} rules out (outside the keep set); use fill='keep' or a smaller alpha")
    for step in range(1, NEWTON_MAX_STEPS + 1):
        pending = {alpha: [search.candidate()] for alpha, search in searches.items() if not search.done}
        if not pending:
            break
        for alpha, (sums, _, _, example_loss, tokens) in evaluate(pending, f"Newton step {step} for mu_nll").items():
            mu = _as_evaluated(pending[alpha][0])
            searches[alpha].update(mu, *(float(v) for v in sums[:, 0]))
            evaluated[alpha][mu] = (example_loss[:, 0], tokens)
    unbounded = {alpha: search.mu for alpha, search in searches.items() if search.at_limit}
    if unbounded:
        warnings.warn(f"mu_nll: the calibration NLL still falls at |mu| = {MU_LIMIT:g} for alpha {list(unbounded)} (its "
                      "infimum lies at infinity: steering that far pushes the kept tokens out); reporting "
                      f"{list(unbounded.values())}", RuntimeWarning, stacklevel=3)
    unfinished = [search for search in searches.values() if not search.done]
    for search in unfinished:
        search.mu = search.best[1]  # the lowest L evaluated, which the trace or the grid holds
    if unfinished:
        warnings.warn(f"mu_nll: Newton steps did not converge in {NEWTON_MAX_STEPS} passes for alpha "
                      f"{[a for a, s in searches.items() if not s.done]}; reporting the strengths with the lowest "
                      f"NLL evaluated, {[s.mu for s in unfinished]}", RuntimeWarning, stacklevel=3)


def _measure_gains(results, evaluated, evaluate):
    """Each result's nll_gain: the calibration NLL per token at mu = 0 and at its mu_bar, with a bootstrap
    interval of their difference over examples. A mu_bar that no pass evaluated costs one more pass (all
    alphas together); without `evaluate` such a result gets no nll_gain."""
    chosen = {alpha: _as_evaluated(r.mu_bar) for alpha, r in results.items()
              if math.isfinite(r.mu_bar) and r.n_nll_tokens}
    missing = {alpha: [mu] for alpha, mu in chosen.items() if mu not in evaluated[alpha]}
    if missing and evaluate is None:
        chosen = {alpha: mu for alpha, mu in chosen.items() if alpha not in missing}
    elif missing:
        for alpha, (_, _, _, example_loss, tokens) in evaluate(missing, "NLL at mu_bar").items():
            evaluated[alpha][missing[alpha][0]] = (example_loss[:, 0], tokens)
    for alpha, mu in chosen.items():
        at_zero, tokens = evaluated[alpha][0.0]
        at_mu, _ = evaluated[alpha][mu]
        total = float(tokens.sum())
        nll_zero, nll_mu = float(at_zero.sum()) / total, float(at_mu.sum()) / total
        lo, hi = bootstrap_ratio_ci((at_zero - at_mu).numpy(), tokens.numpy())
        results[alpha].nll_gain = {"mu": mu, "nll_at_zero": nll_zero, "nll_at_mu": nll_mu,
                                   "improvement": nll_zero - nll_mu, "ci": [lo, hi], "n_examples": len(tokens)}


def _summarise(mu_star, numerator, norm_sq, n_targets, alpha, reduce, trim, eps, fill, search, refined):
    mu_nll = (search.mu if refined else search.estimate()) if search.n else math.nan
    if mu_star.numel() == 0:  # reduce="nll" with ||delta_K||^2 < eps everywhere: no mu* to summarise
        reductions = {**{name: math.nan for name in FIRST_ORDER_REDUCERS}, "nll": mu_nll}
        return CalibrationResult(
            mu_bar=mu_nll, reduce=reduce, alpha=alpha, fill=fill, n_tokens=0, n_skipped=n_targets, mean=math.nan,
            median=math.nan, std=math.nan, quantiles={}, histogram={}, reductions=reductions, trim=trim,
            mu_nll=mu_nll, nll_refined=refined, nll_curve=search.curve, nll_trace=search.trace,
            n_nll_tokens=search.n, n_nll_excluded=search.excluded, values=mu_star)
    reductions = {name: reduce_mu(mu_star, numerator, norm_sq, name, trim, eps) for name in FIRST_ORDER_REDUCERS}
    reductions["nll"] = mu_nll
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
        reductions=reductions, trim=trim, mu_nll=mu_nll, nll_refined=refined, nll_curve=search.curve,
        nll_trace=search.trace, n_nll_tokens=search.n, n_nll_excluded=search.excluded, values=mu_star)
