"""Tables and plots of an evaluation run (results.json -> results.md, plots/*.png)."""
import os

import numpy as np

from .data import metric_names

ROBUSTNESS = ("nll", "median", "trimmed", "ratio", "no_mask", "alpha=0.3", "alpha=0.5", "alpha=0.7", "alpha=0.9",
              "mu=-1", "mu=+1", "mu=+3")


def _pct(x):
    return f"{100 * x:.1f}"


def _rows(results):
    for cell in results["cells"]:
        for metric in metric_names(cell["benchmark"]):
            yield cell, metric, cell["summary"][metric]


def _job(cell):
    return cell["job"] + (f" ({cell['protocol']})" if cell["protocol"] != "loglik" else "")


def markdown(results):
    """Two tables: adapter vs steered with intervals and paired p-values; then every other variant's change."""
    lines = ["| job | benchmark | metric | n | base | adapter | steered (mu_bar) | change [95% CI] | p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell, metric, s in _rows(results):
        d = s["delta"]
        lines.append(f"| {_job(cell)} | {cell['benchmark']} | {metric} | {cell['n']} | "
                     f"{_pct(s['base']['mean']) if 'base' in s else '-'} | {_pct(s['adapter']['mean'])} | "
                     f"{_pct(s['steered']['mean'])} ({cell['mu_bar']:+.2f}) | {100 * d['mean']:+.1f} "
                     f"[{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}] | {s['p']:.3f} |")
    lines += ["", *_averages(results), ""]
    for job, error in results.get("failed", {}).items():
        lines.append(f"**{job} failed** (a rerun retries it): {error}  ")
    present = [v for v in ROBUSTNESS if any(v in s for _, _, s in _rows(results))]
    if present:
        lines += ["Change vs the adapter (points) under other mu reducers, masks and fixed mu:", "",
                  "| job | benchmark | metric | " + " | ".join(present) + " |",
                  "|---|---|---|" + "---|" * len(present)]
        for cell, metric, s in _rows(results):
            changes = [f"{100 * (s[v]['mean'] - s['adapter']['mean']):+.1f}" if v in s else "-" for v in present]
            lines.append(f"| {_job(cell)} | {cell['benchmark']} | {metric} | " + " | ".join(changes) + " |")
    lines += _calibration_table(results)
    return "\n".join(lines) + "\n"


def _calibration_table(results):
    """Per job (alpha = 0.1): every reducer's strength, and the calibration NLL per token at mu = 0 and at the
    exact strength (the gain a user can read before any evaluation)."""
    rows = []
    for job, calibrations in results.get("calibration", {}).items():
        main = calibrations.get("0.1", {})
        gain, reductions = main.get("nll_gain"), main.get("reductions", {})
        if not gain or "nll" not in reductions:
            continue
        strengths = " | ".join(f"{reductions.get(name, float('nan')):+.3f}" for name in
                               ("mean", "median", "trimmed", "ratio", "nll"))
        rows.append(f"| {job} | {strengths} | {gain['nll_at_zero']:.4f} | {gain['nll_at_mu']:.4f} | "
                    f"{gain['improvement']:+.4f} [{gain['ci'][0]:+.4f}, {gain['ci'][1]:+.4f}] |")
    if not rows:
        return []
    return ["", "Strengths from the calibration split (alpha 0.1) and its NLL per answer token (nats) at mu = 0 and at "
            "the exact strength nll (fill keep; interval: 95% bootstrap over calibration examples):", "",
            "| job | mean (paper) | median | trimmed | ratio | nll | NLL at 0 | NLL at nll | improvement [95% CI] |",
            "|---|---|---|---|---|---|---|---|---|", *rows]


def _averages(results):
    """Per job: the average over its benchmarks' metrics (the paper's headline numbers)."""
    by_job = {}
    for cell, metric, s in _rows(results):
        by_job.setdefault(_job(cell), []).append(s)
    lines = ["| job | average of | adapter | steered | change | steered better / worse |", "|---|---|---|---|---|---|"]
    for job, entries in by_job.items():
        a = np.mean([e["adapter"]["mean"] for e in entries])
        st = np.mean([e["steered"]["mean"] for e in entries])
        better = sum(e["steered"]["mean"] > e["adapter"]["mean"] for e in entries)
        worse = sum(e["steered"]["mean"] < e["adapter"]["mean"] for e in entries)
        lines.append(f"| {job} | {len(entries)} metrics | {_pct(a)} | {_pct(st)} | {100 * (st - a):+.1f} | "
                     f"{better} / {worse} |")
    return lines


def plot(results, folder):
    """plots/<job>.png (bars with 95% intervals per benchmark), plots/<job>_mu.png (mu* histogram) and
    plots/<job>_nll.png (the calibration NLL curve with every reducer's strength)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = []
    by_job = {}
    for cell, metric, s in _rows(results):
        by_job.setdefault(_job(cell).replace(" (", "_").rstrip(")"), []).append((f"{cell['benchmark']}" + (f" {metric}" if metric != "acc" else ""),
                                                   s))
    for job, entries in by_job.items():
        names = [n for n in ("base", "adapter", "steered") if n in entries[0][1]]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(entries) + 2), 3.6))
        width = 0.8 / len(names)
        for k, name in enumerate(names):
            means = np.array([e[name]["mean"] for _, e in entries])
            ci = np.array([e[name]["ci"] for _, e in entries])
            x = np.arange(len(entries)) + (k - (len(names) - 1) / 2) * width
            ax.bar(x, 100 * means, width, label=name, yerr=100 * np.abs(ci.T - means), capsize=2)
        ax.set_xticks(np.arange(len(entries)), [label for label, _ in entries], rotation=30, ha="right")
        ax.set_ylabel("score (%)")
        ax.set_title(f"{job}: adapter vs steered (95% bootstrap intervals)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(folder, f"{job}.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    for job, calibrations in results.get("calibration", {}).items():
        main = calibrations.get("0.1")
        if not main or not main.get("histogram"):
            continue
        edges, counts = np.array(main["histogram"]["edges"]), np.array(main["histogram"]["counts"])
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(edges[:-1], counts, np.diff(edges), align="edge", edgecolor="black", linewidth=0.4)
        ax.axvline(main["mean"], color="C3", label=f"mean {main['mean']:+.2f}")
        ax.axvline(main["median"], color="C2", linestyle="--", label=f"median {main['median']:+.2f}")
        ax.set_xlabel("per-token mu* (clipped to its 1%-99% range)")
        ax.set_ylabel("tokens")
        ax.set_title(f"{job}: mu* (n={main['n_tokens']}, std {main['std']:.2f})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(folder, f"{job}_mu.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
        if main.get("nll_curve"):
            paths.append(plot_nll_curve(main, os.path.join(folder, f"{job}_nll.png"), title=job))
    return paths


def plot_nll_curve(calibration, path, title=""):
    """The calibration NLL per token L(mu)/n on the grid and at the Newton steps (symlog strength axis), with
    a vertical line at every reducer's strength. Writes `path` (PNG); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve, trace = calibration["nll_curve"], calibration.get("nll_trace", [])
    points = sorted(zip(curve["mu"] + [t["mu"] for t in trace], curve["loss"] + [t["loss"] for t in trace]))
    styles = {"mean": ("C3", "-"), "median": ("C2", "--"), "trimmed": ("C4", ":"), "ratio": ("C5", "-."),
              "nll": ("black", "-")}
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.5))
    for ax, zoom in zip(axes, (False, True)):
        shown = [(m, v) for m, v in points if not zoom or abs(m) <= 2.0]
        ax.plot([m for m, _ in shown], [v for _, v in shown], "o-", color="C0", markersize=3, label="L(mu) / n")
        ax.plot([t["mu"] for t in trace], [t["loss"] for t in trace], "x", color="C1", label="Newton steps")
        for name, mu in calibration.get("reductions", {}).items():
            color, style = styles.get(name, ("grey", ":"))
            ax.axvline(mu, color=color, linestyle=style, linewidth=1, label=f"{name} {mu:+.3f}")
        if zoom:
            ax.set_xlim(-2.0, 2.0)
            ax.set_title("|mu| <= 2", fontsize=9)
        else:
            ax.set_xscale("symlog", linthresh=0.25)
            ax.set_ylabel("calibration NLL per token (nats)")
            ax.set_title(f"{title}: steered NLL, alpha {calibration.get('alpha', '')}, fill "
                         f"{calibration.get('fill', '')}", fontsize=9)
        ax.set_xlabel("strength mu")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _write(out, text, draw):
    """out/results.md, then the plots `draw()` makes (skipped, said once, without matplotlib)."""
    path = os.path.join(out, "results.md")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    try:
        draw()
    except ImportError:
        print("svd_fast: matplotlib is not installed, so no plots (pip install matplotlib)")
    return path


