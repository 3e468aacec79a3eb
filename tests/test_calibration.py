"""calibrate() and warm_start() on tiny random models."""
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

import svd_fast
from svd_fast import reference
from svd_fast.adaptation.calibration import CalibrationResult, reduce_mu

from hf_models import char_tokenizer, tiny_model
from test_steering import adapted

EXAMPLES = [
    {"prompt": "Q: capital of France? A:", "answer": " Paris"},
    {"prompt": "Q: 2+2? A:", "answer": " 4"},
    {"prompt": "Q: color of the sky? A:", "answer": " blue, mostly"},
    {"prompt": "Q: opposite of hot? A:", "answer": " cold"},
    {"prompt": "Q: first letter? A:", "answer": " a"},
]


def direct_mu_star(model, tok, examples, alpha):
    """Per example, both models on the whole sequence and the reference op at the answer positions."""
    values = []
    for ex in examples:
        prompt = tok(ex["prompt"])["input_ids"]
        ids = torch.tensor([prompt + tok(ex["answer"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            z_a = model(input_ids=ids).logits[0, -ids.shape[1]:]  # prompt tuning returns virtual positions too
            with model.disable_adapter():
                z_b = model(input_ids=ids).logits[0]
        positions = range(len(prompt) - 1, ids.shape[1] - 1)
        mu_star, valid, _, _ = reference.token_mu(z_a[list(positions)], z_b[list(positions)], ids[0, len(prompt):],
                                                  alpha)
        values += mu_star[valid].tolist()
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "ptuning_v2"])
def test_calibration_matches_direct_per_position_computation(method):
    model, tok = adapted("llama", method), char_tokenizer()
    cal = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, batch_size=2, progress=False)
    expected = direct_mu_star(model, tok, EXAMPLES, 0.3)
    n_answer_tokens = sum(len(tok(ex["answer"], add_special_tokens=False)["input_ids"]) for ex in EXAMPLES)
    assert cal.n_tokens == len(expected) and cal.n_tokens + cal.n_skipped == n_answer_tokens
    torch.testing.assert_close(cal.values.sort().values, expected.sort().values, rtol=1e-3, atol=1e-4)
    assert cal.mu_bar == pytest.approx(float(expected.mean()), rel=1e-3, abs=1e-4)
    assert cal.median == pytest.approx(float(expected.median()), rel=1e-3, abs=1e-4)
    assert sum(cal.histogram["counts"]) == cal.n_tokens
    assert cal.adapter == "default" and len(cal.data_fingerprint) == 16


def test_reducers():
    values = torch.tensor([-10.0, 0.0, 1.0, 2.0, 100.0], dtype=torch.float64)
    numerator = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5], dtype=torch.float64)
    norm_sq = torch.tensor([1.0, 1.0, 2.0, 4.0, 2.0], dtype=torch.float64)
    assert reduce_mu(values, reduce="mean") == pytest.approx(18.6)
    assert reduce_mu(values, reduce="median") == 1.0
    assert reduce_mu(values, reduce="trimmed", trim=0.4) == pytest.approx(1.0)  # keeps 0, 1, 2
    assert reduce_mu(values, numerator, norm_sq, reduce="ratio", eps=0.0) == pytest.approx(5.5 / 10.0)
    with pytest.raises(ValueError, match="reduce must be one of"):
        reduce_mu(values, reduce="mode")


def test_negative_mu_bar_is_not_clipped():
    assert reduce_mu(torch.tensor([-3.0, -1.0, 0.5]), reduce="mean") < 0


