"""The svd-fast command line, end to end on a tiny local model."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from hf_models import char_tokenizer, tiny_model

TRAIN = [{"prompt": f"Q: {a}+{b}? A:", "answer": f" {a + b}"} for a in range(4) for b in range(3)]
CALIB = [{"prompt": f"Q: {a}+{b}? A:", "answer": f" {a + b}"} for a in range(4, 7) for b in range(2)]
MC = [{"prompt": "Q: 2+2? A:", "choices": [" 4", " 5"], "answer": 0},
      {"prompt": "Q: 1+2? A:", "choices": [" 4", " 3", " 9"], "answer": 1}]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, "-m", "svd_fast.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model("llama").save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    tiny_model("qwen2", seed=3).save_pretrained(root / "other")
    char_tokenizer().save_pretrained(root / "other")
    return root


def test_full_pipeline(workspace):
    base, adapter = str(workspace / "base"), str(workspace / "adapter")
    done = run("warm-start", "--model", base, "--data", write_jsonl(workspace / "train.jsonl", TRAIN),
               "--method", "lora", "--lr", "5e-3", "--epochs", "2", "--batch-size", "4", "--out", adapter)
    assert done.returncode == 0, done.stderr
    assert os.path.isfile(os.path.join(adapter, "adapter_config.json"))

    done = run("calibrate", "--model", base, "--adapter", adapter, "--data",
               write_jsonl(workspace / "calib.jsonl", CALIB), "--alpha", "0.3")
    assert done.returncode == 0, done.stderr
    config = json.loads(open(os.path.join(adapter, "steering_config.json")).read())
    assert "mu_bar = " in done.stdout and config["alpha"] == 0.3 and config["n_tokens"] > 0
    assert "steering can improve this adapter's answers by" in done.stdout and "strengths: mean" in done.stdout
    assert "calibration NLL per token at mu = -2: " in done.stdout and ", +2: " in done.stdout

    exact_dir = str(workspace / "exact")
    done = run("calibrate", "--model", base, "--adapter", adapter, "--data", str(workspace / "calib.jsonl"),
               "--alpha", "0.3", "--reduce", "nll", "--fill", "keep", "--out", exact_dir)
    assert done.returncode == 0, done.stderr
    exact = json.loads(open(os.path.join(exact_dir, "steering_config.json")).read())
    assert exact["reduce"] == "nll" and exact["fill"] == "keep" and exact["mu_bar"] == exact["mu_nll"]
    assert exact["nll_trace"] and exact["nll_gain"]["improvement"] >= -1e-6
    assert f"at mu_bar {exact['mu_bar']:+.4f}" in done.stdout

    done = run("generate", "--model", base, "--adapter", adapter, "--prompt", "Q: 1+1? A:", "--prompt", "Q: 3+3? A:",
               "--max-new-tokens", "4", "--compare")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("steered:") == 2 and done.stdout.count("adapter:") == 2
    assert f"mu={config['mu_bar']:.4g}" in done.stdout

    done = run("score", "--model", base, "--adapter", adapter, "--data", write_jsonl(workspace / "mc.jsonl", MC),
               "--mu", "2.0")
    assert done.returncode == 0, done.stderr
    assert "adapter  mu=0" in done.stdout and "steered  mu=2" in done.stdout and "on 2 questions" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["calibrate", "--model", "{root}/nope", "--adapter", "{root}/adapter", "--data", "{root}/calib.jsonl"],
     "model folder not found"),
    (["calibrate", "--model", "{root}/base", "--adapter", "{root}/base", "--data", "{root}/calib.jsonl"],
     "has no adapter_config.json"),
    (["warm-start", "--model", "{root}/base", "--data", "{root}/empty.jsonl", "--out", "{root}/x"],
     "holds no examples"),
    (["warm-start", "--model", "{root}/base", "--data", "{root}/missing.jsonl", "--out", "{root}/x"],
     "training data file not found"),
    (["calibrate", "--model", "{root}/base", "--adapter", "{root}/adapter", "--data", "{root}/calib.jsonl",
      "--alpha", "1.5"], "alpha must lie in (0, 1]"),
    (["generate", "--model", "{root}/other", "--adapter", "{root}/adapter", "--prompt", "x", "--mu", "1"],
     "was trained on the model in"),
    (["warm-start", "--model", "{root}/base", "--data", "{root}/bad.jsonl", "--out", "{root}/x"],
     "must be a dict with string 'prompt' and 'answer'"),
    pytest.param(["generate", "--model", "{root}/base", "--adapter", "{root}/adapter", "--prompt", "x", "--mu", "1",
                  "--device", "cuda"], "sees no CUDA device here: use --device cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    (["score", "--model", "{root}/base", "--adapter", "{root}/adapter", "--data", "{root}/mc.jsonl",
      "--device", "mps"], "unsupported device 'mps'"),
])
def test_user_mistakes_give_one_line_and_exit_2(workspace, args, message):
    if not (workspace / "adapter").exists():
        pytest.skip("needs the adapter from test_full_pipeline")
    (workspace / "empty.jsonl").write_text("")
    write_jsonl(workspace / "bad.jsonl", [{"question": "?"}])
    done = run(*[a.format(root=workspace) for a in args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_every_subcommand_has_help():
    for command in ("warm-start", "calibrate", "generate", "score", "eval", "demo"):
        done = run(command, "--help")
        assert done.returncode == 0 and "--model" in done.stdout
        assert "--device" in done.stdout and "--dtype" in done.stdout


def test_generate_with_bfloat16_weights_on_the_cpu(workspace):
    if not (workspace / "adapter").exists():
        pytest.skip("needs the adapter from test_full_pipeline")
    done = run("generate", "--model", str(workspace / "base"), "--adapter", str(workspace / "adapter"), "--prompt",
               "Q: 1+1? A:", "--max-new-tokens", "3", "--mu", "1", "--device", "cpu", "--dtype", "bfloat16")
    assert done.returncode == 0, done.stderr
    assert "steered:" in done.stdout


@pytest.mark.skipif(shutil.which("svd-fast") is None, reason="console script not on PATH (not pip-installed)")
def test_console_script_installed():
    done = subprocess.run(["svd-fast", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "warm-start" in done.stdout