def write_report(results, out):
    return _write(out, markdown(results), lambda: plot(results, os.path.join(out, "plots")))


# ---------------------------------------------------------------------------------------------------
# The pooled matrix (evaluation.matrix): one paired test per (model, method, task, metric, variant).


def _points(x):
    return f"{100 * x:+.1f}"


def _row_label(row):
    """model | method | task | metric; a task whose cells are not all done yet (a run in parts) says so."""
    expected = row.get("expected_cells", row["cells"])
    task = row["task"] + (f" ({row['cells']} of {expected} cells so far)" if row["cells"] < expected else "")
    return f"{row['model']} | {row['method']} | {task} | {row['metric']}"


def pooled_markdown(results):
    """The learning-rate sweeps, the pooled tests of the paper's steering and the exact strength against the
    adapter (with each test's minimum detectable effect), every other variant's change, LoRA per seed, and
    the timing."""
    sizes = results["sizes"]
    lines = [f"Pooled paired tests (sign-flip permutation over distinct questions, a question tested under several "
             f"seeds counted once with its outcomes averaged; 95% bootstrap intervals; MDE = the change a two-sided 5% "
             f"test detects with 80% power, '-' where fewer than 6 questions changed and no test can reach p < "
             f"0.05; conditional on the trained adapters). Sizes per commonsense set: {sizes['train']} train / {sizes['calib']} "
             f"calibration / {sizes['test']} test; TruthfulQA by {results['folds']}-fold cross-validation "
             f"({sizes['tqa_calib']} calibration questions per fold); LoRA at {results['seeds']} seeds. Points are "
             "percentage points (MC2: points of probability mass).", "",
             "Learning rates (answer NLL per token on the calibration split after the warm start; chosen: lowest):",
             "", "| model | method | " + " | ".join(["rate: NLL"] * 3) + " | chosen |", "|---|---|---|---|---|---|"]
    for model, by_method in results["learning_rates"].items():
        for method, sweep in by_method.items():
            cells = [f"{lr}: {'diverged' if nll is None else f'{nll:.4f}'}" for lr, nll in sweep["nll"].items()]
            lines.append(f"| {model} | {method} | " + " | ".join(cells + ["-"] * (3 - len(cells))) +
                         f" | {sweep.get('chosen', '-')} |")
    lines += ["", "| model | method | task | metric | n | base | adapter | steered (mean) change [95% CI] | p | MDE | "
              "nll change [95% CI] | p | MDE |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["pooled"]:
        v = row["variants"]
        main = [f"{_points(c['delta'])} [{_points(c['ci'][0])}, {_points(c['ci'][1])}] | {c['p']:.3f} | "
                + (f"{100 * c['mde']:.1f}" if c["mde"] == c["mde"] else f"- ({c['changed']} changed)")
                if c else "- | - | -" for c in (v.get("steered"), v.get("nll"))]
        lines.append(f"| {_row_label(row)} | {v['steered']['n']} | {_pct(v['base']['treated'])} | "
                     f"{_pct(v['steered']['baseline'])} | {main[0]} | {main[1]} |")
    others = [name for name in ("base", "median", "trimmed", "ratio", "no_mask", "alpha=0.3", "alpha=0.5", "alpha=0.7",
                                "alpha=0.9", "mu=-1", "mu=+1", "mu=+3")
              if any(name in row["variants"] for row in results["pooled"])]
    lines += ["", "Every other variant against the adapter (change in points; * p < 0.05, ** p < 0.01):", "",
              "| model | method | task | metric | " + " | ".join(others) + " |", "|---|---|---|---|" + "---|" * len(others)]
    for row in results["pooled"]:
        marks = []
        for name in others:
            c = row["variants"].get(name)
            marks.append("-" if c is None else _points(c["delta"]) + ("**" if c["p"] < 0.01 else "*" if c["p"] < 0.05
                                                                       else ""))
        lines.append(f"| {_row_label(row)} | " + " | ".join(marks) + " |")
    seeded = [row for row in results["pooled"] if row["per_seed"]]
    if seeded:
        lines += ["", "Steered (mean) against the adapter per seed (warm-start seed and split):", "",
                  "| model | method | task | metric | " + " | ".join(f"seed {s}" for s in seeded[0]["per_seed"]) + " |",
                  "|---|---|---|---|" + "---|" * len(seeded[0]["per_seed"])]
        for row in seeded:
            lines.append(f"| {_row_label(row)} | " + " | ".join(
                f"{_pct(c['baseline'])} -> {_pct(c['treated'])} (p {c['p']:.2f})" for c in row["per_seed"].values()) + " |")
    for job, error in results.get("failed", {}).items():
        lines += ["", f"**{job} failed** (a rerun retries it; a method whose sweep failed has no seeds or folds): "
                      f"{error}"]
    if results["timing_s"]:
        total = sum(results["timing_s"].values())
        lines += ["", f"Wall time (summed over the parts the run was done in): {total / 60:.1f} min", "",
                  "| stage | minutes |", "|---|---|",
                  *(f"| {stage} | {seconds / 60:.1f} |" for stage, seconds in results["timing_s"].items())]
    return "\n".join(lines) + "\n"


def plot_pooled(results, path):
    """The pooled change (steered mean and exact strength, 95% intervals) of every (model, method, task,
    metric), with its minimum detectable effect shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["pooled"] if "steered" in r["variants"]]
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(rows) + 1.4))
    for k, row in enumerate(rows):
        mde = 100 * row["variants"]["steered"]["mde"]
        if mde == mde:  # NaN: too few questions changed for any test
            ax.fill_betweenx([k - 0.4, k + 0.4], -mde, mde, color="0.9")
        for offset, (name, color) in zip((-0.15, 0.15), (("steered", "C3"), ("nll", "C0"))):
            c = row["variants"].get(name)
            if c:
                ax.errorbar(100 * c["delta"], k + offset, xerr=[[100 * (c["delta"] - c["ci"][0])],
                                                                [100 * (c["ci"][1] - c["delta"])]],
                            fmt="o", color=color, markersize=3, capsize=2, label=name if k == 0 else None)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_yticks(range(len(rows)), [_row_label(r).replace(" | ", " ") for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("change against the adapter (points; grey: +/- minimum detectable effect)")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Pooled paired changes: steered (paper's mean) and exact strength (nll)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_pooled_report(results, out):
    return _write(out, pooled_markdown(results), lambda: plot_pooled(results, os.path.join(out, "plots", "pooled.png")))
