"""The committed matrix (`svd-fast eval --preset matrix`): both packaged models, four PEFT methods, the eight
commonsense sets and TruthfulQA MC, every variant from one scoring pass, and pooled paired tests.

Per model, in its own run folder `out/<model>/` (the harness's layout, resumable stage by stage):

1. One commonsense job per method at seed 0 with a learning-rate sweep (`LR_GRIDS`): a warm start at each
   rate, the one with the lowest answer NLL on the calibration split kept (the test split is never seen).
2. LoRA at seeds 1 .. SEEDS-1 (another warm-start seed and another split) at LoRA's chosen rate.
3. TruthfulQA by FOLDS-fold cross-validation per method, at the rate its commonsense sweep chose: every one
   of the 299 questions is scored once, by an adapter trained and calibrated on the other folds.

Then `out/results.json` and `out/results.md` pool every question of a (model, method, task) across its sets,
seeds and folds into one paired test per variant against the adapter (a question in several seeds' test sets
counts once, its outcomes averaged), with the test's minimum detectable effect; `out/timing.json` adds up each stage's wall time over the parts a run was done in.
"""
import dataclasses
import json
import os
import sys
import time

from . import data as datasets_
from .harness import Job, Sizes, _read_json, _write_json, chosen_learning_rate, collect, run
from ..distributed import is_main
from ..statistics import paired_comparison

MODELS = ("smollm2-135m-instruct", "gemma3-270m")
METHODS = ("lora", "ia3", "prompt", "ptuning_v2")
# Three rates per method around the ones of the first matrix (harness.LEARNING_RATES), a factor ~3 apart.
LR_GRIDS = {"lora": (1e-4, 3e-4, 1e-3), "ia3": (1e-3, 3e-3, 1e-2), "prompt": (1e-2, 3e-2, 1e-1),
            "ptuning_v2": (1e-3, 3e-3, 1e-2)}
SEEDS = 3  # LoRA's commonsense job at seeds 0, 1, 2
FOLDS = 3
# Per commonsense set 16 train / 8 calibration / 30 test questions (128 / 64 / 240 merged; LoRA's three seeds
# test 720); TruthfulQA: each fold's 99-100 questions tested, 40 of the other 199-200 calibrate, the rest train.
# Sized for both models to finish in under 150 minutes on a 2-core CPU.
SIZES = Sizes(train=16, calib=8, test=30, tqa_calib=40)
COMMONSENSE = datasets_.COMMONSENSE  # the sets one commonsense job trains on (merged) and is tested on
COMPARED = ("base", "steered", "median", "trimmed", "ratio", "nll", "no_mask", "alpha=0.3", "alpha=0.5", "alpha=0.7",
            "alpha=0.9", "mu=-1", "mu=+1", "mu=+3")


def sweep_jobs():
    return [Job(method, train_on=COMMONSENSE, eval_on=COMMONSENSE, lr_grid=LR_GRIDS[method]) for method in METHODS]


def dependent_jobs(rates):
    """The jobs at the chosen rates ({method: rate}; a method whose sweep failed is left out)."""
    jobs = [Job("lora", train_on=COMMONSENSE, eval_on=COMMONSENSE, seed=seed, lr=rates["lora"])
            for seed in range(1, SEEDS) if rates.get("lora")]
    tqa = (datasets_.TRUTHFULQA,)
    return jobs + [Job(method, train_on=tqa, eval_on=tqa, folds=FOLDS, fold=fold, lr=rates[method])
                   for method in METHODS if rates.get(method) for fold in range(FOLDS)]


def run_matrix(out, models=MODELS, sizes=SIZES, cache=None, progress=True, log=None, device="cpu", dtype=None,
               score_batch_size=8):
    """Runs (or resumes) the matrix for `models` into out/<model>/ and writes the pooled out/results.json,
    out/results.md and out/plots/pooled.png. Returns the pooled results."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    failed = {}  # a method whose sweep failed has no dependent jobs: the report names it
    for k, model in enumerate(models, 1):
        folder = model_folder(out, model)

        def stage(what, jobs):
            log(f"[matrix] model {k}/{len(models)} {model}: {what} ({len(jobs)} jobs)")
            start = time.time()
            try:
                done = run(jobs, folder, sizes, model, cache=cache, progress=progress, log=log, device=device,
                           dtype=dtype, score_batch_size=score_batch_size)
            finally:  # an interrupted part (Ctrl-C) counts too: its finished cells stay
                _add_time(out, f"{model}: {what}", time.time() - start)
            failed.update({f"{os.path.basename(folder)}: {job}": error for job, error in done["failed"].items()})

        sweeps = sweep_jobs()
        stage("learning-rate sweeps", sweeps)
        stage("seeds and TruthfulQA folds", dependent_jobs({j.method: chosen_learning_rate(folder, j) for j in sweeps}))
    # the pooled report covers every model run into `out`, also one run in an earlier part (--model NAME)
    earlier = [m for m in MODELS if m not in models and os.path.isdir(model_folder(out, m))]
    results = pooled_results(out, tuple(models) + tuple(earlier), sizes, failed, cache)
    if is_main():
        from .report import write_pooled_report

        _write_json(os.path.join(out, "results.json"), results)
        write_pooled_report(results, out)
    return results


def model_folder(out, model):
    """A model's run folder: out/<packaged name>, or out/<folder name> for a local model folder."""
    return os.path.join(out, os.path.basename(os.path.normpath(model)))


