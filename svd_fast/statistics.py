"""The project's statistics, in one place below the parts that use them: bootstrap intervals (of a mean, and
of a ratio of sums), the paired test and its minimum detectable effect, a benchmark cell's summary and a
pooled paired comparison. Used by the calibration (the NLL gain's
interval) and the evaluation harness. numpy only."""
import math

import numpy as np


def bootstrap_ci(values, draws=2000, seed=0):
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def bootstrap_ratio_ci(numerators, denominators, draws=2000, seed=0):
    """95% percentile interval of sum(numerators) / sum(denominators) over units resampled with replacement
    (e.g. per-question NLL sums over per-question token counts: a per-token figure, questions as the unit)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(num), (draws, len(num)))
    den_sums = den[picks].sum(1)
    ratios = num[picks].sum(1) / np.where(den_sums > 0, den_sums, np.nan)
    return [float(np.nanquantile(ratios, 0.025)), float(np.nanquantile(ratios, 0.975))]


def paired_test(baseline, treated, draws=10000, seed=0):
    """Two-sided sign-flip permutation test of mean(treated - baseline) = 0 (McNemar's test for 0/1 values)."""
    diff = np.asarray(treated, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    diff = diff[diff != 0]
    if len(diff) == 0:
        return 1.0
    observed = abs(diff.sum())
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(draws, len(diff)))
    return float(((np.abs((signs * diff).sum(1)) >= observed - 1e-12).sum() + 1) / (draws + 1))


def summarise_cell(per_question, metrics, baseline="adapter", treated="steered"):
    """{metric: {variant: {"mean", "ci"}, "delta": {...}, "p": ...}} for one benchmark's per-question
    metrics ([{variant: {metric: value}}]) and the names of its metrics."""
    out = {}
    for metric in metrics:
        by_variant = {name: [q[name][metric] for q in per_question] for name in per_question[0]}
        entry = {name: {"mean": float(np.mean(v)), "ci": bootstrap_ci(v)} for name, v in by_variant.items()}
        if baseline in by_variant and treated in by_variant:
            diff = np.asarray(by_variant[treated]) - np.asarray(by_variant[baseline])
            entry["delta"] = {"mean": float(diff.mean()), "ci": bootstrap_ci(diff)}
            entry["p"] = paired_test(by_variant[baseline], by_variant[treated])
        out[metric] = entry
    return out


Z_975, Z_80 = 1.959963984540054, 0.8416212335729143  # standard normal quantiles: two-sided 5% test, 80% power


MIN_CHANGED = 6  # with fewer nonzero paired differences no sign-flip test reaches p < 0.05 (2 / 2^5 = 0.0625)


def minimum_detectable_effect(diff):
    """The smallest true mean of the paired differences `diff` a two-sided 5% test detects with 80% power,
    (z_0.975 + z_0.8) * sd(diff) / sqrt(n) (normal approximation, sd as observed). For 0/1 outcomes sd is
    about sqrt(share of questions whose outcome changed). NaN with fewer than MIN_CHANGED nonzero
    differences: there no effect of that variance is detectable at all, and the approximation would
    report a tiny one."""
    diff = np.asarray(diff, dtype=np.float64)
    if len(diff) < 2 or int((diff != 0).sum()) < MIN_CHANGED:
        return math.nan
    return float((Z_975 + Z_80) * diff.std(ddof=1) / math.sqrt(len(diff)))


def paired_comparison(baseline, treated):
    """{"n", "baseline", "treated", "delta", "ci", "p", "mde", "changed"} for paired per-unit values
    (e.g. every question of a job pooled): means, the mean difference with its 95% bootstrap interval, the
    sign-flip test's p, its minimum detectable effect and the units whose value changed."""
    baseline, treated = np.asarray(baseline, dtype=np.float64), np.asarray(treated, dtype=np.float64)
    diff = treated - baseline
    return {"n": len(diff), "baseline": float(baseline.mean()), "treated": float(treated.mean()),
            "delta": float(diff.mean()), "ci": bootstrap_ci(diff), "p": paired_test(baseline, treated),
            "mde": minimum_detectable_effect(diff), "changed": int((diff != 0).sum())}