def test_save_and_load_roundtrip(tmp_path):
    model, tok = adapted("llama"), char_tokenizer()
    cal = svd_fast.calibrate(model, tok, EXAMPLES, reduce="median", progress=False)
    path = cal.save(tmp_path / "adapter")
    data = json.loads(open(path).read())
    assert data["mu_bar"] == cal.mu_bar and data["reduce"] == "median" and data["fill"] == "-inf"
    assert data["library_version"] == svd_fast.__version__
    loaded = CalibrationResult.load(str(tmp_path / "adapter"))
    assert loaded.mu_bar == cal.mu_bar and loaded.fill == float("-inf") and loaded.reductions == cal.reductions
    with pytest.raises(FileNotFoundError, match="no steering_config.json"):
        CalibrationResult.load(str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "steering_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CalibrationResult.load(str(tmp_path / "broken"))


def test_calibration_errors():
    model, tok = adapted("llama"), char_tokenizer()
    with pytest.raises(ValueError, match="calib_examples is empty"):
        svd_fast.calibrate(model, tok, [], progress=False)
    with pytest.raises(ValueError, match="must be a dict with string 'prompt' and 'answer'"):
        svd_fast.calibrate(model, tok, [{"question": "x"}], progress=False)
    with pytest.raises(ValueError, match="alpha must lie in"):
        svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.0, progress=False)
    untrained = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).eval()  # B = 0
    with pytest.raises(ValueError, match="all .* answer positions were skipped"):
        svd_fast.calibrate(untrained, tok, EXAMPLES, progress=False)


def _calibrate_on_rank(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cal = svd_fast.calibrate(adapted("llama"), char_tokenizer(), EXAMPLES, alpha=0.3, progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"mu_bar": cal.mu_bar, "n": cal.n_tokens, "values": sorted(cal.values.tolist())}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_calibration_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sys.path.insert(0, os.path.dirname(__file__))
    mp.spawn(_calibrate_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = svd_fast.calibrate(adapted("llama"), char_tokenizer(), EXAMPLES, alpha=0.3, progress=False)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n"] == single.n_tokens
        # other batch compositions (shards) pad differently: float32 noise only
        assert got["mu_bar"] == pytest.approx(single.mu_bar, rel=1e-5, abs=1e-6)
        assert got["values"] == pytest.approx(sorted(single.values.tolist()), rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# warm_start


def adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,config_type", [("lora", LoraConfig), ("ia3", IA3Config),
                                                ("prompt", PromptTuningConfig), ("ptuning_v2", PrefixTuningConfig)])
def test_warm_start_presets_train_and_are_deterministic(method, config_type):
    tok = char_tokenizer()
    runs = [svd_fast.warm_start(tiny_model("llama"), tok, EXAMPLES, method=method, lr=1e-2, batch_size=2,
                                progress=False) for _ in range(2)]
    assert isinstance(runs[0].peft_config["default"], config_type)
    first, second = adapter_weights(runs[0]), adapter_weights(runs[1])
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    fresh = get_peft_model(tiny_model("llama"), runs[0].peft_config["default"])
    assert any(not torch.equal(first[k], w) for k, w in adapter_weights(fresh).items() if k in first)


def test_warm_start_lowers_the_answer_loss():
    tok = char_tokenizer()
    model = svd_fast.warm_start(tiny_model("qwen2"), tok, EXAMPLES * 4, method="lora", lr=5e-3, epochs=2,
                                batch_size=4, progress=False)
    cal_before = direct_loss(model, tok, adapter=False)
    cal_after = direct_loss(model, tok, adapter=True)
    assert cal_after < cal_before


def direct_loss(model, tok, adapter):
    from svd_fast.adaptation.examples import batches

    ids, mask, labels = next(batches(tok, EXAMPLES, len(EXAMPLES)))
    with torch.no_grad():
        if adapter:
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        with model.disable_adapter():
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def test_warm_start_on_gpt2_uses_peft_default_targets():
    model = svd_fast.warm_start(tiny_model("gpt2"), char_tokenizer(), EXAMPLES[:2], progress=False)
    assert "c_attn" in model.peft_config["default"].target_modules


def test_warm_start_errors():
    tok = char_tokenizer()
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        svd_fast.warm_start(tiny_model(), tok, EXAMPLES, epochs=0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        svd_fast.warm_start(tiny_model(), tok, EXAMPLES, lr=-1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        svd_fast.warm_start(tiny_model(), tok, EXAMPLES, method="adapterx")
    with pytest.raises(ValueError, match="already carries a PEFT adapter"):
        svd_fast.warm_start(adapted("llama"), tok, EXAMPLES)
    with pytest.raises(ValueError, match="train_examples is empty"):
        svd_fast.warm_start(tiny_model(), tok, [])