def _add_time(out, stage, seconds):
    """Adds a stage's seconds to out/timing.json (a resumed run adds its parts; a stage with nothing left to
    do adds its few seconds of loading)."""
    if not is_main():
        return
    path = os.path.join(out, "timing.json")
    timing = _read_json(path) if os.path.exists(path) else {}
    timing[stage] = timing.get(stage, 0.0) + seconds
    _write_json(path, timing)


def _matrix_job_names():
    return {job.name for job in sweep_jobs() + dependent_jobs({method: 1.0 for method in METHODS})}


def _job_cells(folder):
    """(settings, cell with per-question outcomes) of every loglik cell of the matrix's jobs in a run folder
    (cells of other jobs run into the same folder are left out)."""
    cells_dir = os.path.join(folder, "cells")
    settings = collect(folder)["settings"]
    names = _matrix_job_names()
    for name in sorted(os.listdir(cells_dir)) if os.path.isdir(cells_dir) else []:
        if name.endswith(".json"):
            with open(os.path.join(cells_dir, name)) as f:
                cell = json.load(f)
            if cell["protocol"] == "loglik" and cell["job"] in settings and cell["job"] in names:
                yield settings[cell["job"]], cell


class _TestQuestions:
    """The test questions of a cell, in its per-question order, from the job's recorded settings."""

    def __init__(self, cache=None):
        self.cache, self.runs = cache, {}

    def __call__(self, settings, benchmark):
        from .harness import _Questions

        key = json.dumps(settings["sizes"], sort_keys=True)
        if key not in self.runs:
            self.runs[key] = _Questions(Sizes(**settings["sizes"]), self.cache)
        job = Job(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["job"].items()})
        return self.runs[key].split(benchmark, job).test


def _pooled_comparison(outcomes, metric, variant):
    """paired_comparison over unique questions: a question tested under several seeds (their splits overlap)
    counts once, with its outcomes averaged over them. outcomes: [(question key, {variant: {metric: value}})]."""
    units = {}
    for key, q in outcomes:
        if variant in q:
            units.setdefault(key, []).append((q["adapter"][metric], q[variant][metric]))
    if not units:
        return None
    pairs = [tuple(sum(v) / len(v) for v in zip(*values)) for values in units.values()]
    comparison = paired_comparison(*zip(*pairs))
    comparison["tested"] = sum(len(values) for values in units.values())  # question-adapter pairs behind the n units
    return comparison


def pooled_results(out, models=MODELS, sizes=SIZES, failed=None, cache=None):
    """Per (model, method, task, metric): every variant against the adapter over all questions of the task's
    cells (sets, seeds, folds pooled; one unit per distinct question, statistics.paired_comparison), and
    steering per seed; the chosen learning rates with their sweeps; jobs that failed; the run's timing.
    The tests are conditional on the trained adapters: they say whether steering changes these adapters'
    answers, not how much another warm start would differ."""
    pooled, rates = [], {}
    questions = _TestQuestions(cache)
    for model in models:
        folder = model_folder(out, model)
        groups = {}
        for settings, cell in _job_cells(folder):
            task = "truthfulqa" if cell["benchmark"] == datasets_.TRUTHFULQA else "commonsense"
            groups.setdefault((cell["method"], task), []).append((settings, cell))
        for (method, task), cells in sorted(groups.items(), key=lambda g: (METHODS.index(g[0][0]), g[0][1])):
            outcomes = []  # (seed, question key, per-question outcomes)
            for settings, cell in cells:
                tested = questions(settings, cell["benchmark"])
                outcomes += [(settings["job"].get("seed", 0), (cell["benchmark"], question.prompt), q)
                             for question, q in zip(tested, cell["per_question"])]
            seeds = sorted({seed for seed, _, _ in outcomes})
            expected = FOLDS if task == "truthfulqa" else len(COMMONSENSE) * (SEEDS if method == "lora" else 1)
            for metric in datasets_.metric_names(cells[0][1]["benchmark"]):
                row = {"model": os.path.basename(folder), "method": method, "task": task, "metric": metric,
                       "sets": sorted({c["benchmark"] for _, c in cells}), "seeds": seeds, "cells": len(cells),
                       "expected_cells": expected,
                       "mu_bar": sorted({round(c["mu_bar"], 4) for _, c in cells}), "variants": {}, "per_seed": {}}
                for variant in COMPARED:
                    comparison = _pooled_comparison([(key, q) for _, key, q in outcomes], metric, variant)
                    if comparison:
                        row["variants"][variant] = comparison
                if len(seeds) > 1:
                    for seed in seeds:
                        row["per_seed"][str(seed)] = _pooled_comparison(
                            [(key, q) for s, key, q in outcomes if s == seed], metric, "steered")
                pooled.append(row)
        for job in sweep_jobs():
            path = os.path.join(folder, "adapters", job.name, "lr_sweep.json")
            if os.path.exists(path):
                with open(path) as f:
                    rates.setdefault(os.path.basename(folder), {})[job.method] = json.load(f)
    timing_path = os.path.join(out, "timing.json")
    timing = _read_json(timing_path) if os.path.exists(timing_path) else {}
    return {"pooled": pooled, "learning_rates": rates, "failed": failed or {}, "timing_s": timing,
            "sizes": dataclasses.asdict(sizes), "lr_grids": {m: list(g) for m, g in LR_GRIDS.items()},
            "seeds": SEEDS, "folds": FOLDS}
