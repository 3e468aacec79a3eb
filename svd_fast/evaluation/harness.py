"""The evaluation harness: warm-started adapter vs + steering, per benchmark, resumable.

    jobs = [Job("lora", epochs=1, train_on=COMMONSENSE, eval_on=COMMONSENSE)]
    results = run(jobs, out="runs/lora", sizes=Sizes(train=40, calib=16, test=60))

A job warm-starts one adapter on the merged train splits of `train_on`, calibrates mu on their merged
calibration splits (for every confidence mask of the sweep, from one pass), and evaluates every benchmark
of `eval_on` on its test split. One forward per question gives both distributions (adapter and base), so
every variant (adapter, base, steered under each mu reducer, alpha and fixed mu, no mask) is scored from
the same pass. Options of a question share the prompt's KV cache.

Each finished stage is saved under `out` (adapters/<job>/, cells/<job>__<benchmark>.json) and skipped
on a rerun with the same settings, so an interrupted run resumes where it stopped.
"""
import dataclasses
import json
import math
import os
import sys

import numpy as np
import torch

from tqdm.auto import tqdm

from .. import ops
from ..adaptation.calibration import CONFIG_NAME, CalibrationResult, calibrate_sweep
from ..decoding.batching import collate
from ..decoding import SteeredModel
from ..distributed import barrier, gather_objects, is_main, rank_and_world
from . import data as datasets_
from ..statistics import summarise_cell

