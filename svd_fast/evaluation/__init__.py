"""The evaluation on a real model, offline: the default model from its PyPI package (`models`), the
benchmarks and their splits (`data`), the resumable harness (`harness`: jobs, scoring, cells), its
statistics (`svd_fast.statistics`, shared with the calibration) and the tables and plots (`report`).

    from svd_fast.evaluation import data, models
    results = svd_fast.evaluation.run([svd_fast.evaluation.Job("lora", train_on=("piqa",), eval_on=("piqa",))], "runs/b")

The harness's names load on first use (they pull in transformers and peft).
"""
from . import data, models
from .data import metric_names

_HARNESS = ("Job", "Sizes", "run", "collect", "load_job", "chosen_learning_rate", "variants", "question_metrics", "parse_choice",
            "score_question", "score_questions", "scoring_batches", "option_logits", "questions_option_logits",
            "generate_choices", "ALPHAS", "FIXED_MU", "LEARNING_RATES", "NO_MASK_ALPHA", "PROTOCOLS")
_STATISTICS = ("bootstrap_ci", "bootstrap_ratio_ci", "paired_test", "summarise_cell", "minimum_detectable_effect",
               "paired_comparison")

__all__ = ["data", "models", "metric_names", *_HARNESS, *_STATISTICS]


def __getattr__(name):
    import importlib

    if name in _HARNESS:
        return getattr(importlib.import_module(".harness", __name__), name)
    if name in _STATISTICS:
        return getattr(importlib.import_module("..statistics", __name__), name)
    if name == "statistics":
        return importlib.import_module("..statistics", __name__)
    if name in ("harness", "report", "matrix"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
