"""svd-fast: warm-start an adapter, calibrate mu, generate and score with steering, from the shell.

    svd-fast warm-start --model BASE_DIR --data train.jsonl --method lora --out ADAPTER_DIR
    svd-fast calibrate  --model BASE_DIR --adapter ADAPTER_DIR --data calib.jsonl
    svd-fast generate   --model BASE_DIR --adapter ADAPTER_DIR --prompt "..." --compare
    svd-fast score      --model BASE_DIR --adapter ADAPTER_DIR --data mc.jsonl
    svd-fast demo                                   # the README's main job on SmolLM2-135M
    svd-fast eval --methods lora,ia3 --benchmarks arc_easy,truthfulqa --out runs/x
    svd-fast prepare [model] [truthfulqa]           # once: convert the default model, fetch TruthfulQA

Data files are JSON Lines (or one JSON list): {"prompt": ..., "answer": ...} for warm-start and
calibrate, {"prompt": ..., "choices": [...], "answer": index} for score. Models load from local folders
(or the embedded default, smollm2-135m-instruct); nothing is downloaded.
"""
import argparse
import json
import math
import os
import sys

from .distributed import is_main
from .evaluation.models import DEFAULT_MODEL, PACKAGED


class UserError(Exception):
    """A mistake on the command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _read_records(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not JSON Lines or a JSON list ({err})") from None
    if not records:
        raise UserError(f"{path} holds no examples")
    return records


def _existing_dir(path, what):
    if not os.path.isdir(path):
        raise UserError(f"{what} folder not found: {path}")
    return path


def _load_base(name_or_path, args):
    """(model, tokenizer, folder) of a local HF folder or the embedded default model's name, on --device with
    --dtype weights."""
    from .evaluation import models

    try:
        path = models.resolve(name_or_path)
        model, tokenizer = models.load(path, device=args.device, dtype=args.dtype)
    except models.MissingModelError as err:
        raise UserError(str(err)) from None
    return model, tokenizer, path


def _load_adapted(model_path, adapter_path, args):
    from peft import PeftModel

    model, tokenizer, model_path = _load_base(model_path, args)
    _existing_dir(adapter_path, "adapter")
    if not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise UserError(f"{adapter_path} has no adapter_config.json: is it a PEFT adapter folder?")
    with open(os.path.join(adapter_path, "adapter_config.json")) as f:
        trained_on = json.load(f).get("base_model_name_or_path")
    if trained_on and os.path.isdir(trained_on) and os.path.realpath(trained_on) != os.path.realpath(model_path):
        raise UserError(f"the adapter in {adapter_path} was trained on the model in {trained_on}, not {model_path}: "
                        f"pass --model {trained_on}")
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"the adapter in {adapter_path} does not fit the model in {model_path} "
                        f"(was it trained on another base model?): {str(err).splitlines()[0]}") from None
    return peft_model.eval(), tokenizer


def _alpha(text):
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must lie in (0, 1], got {text}")
    return value


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _fill(text):
    if text in ("-inf", "keep"):
        return float("-inf") if text == "-inf" else "keep"
    return _finite(text)


def _steering_settings(args):
    """(mu, alpha, fill): from --mu/--alpha/--fill, else the adapter's steering_config.json."""
    from .adaptation.calibration import CalibrationResult

    calibration = args.calibration or args.adapter
    if args.mu is None:
        try:
            cal = CalibrationResult.load(calibration)
        except FileNotFoundError:
            raise UserError(f"no mu given and no steering_config.json in {calibration}: "
                            "run `svd-fast calibrate` first or pass --mu") from None
        return cal.mu_bar, args.alpha if args.alpha is not None else cal.alpha, (
            args.fill if args.fill is not None else cal.fill)
    return args.mu, args.alpha if args.alpha is not None else 0.1, args.fill if args.fill is not None else float("-inf")


# ---------------------------------------------------------------------------------------------------