ALPHAS = (0.1, 0.3, 0.5, 0.7, 0.9)
NO_MASK_ALPHA = 1e-30  # keeps every token within 69 nats of the top; below that delta is 0 in float32 anyway
FIXED_MU = (-1.0, 1.0, 3.0)
# Warm-start learning rates per method (batch 4) where a job gives none. LoRA's is the first probe's; IA3's
# and prompt tuning's were chosen by the matrix's sweep on SmolLM2 (IA3 on Gemma 3 too); P-tuning v2's by the
# sweep on both models (1e-2, the first matrix's, was the worst rate of the grid on both).
LEARNING_RATES = {"lora": 2e-4, "ia3": 3e-3, "prompt": 3e-2, "ptuning_v2": 1e-3}
PROTOCOLS = ("loglik", "generate")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Questions per benchmark in each split (TruthfulQA has its own, it has only 299 questions)."""

    train: int = 50
    calib: int = 16
    test: int = 60
    tqa_train: int = 100
    tqa_calib: int = 49
    tqa_test: int = 150
    seed: int = 0

    def of(self, benchmark):
        if benchmark == datasets_.TRUTHFULQA:
            return self.tqa_train, self.tqa_calib, self.tqa_test
        return self.train, self.calib, self.test


@dataclasses.dataclass(frozen=True)
class Job:
    method: str
    epochs: int = 1
    train_on: tuple = datasets_.COMMONSENSE
    eval_on: tuple = datasets_.COMMONSENSE
    lr: float = None
    batch_size: int = 4
    template: str = "cloze"  # commonsense prompts: "cloze" or "choices" (see svd_fast.data)
    seed: int = 0  # the warm start's seed; added to Sizes.seed for the split
    folds: int = 0  # TruthfulQA only: k-fold (test = fold `fold`, train and calibrate on the other folds)
    fold: int = 0
    lr_grid: tuple = ()  # warm start at each rate, keep the one with the lowest calibration-split answer NLL

    @property
    def name(self):
        what = "commonsense" if set(self.train_on) == set(datasets_.COMMONSENSE) else "+".join(self.train_on)
        suffix = "" if self.template == "cloze" or self.train_on == (datasets_.TRUTHFULQA,) else f"-{self.template}"
        suffix += f"-s{self.seed}" if self.seed else ""
        suffix += f"-fold{self.fold + 1}of{self.folds}" if self.folds else ""
        return f"{self.method}-{what}-e{self.epochs}{suffix}"

    @property
    def learning_rate(self):
        return self.lr if self.lr is not None else LEARNING_RATES[self.method]

    def check(self):
        """One clear error for settings that cannot run."""
        if self.folds and (self.train_on != (datasets_.TRUTHFULQA,) or self.eval_on != (datasets_.TRUTHFULQA,)):
            raise ValueError(f"{self.name}: k-fold splits are for TruthfulQA alone (train_on = eval_on = "
                             "('truthfulqa',)); the commonsense sets have questions enough for a held-out split")
        if self.folds and not 0 <= self.fold < self.folds:
            raise ValueError(f"{self.name}: fold must be in 0..{self.folds - 1}, got {self.fold}")
        if self.lr_grid and self.lr is not None:
            raise ValueError(f"{self.name}: give lr or lr_grid, not both")
        if any(not (isinstance(r, (int, float)) and r > 0) for r in self.lr_grid):
            raise ValueError(f"{self.name}: lr_grid must hold positive learning rates, got {self.lr_grid!r}")


# ---------------------------------------------------------------------------------------------------
# Scoring one question: both distributions at every option token, from one shared-prefix forward.


def variants(calibrations):
    """name -> (mu, alpha): what is scored besides the adapter and the base model."""
    main = calibrations[ALPHAS[0]]
    out = {"steered": (main.reductions["mean"], ALPHAS[0])}
    for reducer in ("median", "trimmed", "ratio", "nll"):
        if reducer in main.reductions:  # calibrations of runs before the exact strength lack "nll"
            out[reducer] = (main.reductions[reducer], ALPHAS[0])
    for alpha in ALPHAS[1:]:
        out[f"alpha={alpha}"] = (calibrations[alpha].reductions["mean"], alpha)
    out["no_mask"] = (calibrations[NO_MASK_ALPHA].reductions["mean"], NO_MASK_ALPHA)
    for mu in FIXED_MU:
        out[f"mu={mu:+g}"] = (mu, ALPHAS[0])
    return out


@torch.no_grad()
def questions_option_logits(steered, tokenizer, questions):
    """For each question, (z_adapted, z_base, targets, lengths): the logits predicting each option token,
    [sum of its option lengths, V], its option tokens and their counts. One forward over the left-padded
    prompts, then one over every option of every question, right-padded, continuing the prompts' KV cache
    (without a cache: the whole sequences). Memory: the second forward's logits, 2 x (options in the batch)
    x (longest option) x V floats.

    Left padding changes nothing for routes whose positions come from the attention mask. Prompt learning
    counts positions from the first virtual token, pads included (PEFT's forward): there, give questions
    whose prompts have the same token count (`scoring_batches` does)."""
    device = steered.model.get_base_model().device
    pad = tokenizer.pad_token_id
    prompts = [tokenizer(q.prompt)["input_ids"] for q in questions]
    option_ids = [[tokenizer(" " + o, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
                   for o in q.options] for q in questions]
    ids, prompt_mask = collate(prompts, pad, "left")
    za_prompt, zb_prompt, cache = steered.logits_pair(ids.to(device), prompt_mask.to(device), logits_to_keep=1)
    owner = torch.tensor([i for i, options in enumerate(option_ids) for _ in options])
    cont, cont_mask = collate([o for options in option_ids for o in options], pad, "right")
    mask = torch.cat([prompt_mask[owner], cont_mask], 1).to(device)
    if cache is not None:  # every option continues its prompt's cache
        cache.reorder_cache(owner.to(device))
        z_a, z_b, _ = steered.logits_pair(cont.to(device), mask, cache=cache)
        offset = 0
    else:
        z_a, z_b, _ = steered.logits_pair(torch.cat([ids[owner], cont], 1).to(device), mask)
        offset = ids.shape[1]
    out, row = [], 0
    for i, options in enumerate(option_ids):
        rows_a, rows_b = [], []
        for option in options:
            rows_a += [za_prompt[i, -1:], z_a[row, offset:offset + len(option) - 1]]
            rows_b += [zb_prompt[i, -1:], z_b[row, offset:offset + len(option) - 1]]
            row += 1
        targets = torch.tensor([t for option in options for t in option], device=device)
        out.append((torch.cat(rows_a), torch.cat(rows_b), targets, [len(o) for o in options]))
    return out


def option_logits(steered, tokenizer, prompt, options):
    """(z_adapted, z_base, targets, lengths) of one question (see questions_option_logits)."""
    return questions_option_logits(steered, tokenizer, [datasets_.Question("", prompt, tuple(options), 0)])[0]


def _option_sums(logits_pair, scored):
    """Per variant, the options' summed log-probabilities: the steered variants from the fused steered_nll op,
    every strength of one alpha in one pass over the vocabulary (fill="keep"; the adapter is mu = 0)."""
    z_a, z_b, targets, lengths = logits_pair
    segments = torch.repeat_interleave(torch.arange(len(lengths), device=targets.device),
                                       torch.tensor(lengths, device=targets.device))

    def sums(log_probs):
        return torch.zeros(len(lengths), dtype=torch.float64, device=log_probs.device).index_add_(
            0, segments, log_probs.double()).tolist()

    base = z_b.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    out = {"base": sums(base)}
    by_alpha = {ALPHAS[0]: [("adapter", 0.0)]}
    for name, (mu, alpha) in scored.items():
        by_alpha.setdefault(alpha, []).append((name, mu))
    for alpha, entries in by_alpha.items():
        loss = ops.steered_nll(z_a, z_b, targets, [mu for _, mu in entries], alpha, "keep")[0]
        for k, (name, _) in enumerate(entries):
            out[name] = sums(-loss[:, k])
    return {"adapter": out.pop("adapter"), **out}, lengths


@torch.no_grad()
def score_questions(steered, tokenizer, questions, scored):
    """For each question, ({variant: [summed log-probability of each option]}, option lengths in tokens) for
    'adapter', 'base' and the `scored` variants ({name: (mu, alpha)}), from one batched pair of forwards."""
    return [_option_sums(pair, scored) for pair in questions_option_logits(steered, tokenizer, questions)]


def score_question(steered, tokenizer, question, scored):
    """score_questions for one question."""
    return score_questions(steered, tokenizer, [question], scored)[0]


def scoring_batches(steered, tokenizer, questions, batch_size):
    """Lists of question indices, at most batch_size each, in order; for prompt learning (positions counted
    over the padding) only questions whose prompts have the same token count share a batch, so that batched
    scores equal one-at-a-time ones on every route."""
    if not steered.peft_config.is_prompt_learning:
        return [list(range(i, min(i + batch_size, len(questions)))) for i in range(0, len(questions), batch_size)]
    by_length = {}
    for i, q in enumerate(questions):
        by_length.setdefault(len(tokenizer(q.prompt)["input_ids"]), []).append(i)
    return [group[j:j + batch_size] for group in by_length.values() for j in range(0, len(group), batch_size)]


def _normalise(text):
    return " ".join("".join(c for c in text.lower() if c.isalnum() or c.isspace()).split())


def parse_choice(generated, options):
    """The option a generated answer names (the longest option it starts with), or -1."""
    text = _normalise(generated)
    best, best_len = -1, 0
    for i, option in enumerate(options):
        norm = _normalise(option)
        if norm and (text.startswith(norm) or (text and norm.startswith(text) and len(text) >= 3)) \
                and len(norm) > best_len:
            best, best_len = i, len(norm)
    return best


@torch.no_grad()
def generate_choices(steered, tokenizer, questions, settings, batch_size=8, progress=False, desc=None):
    """The paper's generation protocol: greedy answers after "the correct answer is", parsed to an option.
    settings: {variant: (mu, alpha, fill)}. Returns {variant: [(parsed index, text), ...]} in question order.
    Batches as `scoring_batches` does (prompt learning: equal prompt lengths only), so the answers do not
    depend on which questions share a batch."""
    device = steered.model.get_base_model().device
    answers = {name: [None] * len(questions) for name in settings}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        groups = scoring_batches(steered, tokenizer, questions, batch_size)
        for batch in tqdm(groups, total=len(groups), desc=desc, unit="batch", disable=not progress):
            chunk = [questions[i] for i in batch]
            enc = tokenizer([q.prompt for q in chunk], return_tensors="pt", padding=True).to(device)
            longest = max(len(tokenizer(" " + o, add_special_tokens=False)["input_ids"]) for q in chunk
                          for o in q.options)
            for name, (mu, alpha, fill) in settings.items():
                steered.mu, steered.alpha, steered.fill = mu, alpha, fill
                seq = steered.generate(**enc, max_new_tokens=longest + 1, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
                texts = tokenizer.batch_decode(seq[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for i, text, q in zip(batch, texts, chunk):
                    answers[name][i] = (parse_choice(text, q.options), text)
    finally:
        tokenizer.padding_side = side
    return answers


# ---------------------------------------------------------------------------------------------------
# Metrics and statistics.


def question_metrics(question, option_sums, lengths):
    """Per-question metrics from the options' summed log-probabilities.

    Commonsense: acc (length-normalised log-likelihood argmax, per token). TruthfulQA (standard
    definitions, summed log-probabilities): mc1 = the best answer beats every false one; mc2 = the
    normalised probability mass of the true answers; mc3 = the fraction of true answers that beat every
    false one."""
    sums = np.asarray(option_sums, dtype=np.float64)
    if question.benchmark == datasets_.TRUTHFULQA:
        true, false = sums[:question.n_true], sums[question.n_true:]
        top_false = false.max()
        mass = np.exp(sums - sums.max())
        return {"mc1": float(sums[question.label] > top_false), "mc2": float(mass[:question.n_true].sum() / mass.sum()),
                "mc3": float((true > top_false).mean())}
    return {"acc": float(int(np.argmax(sums / np.asarray(lengths))) == question.label)}


# ---------------------------------------------------------------------------------------------------
# Running jobs.


def _write_json(path, payload):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)  # a cell is either complete or absent


def _read_json(path):
    with open(path) as f:
        return json.load(f)


class _Questions:
    """Loaded benchmarks and their splits, once per run."""

    def __init__(self, sizes, cache=None):
        self.sizes, self.cache, self._splits, self._loaded = sizes, cache, {}, {}

    def split(self, benchmark, job):
        """The job's split of one benchmark: its template, its seed (added to the run's), its fold."""
        key = benchmark, job.template, job.seed, job.folds, job.fold
        if key not in self._splits:
            if (benchmark, job.template) not in self._loaded:
                self._loaded[benchmark, job.template] = datasets_.load_benchmark(benchmark, self.cache, job.template)
            questions = self._loaded[benchmark, job.template]
            train, calib, test = self.sizes.of(benchmark)
            seed = self.sizes.seed + job.seed
            self._splits[key] = (datasets_.kfold_split(questions, job.folds, job.fold, calib, seed) if job.folds
                                 else datasets_.split(questions, train, calib, test, seed))
        return self._splits[key]


_LATER_FIELDS = {"seed": 0, "folds": 0, "fold": 0, "lr_grid": ()}  # Job fields added after runs were committed


def _settings_record(job, sizes, model, dtype=torch.float32):
    fields = {k: v for k, v in dataclasses.asdict(job).items() if k not in _LATER_FIELDS or v != _LATER_FIELDS[k]}
    record = {"job": fields, "sizes": dataclasses.asdict(sizes), "model": model,
              "lr": list(job.lr_grid) if job.lr_grid else job.learning_rate}
    if dtype != torch.float32:  # float32 runs keep the record of the folders written before dtypes were chosen
        record["dtype"] = str(dtype).removeprefix("torch.")
    return json.loads(json.dumps(record))  # as it reads back from settings.json (tuples become lists)


SWEEP_KEY = "alpha_sweep"  # in a job's steering_config.json: every alpha's calibration, as {str(alpha): dict}
LEGACY_SWEEP = "calibration.json"  # where run folders written before steering_config.json held the sweep keep it


def calibration_sweep(folder):
    """{alpha (str): CalibrationResult dict} of a job's adapter folder, or None while it holds no finished
    calibration. The folder is a calibrated adapter as every command reads it: the PEFT adapter files and
    steering_config.json (the paper's mean at alpha 0.1, as `svd-fast calibrate` writes it), which holds the
    whole sweep under "alpha_sweep" too."""
    path = os.path.join(folder, CONFIG_NAME)
    if os.path.exists(path):
        sweep = _read_json(path).get(SWEEP_KEY)
        if sweep is not None:
            return sweep
    legacy = os.path.join(folder, LEGACY_SWEEP)
    return _read_json(legacy) if os.path.exists(legacy) else None


def _write_calibrated(folder, calibrations):
    """steering_config.json of a job: alpha 0.1's calibration with the paper's mean as its strength and the -inf
    fill (what `svd-fast generate --adapter` steers with, as the demo's generation does), and the sweep.
    Written last: it marks the job's adapter done."""
    main = calibrations[ALPHAS[0]]
    # mu* does not depend on the fill; decoding steers with the -inf mask (the NLL fields stay those of the
    # exact strength, fitted with fill="keep" for scoring)
    config = dataclasses.replace(main, mu_bar=main.reductions["mean"], reduce="mean", fill=float("-inf")).to_dict()
    config[SWEEP_KEY] = {str(a): c.to_dict() for a, c in calibrations.items()}
    _write_json(os.path.join(folder, CONFIG_NAME), config)


def _load_calibrated(folder, base_path, device="cpu", dtype=None):
    import peft

    from . import models

    base, tokenizer = models.load(base_path, progress=False, device=device, dtype=dtype)
    peft_model = peft.PeftModel.from_pretrained(base, folder).eval()
    calibrations = {float(a): CalibrationResult.from_dict(c) for a, c in calibration_sweep(folder).items()}
    return peft_model, tokenizer, calibrations


def load_job(out, job, model="smollm2-135m-instruct", cache=None, device="cpu", dtype=None):
    """(peft_model, tokenizer, {alpha: CalibrationResult}) of a finished job of the run in `out`, on `device`
    with weights of `dtype` (see models.load)."""
    from . import models

    folder = os.path.join(out, "adapters", job.name)
    if calibration_sweep(folder) is None:
        raise FileNotFoundError(f"{folder} holds no calibrated adapter: run the job first")
    return _load_calibrated(folder, models.resolve(model, cache, progress=False), device, dtype)


def _prepare_adapter(job, base_path, questions, folder, progress, log, device, dtype):
    """The job's warm-started and calibrated adapter: trained and saved, or loaded from `folder`."""
    from . import models
    from ..adaptation.training import warm_start

    if calibration_sweep(folder) is not None:
        log(f"[{job.name}] adapter and calibration found in {folder}: skipping warm start and calibration")
        return _load_calibrated(folder, base_path, device, dtype)
    train = [q.example() for b in job.train_on for q in questions.split(b, job).train]
    calib = [q.example() for b in job.train_on for q in questions.split(b, job).calib]
    if job.lr_grid:
        peft_model, tokenizer = _sweep_learning_rate(job, base_path, train, calib, folder, progress, log, device, dtype)
    else:
        base_model, tokenizer = models.load(base_path, progress=False, device=device, dtype=dtype)
        log(f"[{job.name}] warm start: {len(train)} examples, {job.epochs} epoch(s), lr {job.learning_rate}, "
            f"batch {job.batch_size}")
        peft_model = warm_start(base_model, tokenizer, train, method=job.method, epochs=job.epochs,
                                lr=job.learning_rate, batch_size=job.batch_size, seed=job.seed, progress=progress)
    log(f"[{job.name}] calibrating mu on {len(calib)} examples, alphas {list(ALPHAS)} and no mask")
    # reduce="nll": every alpha's exact strength beside the first-order ones; fill="keep", as the options are scored
    calibrations = calibrate_sweep(peft_model, tokenizer, calib, ALPHAS + (NO_MASK_ALPHA,), reduce="nll", fill="keep",
                                   progress=progress)
    if is_main():  # every rank trained and calibrated the same adapter (data parallel, sharded calibration)
        peft_model.save_pretrained(folder)
        np.save(os.path.join(folder, "mu_star.npy"), calibrations[ALPHAS[0]].values.numpy())
        _write_calibrated(folder, calibrations)
    barrier()
    return peft_model, tokenizer, calibrations


LR_SWEEP = "lr_sweep.json"  # in a job's folder: {"nll": {rate: calibration-split answer NLL, null if it diverged},
#                                                    "chosen": rate}


def chosen_learning_rate(out, job):
    """The rate a finished learning-rate sweep of `job` (with lr_grid) chose, or None before it finished."""
    path = os.path.join(out, "adapters", job.name, LR_SWEEP)
    return _read_json(path).get("chosen") if os.path.exists(path) else None


def _nll_text(nll):
    return "diverged" if nll is None else f"{nll:.4f}"


def _sweep_learning_rate(job, base_path, train, calib, folder, progress, log, device, dtype):
    """Warm-starts one adapter per rate of job.lr_grid and keeps the one whose answer NLL on the calibration
    examples is lowest (the test split is never seen). Each candidate is saved under lr_sweep/<rate>/ and its
    NLL recorded as it finishes, so a rerun resumes the sweep."""
    import peft

    from . import models
    from ..adaptation.training import answer_nll, warm_start

    path = os.path.join(folder, LR_SWEEP)
    record = _read_json(path) if os.path.exists(path) else {"nll": {}}
    for lr in job.lr_grid:
        if str(lr) in record["nll"]:
            continue
        base_model, tokenizer = models.load(base_path, progress=False, device=device, dtype=dtype)
        log(f"[{job.name}] learning-rate sweep: warm start at lr {lr} ({len(train)} examples, {job.epochs} "
            f"epoch(s), batch {job.batch_size})")
        try:
            candidate = warm_start(base_model, tokenizer, train, method=job.method, epochs=job.epochs, lr=lr,
                                   batch_size=job.batch_size, seed=job.seed, progress=progress)
            nll = answer_nll(candidate, tokenizer, calib)
        except FloatingPointError as err:  # a rate that diverges loses the sweep, it does not end the job
            log(f"[{job.name}] lr {lr} diverged: {err}")
            candidate, nll = None, None
        if nll is not None and not math.isfinite(nll):
            candidate, nll = None, None
        log(f"[{job.name}] lr {lr}: calibration-split answer NLL {_nll_text(nll)} nats/token")
        if is_main():
            if candidate is not None:
                candidate.save_pretrained(os.path.join(folder, "lr_sweep", str(lr)))
            record["nll"][str(lr)] = nll  # None: diverged
            _write_json(path, record)
        barrier()
        record = _read_json(path)  # every rank takes rank 0's record, so all choose the same rate
        del candidate, base_model
    finite = [lr for lr in job.lr_grid if record["nll"][str(lr)] is not None]
    if not finite:
        raise FloatingPointError(f"every rate of {list(job.lr_grid)} diverged: give lower ones")
    best = min(finite, key=lambda lr: (record["nll"][str(lr)], lr))
    record["chosen"] = best
    if is_main():
        _write_json(path, record)
    log(f"[{job.name}] learning rate {best} chosen (lowest calibration-split answer NLL of "
        + ", ".join(f"{lr}: {_nll_text(record['nll'][str(lr)])}" for lr in job.lr_grid) + ")")
    base_model, tokenizer = models.load(base_path, progress=False, device=device, dtype=dtype)
    return peft.PeftModel.from_pretrained(base_model, os.path.join(folder, "lr_sweep", str(best))).eval(), tokenizer


def run(jobs, out, sizes=Sizes(), model="smollm2-135m-instruct", protocol="loglik", cache=None, progress=True,
        log=None, device="cpu", dtype=None, score_batch_size=8):
    """Runs the jobs (skipping finished stages) and writes results.json, results.md and plots/ under `out`.
    device and dtype: where the model runs and its weights' dtype (models.load: "auto", "cpu", "cuda";
    "auto", "float32", "bfloat16", "float16"; None: float32). A run folder keeps its dtype: resuming it
    with another is refused, as any other change of settings. score_batch_size: questions per scoring forward
    (bounds memory; the scores do not depend on it, see questions_option_logits)."""
    from . import models
    from ..adaptation.training import METHODS

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    for job in jobs:
        if job.method not in METHODS:
            raise ValueError(f"unknown method {job.method!r}: choose from {', '.join(METHODS)}")
        job.check()
        if protocol == "generate" and job.template != "choices" and job.eval_on != (datasets_.TRUTHFULQA,):
            raise ValueError(f"{job.name}: the generation protocol needs the options in the prompt: "
                             "use template='choices' (svd-fast eval --template choices)")
        if job.template not in datasets_.TEMPLATES:
            raise ValueError(f"template must be one of {datasets_.TEMPLATES}, got {job.template!r}")
        for b in job.train_on + job.eval_on:
            if b not in datasets_.BENCHMARKS:
                raise ValueError(f"unknown benchmark {b!r}: choose from {', '.join(datasets_.BENCHMARKS)}")
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if not is_main():  # under torchrun rank 0 reports and writes; every rank computes its share
        log, progress = (lambda message: None), False
    device = models.resolve_device(device)
    dtype = torch.float32 if dtype is None else models.resolve_dtype(dtype, device)
    if is_main():  # a packaged model is converted once, by rank 0, before the others read it
        models.resolve(model, cache, progress)
    barrier()
    base_path = models.resolve(model, cache, progress=False)
    questions = _Questions(sizes, cache)
    for job in jobs:  # load every split first: a missing package fails before hours of training
        for b in set(job.train_on + job.eval_on):
            questions.split(b, job)
    failed = {}
    for job in jobs:
        settings = _settings_record(job, sizes, model, dtype)
        folder = os.path.join(out, "adapters", job.name)
        settings_path = os.path.join(folder, "settings.json")
        recorded = _read_json(settings_path) if os.path.exists(settings_path) else settings
        if recorded != settings:
            differing = sorted(k for k in set(settings) | set(recorded) if settings.get(k) != recorded.get(k))
            raise ValueError(f"{folder} holds a run with other settings ({', '.join(differing)} differ; a dtype "
                             "other than float32, e.g. --dtype auto on CUDA, counts too): use another --out, or "
                             "delete it to redo it")
        pending = [b for b in job.eval_on if not os.path.exists(_cell_path(out, job, b, protocol))]
        if not pending:
            log(f"[{job.name}] all {len(job.eval_on)} {protocol} cells done: skipping")
            continue
        if is_main():
            _write_json(settings_path, settings)
        try:
            peft_model, tokenizer, calibrations = _prepare_adapter(job, base_path, questions, folder, progress, log,
                                                                   device, dtype)
            for benchmark in pending:
                _run_cell(job, benchmark, protocol, peft_model, tokenizer, calibrations, questions, out, progress, log,
                          score_batch_size)
            del peft_model
        except (FloatingPointError, RuntimeError, ValueError) as err:  # one job failing keeps the others' results
            if rank_and_world()[1] > 1:
                raise  # the other ranks would wait for this one in the next collective
            failed[job.name] = f"{type(err).__name__}: {err}"
            log(f"[{job.name}] FAILED, moving on (a rerun retries it): {failed[job.name]}")
    results = collect(out)
    results["failed"] = failed
    if is_main():
        _write_json(os.path.join(out, "results.json"), results)
        from .report import write_report

        write_report(results, out)
    barrier()
    return results


def collect(out):
    """Every finished cell and calibration of the run folder (summaries only; per-question data stay in
    cells/), in method, job and benchmark order."""
    from ..adaptation.training import METHODS

    cells = []
    cell_dir = os.path.join(out, "cells")
    for name in sorted(os.listdir(cell_dir)) if os.path.isdir(cell_dir) else []:
        if name.endswith(".json"):
            cell = _read_json(os.path.join(cell_dir, name))
            cells.append({k: v for k, v in cell.items() if k not in ("per_question", "generated")})
    cells.sort(key=lambda c: (METHODS.index(c["method"]), c["benchmark"] == datasets_.TRUTHFULQA, c["epochs"],
                              c["job"], c["protocol"], datasets_.BENCHMARKS.index(c["benchmark"])))
    calibration = {}
    for cell in cells:
        if cell["job"] not in calibration:
            sweep = calibration_sweep(os.path.join(out, "adapters", cell["job"]))
            if sweep is not None:
                calibration[cell["job"]] = sweep
    settings = {c["job"]: _read_json(os.path.join(out, "adapters", c["job"], "settings.json")) for c in cells}
    return {"cells": cells, "calibration": calibration, "settings": settings}


def _cell_path(out, job, benchmark, protocol):
    suffix = "" if protocol == "loglik" else f"__{protocol}"
    return os.path.join(out, "cells", f"{job.name}__{benchmark}{suffix}.json")


def _run_cell(job, benchmark, protocol, peft_model, tokenizer, calibrations, questions, out, progress, log,
              score_batch_size=8):
    test = questions.split(benchmark, job).test
    scored = variants(calibrations)
    steered = SteeredModel(peft_model, mu=0.0, alpha=ALPHAS[0], fill="keep")
    mu_bar = scored["steered"][0]
    log(f"[{job.name}] {benchmark}: {len(test)} test questions, mu_bar {mu_bar:+.3f} ({steered.mode})")
    rank, world = rank_and_world()
    shard = list(range(rank, len(test), world))  # under torchrun each rank scores its share; rank 0 gathers
    local = {}
    if protocol == "loglik":
        with tqdm(total=len(shard), desc=f"{job.name} / {benchmark}", unit="q", disable=not progress) as bar:
            for batch in scoring_batches(steered, tokenizer, [test[i] for i in shard], score_batch_size):
                batch = [shard[j] for j in batch]
                for i, (sums, lengths) in zip(batch, score_questions(steered, tokenizer, [test[i] for i in batch],
                                                                     scored)):
                    local[i] = ({name: question_metrics(test[i], s, lengths) for name, s in sums.items()}, None)
                bar.update(len(batch))
    else:
        settings = {"adapter": (0.0, ALPHAS[0], "keep"), "steered": (mu_bar, ALPHAS[0], float("-inf")),
                    "no_mask": (scored["no_mask"][0], NO_MASK_ALPHA, float("-inf"))}
        answers = generate_choices(steered, tokenizer, [test[i] for i in shard], settings, progress=progress,
                                   desc=f"{job.name} / {benchmark} (generate)")
        for j, i in enumerate(shard):
            local[i] = ({name: {"acc": float(answers[name][j][0] == test[i].label)} for name in settings},
                        {name: answers[name][j][1] for name in settings})
    gathered = {i: result for part in gather_objects(local) for i, result in part.items()}
    if not is_main():
        barrier()  # rank 0 writes the cell
        return
    per_question = [gathered[i][0] for i in range(len(test))]
    generated = [gathered[i][1] for i in range(len(test))]
    cell = {"job": job.name, "method": job.method, "epochs": job.epochs, "benchmark": benchmark,
            "protocol": protocol, "n": len(test), "mu_bar": mu_bar, "mode": steered.mode,
            "variants": {name: {"mu": mu, "alpha": alpha} for name, (mu, alpha) in scored.items()},
            "summary": summarise_cell(per_question, datasets_.metric_names(benchmark)), "per_question": per_question}
    if protocol == "generate":
        cell["generated"] = generated
    _write_json(_cell_path(out, job, benchmark, protocol), cell)
    barrier()
    s = cell["summary"]
    line = ", ".join(f"{m} {s[m]['adapter']['mean']:.3f} -> {s[m]['steered']['mean']:.3f} (p={s[m]['p']:.2f})"
                     for m in datasets_.metric_names(benchmark))
    log(f"[{job.name}] {benchmark}: {line}")
