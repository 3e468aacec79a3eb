"""The pipeline under torch.distributed, as torchrun runs it: 2 gloo processes on the CPU give the warm
start, the calibration and the evaluation of one process (same seed), and the command line joins a
process group by itself under torchrun."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from peft import LoraConfig

import svd_fast
from svd_fast import evaluation
from svd_fast.evaluation import data

from hf_models import char_tokenizer, tiny_model

HERE = os.path.dirname(__file__)
TRAIN = [{"prompt": f"Q: {a}+{b}? A:", "answer": f" {a + b}"} for a in range(5) for b in range(3)]
SIZES = evaluation.Sizes(train=6, calib=4, test=7, tqa_train=6, tqa_calib=4, tqa_test=5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process_group(rank, world, port, work, *args):
    """mp.spawn's target: joins a gloo group, runs work(rank, *args), leaves the group."""
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        work(rank, *args)
    finally:
        dist.destroy_process_group()


def run_on_two_processes(work, *args):
    sys.path.insert(0, HERE)
    mp.spawn(in_process_group, args=(2, free_port(), work, *args), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------------
# The warm start, data parallel.


def lora_without_dropout():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def warm_start(method, batch_size):
    config = lora_without_dropout() if method == "lora" else method
    model = svd_fast.warm_start(tiny_model("llama"), char_tokenizer(), TRAIN, method=config, epochs=2, lr=1e-2,
                                batch_size=batch_size, progress=False)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _warm_start_on_rank(rank, out_dir, method, batch_size):
    torch.save(warm_start(method, batch_size), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("method,batch_size", [("lora", 4), ("lora", 3), ("ia3", 1), ("prompt", 5)])
def test_data_parallel_warm_start_equals_one_process(tmp_path, method, batch_size):
    """Every rank ends with the one-process adapter: the batch's summed loss gradients, summed over the
    ranks, over its token count (batch 3 leaves the ranks 2 and 1 examples; batch 1 leaves one rank none)."""
    run_on_two_processes(_warm_start_on_rank, str(tmp_path), method, batch_size)
    single = warm_start(method, batch_size)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(got[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in single.values())


# ---------------------------------------------------------------------------------------------------
# The evaluation harness: warm start, calibration and scoring sharded, results gathered on rank 0.


def fake_world(root, patch):
    """A tiny base model folder, and question pools in place of the packaged benchmarks (patch(module, name,
    value) installs them: pytest's monkeypatch in the test's own process, setattr in a spawned one)."""
    folder = os.path.join(root, "base")
    if not os.path.isdir(folder):
        tiny_model("llama").save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
    pool = {b: [data.Question(b, f"{b} {i}: {i % 3}+1=? Answer: {'the correct answer is' * (i % 2)}", ("1", "2", "3"),
                              (i + 1) % 3) for i in range(30)] for b in ("arc_easy", "piqa")}
    patch(data, "load_benchmark", lambda name, cache=None, template="cloze": pool[name])
    return folder


JOBS = [evaluation.Job("ia3", train_on=("arc_easy", "piqa"), eval_on=("arc_easy", "piqa"), lr=1e-2),
        evaluation.Job("prompt", train_on=("arc_easy",), eval_on=("arc_easy",), lr=1e-2)]


def _evaluate_on_rank(rank, root):
    base = fake_world(root, setattr)  # a spawned process of its own: the patch ends with it
    results = evaluation.run(JOBS, os.path.join(root, "run2"), SIZES, model=base, progress=False, log=lambda m: None,
                             score_batch_size=3)
    with open(os.path.join(root, f"cells{rank}.json"), "w") as f:
        json.dump(results["cells"], f)


def test_evaluation_on_two_processes_equals_one(tmp_path, monkeypatch):
    """IA3 and prompt tuning (no dropout): the cells written by rank 0 of a 2-process run, and what every rank
    returns, equal a one-process run's; a rerun of the finished run redoes nothing."""
    root = str(tmp_path)
    base = fake_world(root, monkeypatch.setattr)
    single = evaluation.run(JOBS, os.path.join(root, "run1"), SIZES, model=base, progress=False, log=lambda m: None)
    run_on_two_processes(_evaluate_on_rank, root)
    for rank in range(2):
        cells = json.loads((tmp_path / f"cells{rank}.json").read_text())
        assert [(c["job"], c["benchmark"], c["n"]) for c in cells] == [(c["job"], c["benchmark"], c["n"])
                                                                        for c in single["cells"]]
        for got, want in zip(cells, single["cells"]):
            assert got["mu_bar"] == pytest.approx(want["mu_bar"], rel=1e-3, abs=1e-4)
            for metric, by_variant in want["summary"].items():
                for variant in ("adapter", "base", "steered"):
                    assert got["summary"][metric][variant]["mean"] == pytest.approx(by_variant[variant]["mean"])
    written = sorted(os.listdir(tmp_path / "run2" / "cells"))
    assert written == sorted(os.listdir(tmp_path / "run1" / "cells"))
    for name in written:  # per question, in the order of the test split
        got = json.loads((tmp_path / "run2" / "cells" / name).read_text())["per_question"]
        want = json.loads((tmp_path / "run1" / "cells" / name).read_text())["per_question"]
        assert [{v: q[v] for v in ("adapter", "base")} for q in got] == [{v: q[v] for v in ("adapter", "base")}
                                                                          for q in want]
    stamp = {name: os.path.getmtime(tmp_path / "run2" / "cells" / name) for name in written}
    run_on_two_processes(_evaluate_on_rank, root)  # resumes: every cell is done
    assert stamp == {name: os.path.getmtime(tmp_path / "run2" / "cells" / name) for name in written}


# ---------------------------------------------------------------------------------------------------
# The command line under torchrun.


def test_cli_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m svd_fast.cli warm-start` then `calibrate`: one adapter and one
    steering_config.json, written by rank 0, equal to one process's."""
    base = str(tmp_path / "base")
    tiny_model("llama").save_pretrained(base)
    char_tokenizer().save_pretrained(base)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def cli(*args, processes=1):
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                     "--master-port", str(free_port()), "-m", "svd_fast.cli"] if processes > 1
                    else [sys.executable, "-m", "svd_fast.cli"])
        done = subprocess.run(launcher + list(args), capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    results = {}
    for processes in (1, 2):
        adapter = str(tmp_path / f"adapter{processes}")
        out = cli("warm-start", "--model", base, "--data", str(train), "--method", "ia3", "--lr", "1e-2",
                  "--batch-size", "4", "--device", "cpu", "--out", adapter, processes=processes)
        assert out.count("saved to") == 1  # rank 0 only
        out = cli("calibrate", "--model", base, "--adapter", adapter, "--data", str(train), "--device", "cpu",
                  processes=processes)
        assert out.count("mu_bar =") == 1
        results[processes] = svd_fast.CalibrationResult.load(adapter)
    assert results[2].n_tokens == results[1].n_tokens
    assert results[2].mu_bar == pytest.approx(results[1].mu_bar, rel=1e-3, abs=1e-4)