def cmd_warm_start(args):
    from .adaptation.training import warm_start

    examples = _read_records(args.data, "training data")
    model, tokenizer, _ = _load_base(args.model, args)
    peft_model = warm_start(model, tokenizer, examples, method=args.method, epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    if is_main():  # under torchrun every rank trained the same adapter
        peft_model.save_pretrained(args.out)
        print(f"adapter ({args.method}, {len(examples)} examples, {args.epochs} epoch(s)) saved to {args.out}")


def cmd_calibrate(args):
    from .adaptation.calibration import calibrate

    examples = _read_records(args.data, "calibration data")
    peft_model, tokenizer = _load_adapted(args.model, args.adapter, args)
    cal = calibrate(peft_model, tokenizer, examples, alpha=args.alpha, reduce=args.reduce, fill=args.fill,
                    batch_size=args.batch_size, max_length=args.max_length)
    if not is_main():  # under torchrun every rank has the same result; rank 0 writes and reports it
        return
    path = cal.save(args.out or args.adapter)
    print(f"mu_bar = {cal.mu_bar:.4f} ({cal.reduce} of {cal.n_tokens} positions, {cal.n_skipped} skipped; "
          f"mean {cal.mean:.4f}, median {cal.median:.4f}, std {cal.std:.4f}) -> {path}")
    print("strengths: " + ", ".join(f"{name} {value:+.4f}" for name, value in cal.reductions.items()))
    print(nll_curve_line(cal))
    print(nll_gain_line(cal))


def nll_curve_line(cal, span=2.0):
    """The calibration NLL per token L(mu) / n on the grid strengths with |mu| <= span, in one line."""
    curve = cal.nll_curve
    points = [f"{mu:+g}: {loss:.4f}" for mu, loss in zip(curve.get("mu", []), curve.get("loss", [])) if abs(mu) <= span]
    return f"calibration NLL per token at mu = {', '.join(points)} (mu_nll {cal.mu_nll:+.4f})"


def nll_gain_line(cal):
    """The calibration NLL at mu = 0 and at mu_bar, in one line a user can read before any evaluation."""
    gain = cal.nll_gain
    if not gain:
        return "calibration NLL: no answer position left in L (every label ruled out by the mask)"
    lo, hi = gain["ci"]
    excluded = f"; {cal.n_nll_excluded} positions left out (label outside the keep set)" if cal.n_nll_excluded else ""
    return (f"steering can improve this adapter's answers by {gain['improvement']:+.4f} nats per token here "
            f"[95% bootstrap over {gain['n_examples']} examples: {lo:+.4f}, {hi:+.4f}] (calibration NLL "
            f"{gain['nll_at_zero']:.4f} at mu = 0 -> {gain['nll_at_mu']:.4f} at mu_bar {gain['mu']:+.4f}, fill "
            f"{cal.fill}{excluded})")


def cmd_generate(args):
    from .decoding.batching import ensure_pad_token
    from .decoding import SteeredModel

    peft_model, tokenizer = _load_adapted(args.model, args.adapter, args)
    mu, alpha, fill = _steering_settings(args)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True).to(peft_model.device)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                    pad_token_id=tokenizer.pad_token_id)
    if args.do_sample:
        settings.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    steered = SteeredModel(peft_model, mu=mu, alpha=alpha, fill=fill).generate(**batch, **settings)
    plain = None
    if args.compare:
        import torch

        with torch.no_grad():
            plain = peft_model.generate(**batch, **settings)
    width = batch["input_ids"].shape[1]
    for i, prompt in enumerate(args.prompt):
        print(f"prompt:   {prompt}")
        print(f"steered:  {tokenizer.decode(steered[i, width:], skip_special_tokens=True)}  (mu={mu:.4g})")
        if plain is not None:
            print(f"adapter:  {tokenizer.decode(plain[i, width:], skip_special_tokens=True)}")


def cmd_score(args):
    from .decoding import SteeredModel

    records = _read_records(args.data, "multiple-choice data")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("choices"), list)
                and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(r["choices"])):
            raise UserError(f"record {i} of {args.data} needs 'prompt' (str), 'choices' (list) and 'answer' "
                            "(index into choices)")
    peft_model, tokenizer = _load_adapted(args.model, args.adapter, args)
    mu, alpha, _ = _steering_settings(args)
    prompts, choices = [r["prompt"] for r in records], [r["choices"] for r in records]
    answers = [r["answer"] for r in records]
    key = 1 if args.normalize else 0
    rows = []
    for name, model_mu in (("adapter", 0.0), ("steered", mu)):
        scores = SteeredModel(peft_model, mu=model_mu, alpha=alpha).score_choices(
            tokenizer, prompts, choices, batch_size=args.batch_size, fill=args.fill)[key]
        picks = scores.nan_to_num(nan=-math.inf).argmax(-1).tolist()
        rows.append((name, model_mu, sum(p == a for p, a in zip(picks, answers)) / len(answers)))
    for name, model_mu, accuracy in rows:
        print(f"{name:8s} mu={model_mu:<8.4g} accuracy {accuracy:.3f} on {len(answers)} questions")


