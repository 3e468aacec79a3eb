"""svd-fast: warm-start an adapter, calibrate mu, generate and score with steering, from the shell.

    svd-fast warm-start --model BASE_DIR --data train.jsonl --method lora --out ADAPTER_DIR
    svd-fast calibrate  --model BASE_DIR --adapter ADAPTER_DIR --data calib.jsonl
    svd-fast generate   --model BASE_DIR --adapter ADAPTER_DIR --prompt "..." --compare
    svd-fast score      --model BASE_DIR --adapter ADAPTER_DIR --data mc.jsonl

Data files are JSON Lines (or one JSON list): {"prompt": ..., "answer": ...} for warm-start and
calibrate, {"prompt": ..., "choices": [...], "answer": index} for score. Models load from local folders
only; nothing is downloaded.
"""
import argparse
import json
import math
import os
import sys


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


def _load_base(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _existing_dir(path, "model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a causal LM and tokenizer from {path}: {str(err).splitlines()[0]}") from None
    return model.eval(), tokenizer


def _load_adapted(model_path, adapter_path):
    from peft import PeftModel

    model, tokenizer = _load_base(model_path)
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
    from .calibration import CalibrationResult

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
    from .training import warm_start

    examples = _read_records(args.data, "training data")
    model, tokenizer = _load_base(args.model)
    peft_model = warm_start(model, tokenizer, examples, method=args.method, epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    peft_model.save_pretrained(args.out)
    print(f"adapter ({args.method}, {len(examples)} examples, {args.epochs} epoch(s)) saved to {args.out}")


def cmd_calibrate(args):
    from .calibration import calibrate

    examples = _read_records(args.data, "calibration data")
    peft_model, tokenizer = _load_adapted(args.model, args.adapter)
    cal = calibrate(peft_model, tokenizer, examples, alpha=args.alpha, reduce=args.reduce,
                    batch_size=args.batch_size, max_length=args.max_length)
    path = cal.save(args.out or args.adapter)
    print(f"mu_bar = {cal.mu_bar:.4f} ({cal.reduce} of {cal.n_tokens} positions, {cal.n_skipped} skipped; "
          f"mean {cal.mean:.4f}, median {cal.median:.4f}, std {cal.std:.4f}) -> {path}")


def cmd_generate(args):
    from .examples import ensure_pad_token
    from .steering import SteeredModel

    peft_model, tokenizer = _load_adapted(args.model, args.adapter)
    mu, alpha, fill = _steering_settings(args)
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "left"
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
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
    from .steering import SteeredModel

    records = _read_records(args.data, "multiple-choice data")
    for i, r in enumerate(records):
        if not (isinstance(r, dict) and isinstance(r.get("prompt"), str) and isinstance(r.get("choices"), list)
                and isinstance(r.get("answer"), int) and 0 <= r["answer"] < len(r["choices"])):
            raise UserError(f"record {i} of {args.data} needs 'prompt' (str), 'choices' (list) and 'answer' "
                            "(index into choices)")
    peft_model, tokenizer = _load_adapted(args.model, args.adapter)
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


# ---------------------------------------------------------------------------------------------------


def build_parser():
    parser = _Parser(prog="svd-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("warm-start", help="fine-tune a fresh PEFT adapter briefly (SPEC 5)")
    p.add_argument("--model", required=True, help="local folder of the base causal LM (with its tokenizer)")
    p.add_argument("--data", required=True, help='JSON Lines of {"prompt": ..., "answer": ...}')
    p.add_argument("--method", default="lora", choices=["lora", "ia3", "prompt", "ptuning_v2"])
    p.add_argument("--epochs", type=_positive_int, default=1)
    p.add_argument("--lr", type=_finite, default=5e-5)
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--max-length", type=_positive_int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write the adapter to")
    p.set_defaults(run=cmd_warm_start)

    p = sub.add_parser("calibrate", help="calibrate mu on labelled data (SPEC 4); writes steering_config.json")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True, help="folder of the PEFT adapter")
    p.add_argument("--data", required=True, help='JSON Lines of {"prompt": ..., "answer": ...}')
    p.add_argument("--alpha", type=_alpha, default=0.1)
    p.add_argument("--reduce", default="mean", choices=["mean", "median", "trimmed", "ratio"])
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-length", type=_positive_int, default=512)
    p.add_argument("--out", help="where to write steering_config.json (default: the adapter folder)")
    p.set_defaults(run=cmd_calibrate)

    for name, helptext, func in (("generate", "generate with steering", cmd_generate),
                                 ("score", "multiple-choice accuracy, adapter vs steered", cmd_score)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--adapter", required=True)
        p.add_argument("--calibration", help="folder with steering_config.json (default: the adapter folder)")
        p.add_argument("--mu", type=_finite, help="steering strength (default: the calibrated mu_bar)")
        p.add_argument("--alpha", type=_alpha, help="confidence mask (default: the calibrated one)")
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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
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