def _csv(choices, what):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {','.join(unknown) or text!r}: choose from "
                                             f"{','.join(choices)}")
        return items
    return parse


def cmd_prepare(args):
    from .evaluation import data, models

    for what in args.what:
        if what == "model":
            print(f"default model: {models.prepare_default_model()}")
        elif what in models.PACKAGED:
            print(f"{what}: {models.prepare_packaged_model(what)}")
        else:
            print(f"TruthfulQA: {data.prepare_truthfulqa()}")


def _eval_jobs(args):
    from . import evaluation
    from .evaluation import data

    jobs = []
    commonsense = tuple(b for b in args.benchmarks if b in data.COMMONSENSE)
    groups = [(b,) for b in commonsense] if args.per_benchmark else ([commonsense] if commonsense else [])
    if data.TRUTHFULQA in args.benchmarks:
        groups.append((data.TRUTHFULQA,))
    for method in args.methods:
        for epochs in args.epochs:
            jobs += [evaluation.Job(method, epochs, group, group, lr=args.lr, batch_size=args.batch_size,
                                    template=args.template or ("choices" if args.protocol == "generate" else "cloze"))
                     for group in groups]
    return jobs


def _sizes(args):
    from .evaluation.harness import Sizes

    return Sizes(train=args.train, calib=args.calib, test=args.test, tqa_train=args.tqa_train,
                 tqa_calib=args.tqa_calib, tqa_test=args.tqa_test, seed=args.seed)


def _run_eval(args, jobs, sizes):
    from . import evaluation
    from .evaluation import data, models

    try:
        return evaluation.run(jobs, args.out, sizes, model=args.model, protocol=getattr(args, "protocol", "loglik"),
                              device=args.device, dtype=args.dtype, score_batch_size=args.score_batch_size)
    except (data.MissingDataError, models.MissingModelError) as err:
        raise UserError(str(err)) from None


def cmd_eval(args):
    if args.preset == "matrix":
        return _run_matrix(args)
    args.model = args.model or DEFAULT_MODEL
    results = _run_eval(args, _eval_jobs(args), _sizes(args))
    if not is_main():
        return
    with open(f"{args.out}/results.md") as f:
        print(f.read())
    print(f"results: {args.out}/results.json, {args.out}/results.md, plots in {args.out}/plots ({len(results['cells'])} "
          "cells)")


def _run_matrix(args):
    from .evaluation import data, matrix, models

    try:
        matrix.run_matrix(args.out, (args.model,) if args.model else matrix.MODELS, device=args.device, dtype=args.dtype,
                          score_batch_size=args.score_batch_size)
    except (data.MissingDataError, models.MissingModelError) as err:
        raise UserError(str(err)) from None
    if is_main():
        with open(f"{args.out}/results.md") as f:
            print(f.read())


def cmd_demo(args):
    """The README's main job: LoRA warm start on ARC-Easy, calibration, held-out evaluation, one generation."""
    import time

    import torch

    from . import evaluation
    from .evaluation import data
    from .decoding import SteeredModel

    start = time.time()
    job = evaluation.Job("lora", 1, ("arc_easy",), ("arc_easy",))
    sizes = evaluation.Sizes(train=args.train, calib=args.calib, test=args.test, seed=args.seed)
    results = _run_eval(args, [job], sizes)
    if not is_main():  # the evaluation ran sharded; rank 0 reports it
        return
    cell = results["cells"][0]
    s = cell["summary"]["acc"]
    print(f"\nSmolLM2-135M-Instruct, LoRA warm start on {args.train} ARC-Easy questions, mu calibrated on {args.calib}, "
          f"scored on {cell['n']} held-out questions (length-normalised log-likelihood, fill=keep):")
    for name in ("base", "adapter", "steered", "nll", "median", "ratio", "no_mask"):
        if name not in s:
            continue
        lo, hi = s[name]["ci"]
        mu = f"  (mu {cell['variants'][name]['mu']:+.3f})" if name in cell["variants"] else ""
        print(f"  {name:8s} accuracy {100 * s[name]['mean']:5.1f}%  [{100 * lo:.1f}, {100 * hi:.1f}]{mu}")
    print(f"  steered - adapter: {100 * s['delta']['mean']:+.1f} points, paired test p = {s['p']:.3f} "
          f"(mu_bar = {cell['mu_bar']:+.3f}, the paper's mean)")
    peft_model, tokenizer, calibrations = evaluation.load_job(args.out, job, args.model, device=args.device,
                                                              dtype=args.dtype)
    main = calibrations[evaluation.ALPHAS[0]]
    print(f"  {nll_curve_line(main)}")
    print(f"  exact strength (the minimiser of the calibration NLL, alpha {main.alpha}): {nll_gain_line(main)}")
    # One question, decoded greedily by the adapter and with steering (the -inf mask acting).
    question = data.split(data.load_benchmark("arc_easy"), args.train, args.calib, args.test, args.seed).test[0]
    batch = tokenizer(question.prompt, return_tensors="pt").to(peft_model.device)
    with torch.no_grad():
        plain = peft_model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    steered = SteeredModel(peft_model, mu=cell["mu_bar"], alpha=0.1).generate(
        **batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    print(f"\n{question.prompt}   (correct: {question.options[question.label]})")
    for name, tokens in (("adapter", plain), ("steered", steered)):
        text = tokenizer.decode(tokens[0, width:], skip_special_tokens=True).strip()
        print(f"  {name}: {text.splitlines()[0] if text else ''}")
    print(f"\ntables: {args.out}/results.md; plots: {args.out}/plots/ (the NLL curve: {job.name}_nll.png); "
          f"done in {time.time() - start:.0f} s")


# ---------------------------------------------------------------------------------------------------


def _add_placement(parser, scoring=False):
    from .devices import DEVICES, DTYPES

    if scoring:
        parser.add_argument("--score-batch-size", type=_positive_int, default=8,
                            help="questions per scoring forward (default 8): bounds memory, leaves the scores as "
                                 "they are (--batch-size is the warm start's, part of a job's settings)")
    parser.add_argument("--device", default="auto", help=f"{', '.join(DEVICES)} or cuda:N (default auto: CUDA when "
                        "available, else the CPU)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="the model's weights (default auto: bfloat16 on CUDA, float32 on the CPU)")


def build_parser():
    parser = _Parser(prog="svd-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("warm-start", help="fine-tune a fresh PEFT adapter briefly (SPEC 5)")
    p.add_argument("--model", required=True, help=f"local folder of the base causal LM (with its tokenizer), or a "
                   f"packaged model: {', '.join(PACKAGED)}")
    p.add_argument("--data", required=True, help='JSON Lines of {"prompt": ..., "answer": ...}')
    p.add_argument("--method", default="lora", choices=["lora", "ia3", "prompt", "ptuning_v2"])
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--lr", type=_finite, default=5e-5)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--max-length", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write the adapter to")
    _add_placement(p)
    p.set_defaults(run=cmd_warm_start)

    p = sub.add_parser("calibrate", help="calibrate mu on labelled data (SPEC 4); writes steering_config.json")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, help="folder of the PEFT adapter")
    p.add_argument("--data", required=True, help='JSON Lines of {"prompt": ..., "answer": ...}')
    p.add_argument("--alpha", type=_alpha, default=0.1)
    p.add_argument("--reduce", default="mean", choices=["mean", "median", "trimmed", "ratio", "nll"],
                   help="mean: the paper's; nll: the exact minimiser of the steered calibration NLL")
    p.add_argument("--fill", type=_fill, default=float("-inf"),
                   help="masked tokens while decoding (-inf, keep or a number); the nll strength is fitted for it")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-length", type=_positive_int, default=512)
    p.add_argument("--out", help="where to write steering_config.json (default: the adapter folder)")
    _add_placement(p)
    p.set_defaults(run=cmd_calibrate)

    for name, helptext, func in (("generate", "generate with steering", cmd_generate),
                                 ("score", "multiple-choice accuracy, adapter vs steered", cmd_score)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--adapter", required=True)
        p.add_argument("--calibration", help="folder with steering_config.json (default: the adapter folder)")
        p.add_argument("--mu", type=_finite, help="steering strength (default: the calibrated mu_bar)")
        p.add_argument("--alpha", type=_alpha, help="confidence mask (default: the calibrated one)")
        _add_placement(p)
        p.set_defaults(run=func)
        if name == "generate":
            p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
            p.add_argument("--fill", type=_fill, help='masked tokens: -inf, keep or a number')
            p.add_argument("--max-new-tokens", type=_positive_int, default=32)
            p.add_argument("--do-sample", action="store_true")
            p.add_argument("--temperature", type=_finite, default=1.0)
            p.add_argument("--top-k", type=int, default=50)
            p.add_argument("--top-p", type=_finite, default=1.0)
            p.add_argument("--num-beams", type=_positive_int, default=1)
            p.add_argument("--compare", action="store_true", help="also print the unsteered adapter's output")
        else:
            p.add_argument("--data", required=True, help='JSON Lines of {"prompt", "choices", "answer": index}')
            p.add_argument("--fill", type=_fill, default="keep",
                           help='masked tokens when scoring (default keep: under -inf choices tie at -inf)')
            p.add_argument("--normalize", action="store_true", help="length-normalised log-likelihood")
            p.add_argument("--batch-size", type=_positive_int, default=8)
    from .evaluation.data import BENCHMARKS, COMMONSENSE
    from .adaptation.training import METHODS

    p = sub.add_parser("prepare", help="convert a packaged model and fetch TruthfulQA into the cache, once")
    p.add_argument("what", nargs="*", default=["model", "truthfulqa"], choices=["model", "truthfulqa", *PACKAGED],
                   help=f"model: the default ({DEFAULT_MODEL}); or a packaged model's name")
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("eval", help="warm-started adapter vs + steering on the benchmarks (resumable)")
    p.add_argument("--model", help=f"local HF folder, or a packaged model: {', '.join(PACKAGED)} (default "
                   f"{DEFAULT_MODEL}; with --preset matrix: both packaged models)")
    p.add_argument("--methods", type=_csv(METHODS, "method"), default=["lora"], help="comma-separated")
    p.add_argument("--benchmarks", type=_csv(BENCHMARKS, "benchmark"), default=list(COMMONSENSE),
                   help="comma-separated (default: the eight commonsense sets)")
    p.add_argument("--per-benchmark", action="store_true",
                   help="one adapter per commonsense set instead of one on their merged train splits")
    p.add_argument("--preset", choices=["matrix"], help="matrix: the committed matrix, svd_fast.evaluation.matrix (its "
                   "own jobs and sizes: ignores the job and size options)")
    p.add_argument("--epochs", type=_positive_int, nargs="+", default=[1])
    p.add_argument("--lr", type=_finite, help="warm-start learning rate (default: per method, see README)")
    p.add_argument("--batch-size", type=_positive_int, default=4)
    p.add_argument("--protocol", choices=["loglik", "generate"], default="loglik",
                   help="loglik: option log-likelihood; generate: greedy answer parsed to an option")
    p.add_argument("--template", choices=["cloze", "choices"],
                   help="commonsense prompts (default: cloze for loglik, choices for generate)")
    p.add_argument("--out", required=True, help="run folder; a rerun skips its finished cells")
    sizes = p.add_argument_group("split sizes (questions per benchmark; disjoint, seeded)")
    for name, default in (("train", 50), ("calib", 16), ("test", 60), ("tqa-train", 100), ("tqa-calib", 49),
                          ("tqa-test", 150)):
        sizes.add_argument(f"--{name}", type=int, default=default)
    sizes.add_argument("--seed", type=int, default=0)
    _add_placement(p, scoring=True)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("demo", help="the README's main job on the embedded default model")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="svd_fast_demo")
    p.add_argument("--train", type=_positive_int, default=300)
    p.add_argument("--calib", type=_positive_int, default=100)
    p.add_argument("--test", type=_positive_int, default=170)
    p.add_argument("--seed", type=int, default=0)
    _add_placement(p, scoring=True)
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv=None):
    """The command line. Under torchrun (`torchrun --nproc-per-node N -m svd_fast.cli eval|warm-start|calibrate|demo
    ...`) each process joins one process group (gloo on CPUs, NCCL with one GPU per process on CUDA) and takes
    its share of the work; rank 0 writes and prints."""
    from .distributed import process_group_from_torchrun

    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command in ("generate", "score", "prepare"):
        print(f"svd-fast {args.command}: error: runs in one process; torchrun shards eval, warm-start, calibrate "
              "and demo only: run it without torchrun", file=sys.stderr)
        return 2
    try:
        with process_group_from_torchrun(getattr(args, "device", "auto")) as device:
            if hasattr(args, "device"):
                args.device = device
            args.run(args)
    except UserError as err:
        print(f"svd-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as err:  # raised by the library on bad input
        print(f"svd-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
