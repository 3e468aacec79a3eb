"""calibrate() and warm_start() on tiny random models."""
import json
import math
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


def direct_positions(model, tok, examples):
    """Both models' logits at every answer position (one example at a time) and the labels, float64."""
    z_as, z_bs, labels = [], [], []
    for ex in examples:
        prompt = tok(ex["prompt"])["input_ids"]
        ids = torch.tensor([prompt + tok(ex["answer"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            z_a = model(input_ids=ids).logits[0, -ids.shape[1]:]
            with model.disable_adapter():
                z_b = model(input_ids=ids).logits[0]
        positions = list(range(len(prompt) - 1, ids.shape[1] - 1))
        z_as.append(z_a[positions].double())
        z_bs.append(z_b[positions].double())
        labels.append(ids[0, len(prompt):])
    return torch.cat(z_as), torch.cat(z_bs), torch.cat(labels)


@pytest.mark.parametrize("method", ["lora", "prompt"])
@pytest.mark.parametrize("fill", ["keep", float("-inf"), -2.0])
def test_nll_strength_is_the_exact_minimiser(fill, method):
    """mu_nll (reduce="nll") against the float64 reference on the answer positions computed one example at a
    time: L'(mu_nll) = 0 to Newton's tolerance, L there below every grid point, the grid curve and the count of
    excluded positions equal, and the Newton trace ends where the result says."""
    model, tok = adapted("llama", method), char_tokenizer()
    cal = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, reduce="nll", fill=fill, batch_size=2, progress=False)
    z_a, z_b, labels = direct_positions(model, tok, EXAMPLES)

    def total(mus):
        loss, d_loss, d2_loss = reference.steered_nll(z_a, z_b, labels, mus, alpha=0.3, fill=fill)
        usable = torch.isfinite(loss[:, 0])
        return loss[usable].sum(0), d_loss[usable].sum(0), d2_loss[usable].sum(0), int(usable.sum())

    grid_loss, _, _, n = total(cal.nll_curve["mu"])
    assert cal.n_nll_tokens == n and cal.n_nll_excluded == len(labels) - n
    torch.testing.assert_close(torch.tensor(cal.nll_curve["loss"], dtype=torch.float64), grid_loss / n,
                               rtol=1e-4, atol=1e-5)
    loss, d_loss, d2_loss, _ = total([cal.mu_nll])
    assert cal.mu_bar == cal.mu_nll == cal.reductions["nll"] and cal.nll_refined and cal.nll_trace
    assert cal.nll_trace[-1]["mu"] == cal.mu_nll
    assert abs(float(d_loss[0])) <= 2e-4 * float(d2_loss[0]) * (1 + abs(cal.mu_nll)) + 1e-6 * n  # Newton's tolerance
    assert float(loss[0]) <= float(grid_loss.min()) + 1e-6 * n
    assert set(cal.reductions) == {"mean", "median", "trimmed", "ratio", "nll"}
    gain = cal.nll_gain  # the calibration NLL per token at 0 and at mu_bar, over the positions in L
    zero_loss = total([0.0])[0]
    assert gain["mu"] == cal.mu_bar and gain["n_examples"] == len(EXAMPLES)
    assert gain["nll_at_zero"] == pytest.approx(float(zero_loss[0]) / n, rel=1e-5)
    assert gain["nll_at_mu"] == pytest.approx(float(loss[0]) / n, rel=1e-5)
    assert gain["improvement"] >= -1e-6 and gain["ci"][0] <= gain["improvement"] <= gain["ci"][1]
    if fill == "keep":  # no position can be ruled out, and L(0) is the adapted model's cross-entropy
        assert cal.n_nll_excluded == 0
        zero = cal.nll_curve["mu"].index(0.0)
        ce = torch.nn.functional.cross_entropy(z_a, labels)
        assert cal.nll_curve["loss"][zero] == pytest.approx(float(ce), rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_cached_answer_logits_give_the_same_calibration_with_one_forward(method, monkeypatch):
    """Newton passes from the kept answer-position logits equal those that run the models again (cache_bytes=0,
    memory bounded by one batch), and the cached run teacher-forces the calibration set once."""
    from svd_fast.decoding import SteeredModel

    model, tok = adapted("llama", method), char_tokenizer()
    forwards = []
    original = SteeredModel.logits_pair
    monkeypatch.setattr(SteeredModel, "logits_pair", lambda self, *a, **k: forwards.append(1) or original(self, *a, **k))
    kept = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, reduce="nll", fill="keep", batch_size=2, progress=False)
    cached_forwards, forwards[:] = len(forwards), []
    again = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, reduce="nll", fill="keep", batch_size=2, progress=False,
                               cache_bytes=0)
    assert cached_forwards == 3 and len(forwards) == 3 * (1 + len(again.nll_trace))  # 3 batches a pass
    assert kept.nll_trace and kept.to_dict() == again.to_dict()
    too_small = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, reduce="nll", fill="keep", batch_size=2,
                                   progress=False, cache_bytes=1)  # dropped after the first batch
    assert too_small.to_dict() == kept.to_dict()


def test_answer_positions_keep_each_rows_answer_in_order():
    z = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    targets = torch.tensor([[-100, -100, 7, 8, -100], [-100, 4, -100, -100, -100]])
    from svd_fast.adaptation.calibration import answer_positions

    z_a, z_b, t = answer_positions(z, z + 100, targets)
    assert t.tolist() == [[7, 8], [4, -100]]
    assert torch.equal(z_a[0], z[0, 2:4]) and torch.equal(z_a[1, 0], z[1, 1]) and torch.equal(z_b[0], z[0, 2:4] + 100)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "ptuning_v2"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_answer_nll_equals_the_cross_entropy_at_the_answer_positions(method, arch):
    """answer_nll (the learning-rate sweep's criterion; the warm start's loss, whose LM head runs only at the
    answer-predicting columns) against the full logits of one example at a time, padded batches included."""
    from svd_fast.adaptation.training import answer_nll

    model, tok = adapted(arch, method), char_tokenizer()
    z_a, _, labels = direct_positions(model, tok, EXAMPLES)
    expected = float(torch.nn.functional.cross_entropy(z_a, labels))
    for batch_size in (1, 3):
        assert answer_nll(model, tok, EXAMPLES, batch_size=batch_size) == pytest.approx(expected, rel=1e-5)
    # models without logits_to_keep: one ignores it in **kwargs (OPT on transformers 4.x), one refuses it (GPT-Neo)
    causal_lm = model.get_base_model()
    full = causal_lm.forward

    def ignoring(*args, logits_to_keep=None, **kwargs):
        return full(*args, **kwargs)

    def refusing(*args, **kwargs):
        if "logits_to_keep" in kwargs:
            raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
        return full(*args, **kwargs)

    for forward in (ignoring, refusing):
        causal_lm.forward = forward
        assert answer_nll(model, tok, EXAMPLES, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_nll_grid_estimate_without_refinement():
    """Other reducers still report mu_nll: the grid's Newton estimate, without extra passes."""
    model, tok = adapted("llama"), char_tokenizer()
    exact = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, reduce="nll", fill="keep", progress=False)
    cal = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, reduce="mean", fill="keep", progress=False)
    assert not cal.nll_refined and not cal.nll_trace and cal.reductions["nll"] == cal.mu_nll
    quick = svd_fast.calibrate(model, tok, EXAMPLES, alpha=0.3, reduce="mean", fill="keep", progress=False,
                               measure_gain=False)  # no extra pass at the mean, so no gain
    assert not quick.nll_gain and quick.mu_bar == cal.mu_bar and quick.nll_curve == cal.nll_curve
    z_a, z_b, labels = direct_positions(model, tok, EXAMPLES)
    at_mean = reference.steered_nll(z_a, z_b, labels, [cal.mu_bar], alpha=0.3, fill="keep")[0]
    assert cal.nll_gain["nll_at_mu"] == pytest.approx(float(at_mean.mean()), rel=1e-5)  # the extra pass at mu_bar
    assert cal.mu_bar == cal.reductions["mean"] and cal.nll_curve == exact.nll_curve
    lo = max(m for m, d in zip(cal.nll_curve["mu"], cal.nll_curve["d_loss"]) if d < 0)
    hi = min(m for m, d in zip(cal.nll_curve["mu"], cal.nll_curve["d_loss"]) if d > 0)
    assert lo < cal.mu_nll < hi and lo < exact.mu_nll < hi


def _search_on(loss_fn, start_grid):
    """Runs _NllSearch on a synthetic convex L(mu) (sum over 'positions' = 1), as calibrate_sweep drives it."""
    from svd_fast.adaptation.calibration import _NllSearch

    def at(mu):
        mu = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
        value = loss_fn(mu)
        (first,) = torch.autograd.grad(value, mu, create_graph=True)
        second = torch.autograd.grad(first, mu)[0] if first.requires_grad else torch.zeros(())
        return float(value.detach()), float(first.detach()), float(second)

    search = _NllSearch(start_grid, torch.tensor([at(m) for m in start_grid]).t(), n=1, excluded=0)
    for step in range(60):
        if search.done:
            break
        mu = search.candidate()
        search.update(mu, *at(mu))
    return search


@pytest.mark.parametrize("minimum", [0.3, -7.7, 150.0, -1000.0])
def test_nll_search_finds_minimum_inside_and_beyond_the_grid(minimum):
    from svd_fast.adaptation.calibration import NLL_GRID

    # a log-sum-exp convex curve, flat far away (where Newton alone overshoots), with its minimum at `minimum`
    def loss(mu):
        x = (mu - minimum) / 5.0
        return torch.logsumexp(torch.stack([x, -x, torch.zeros_like(x)]), 0)

    search = _search_on(loss, list(NLL_GRID))
    assert search.done and abs(search.mu - minimum) <= 2e-4 * (1 + abs(minimum))  # Newton's tolerance
    if abs(minimum) < 64:
        assert len(search.trace) <= 5  # Newton from the grid's bracket


def test_nll_search_stops_at_the_limit_when_the_infimum_is_at_infinity():
    from svd_fast.adaptation.calibration import MU_LIMIT, NLL_GRID

    search = _search_on(lambda mu: torch.nn.functional.softplus(mu / 10.0), list(NLL_GRID))  # falls forever as mu -> -inf
    assert search.done and search.at_limit and search.mu == -MU_LIMIT and len(search.trace) <= 5


def test_nll_search_on_a_flat_curve_gives_zero():
    from svd_fast.adaptation.calibration import NLL_GRID

    search = _search_on(lambda mu: mu * 0.0 + 2.0, list(NLL_GRID))
    assert search.done and search.candidate() == 0.0 and search.mu == 0.0


def test_negative_mu_bar_is_not_clipped():
    assert reduce_mu(torch.tensor([-3.0, -1.0, 0.5]), reduce="mean") < 0


def test_save_and_load_roundtrip(tmp_path):
    model, tok = adapted("llama"), char_tokenizer()
    cal = svd_fast.calibrate(model, tok, EXAMPLES, reduce="median", progress=False)
    path = cal.save(tmp_path / "adapter")
    data = json.loads(open(path).read())
    assert data["mu_bar"] == cal.mu_bar and data["reduce"] == "median" and data["fill"] == "-inf"
    assert data["library_version"] == svd_fast.__version__
    assert data["nll_curve"]["mu"] and data["n_nll_tokens"] + data["n_nll_excluded"] == cal.n_tokens + cal.n_skipped
    loaded = CalibrationResult.load(str(tmp_path / "adapter"))
    assert loaded.mu_bar == cal.mu_bar and loaded.fill == float("-inf") and loaded.reductions == cal.reductions
    assert loaded.nll_curve == cal.nll_curve and loaded.mu_nll == cal.mu_nll
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
    flat = svd_fast.calibrate(untrained, tok, EXAMPLES, reduce="nll", fill="keep", progress=False)  # L(mu) is flat
    assert flat.mu_bar == flat.mu_nll == 0.0 and flat.n_tokens == 0 and math.isnan(flat.reductions["mean"])
    assert flat.nll_gain["improvement"] == 0.0


def _calibrate_on_rank(rank, world, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cal = svd_fast.calibrate(adapted("llama"), char_tokenizer(), EXAMPLES, alpha=0.3, progress=False)
        exact = svd_fast.calibrate(adapted("llama"), char_tokenizer(), EXAMPLES, alpha=0.3, reduce="nll", fill="keep",
                                   progress=False)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"mu_bar": cal.mu_bar, "n": cal.n_tokens, "values": sorted(cal.values.tolist()),
                       "mu_nll": exact.mu_nll, "curve": exact.nll_curve["loss"], "n_nll": exact.n_nll_tokens,
                       "gain": exact.nll_gain}, f)
    finally:
        dist.destroy_process_group()


def test_distributed_calibration_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sys.path.insert(0, os.path.dirname(__file__))
    mp.spawn(_calibrate_on_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    single = svd_fast.calibrate(adapted("llama"), char_tokenizer(), EXAMPLES, alpha=0.3, progress=False)
    exact = svd_fast.calibrate(adapted("llama"), char_tokenizer(), EXAMPLES, alpha=0.3, reduce="nll", fill="keep",
                               progress=False)
    mu_nll = [json.loads((tmp_path / f"rank{rank}.json").read_text())["mu_nll"] for rank in range(2)]
    assert mu_nll[0] == mu_nll[1] and mu_nll[0] == pytest.approx(exact.mu_nll, rel=1e-4, abs=1e-5)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["n"] == single.n_tokens
        # other batch compositions (shards) pad differently: float32 noise only
        assert got["mu_bar"] == pytest.approx(single.mu_bar, rel=1e-5, abs=1e-6)
        assert got["values"] == pytest.approx(sorted(single.values.tolist()), rel=1e-4, abs=1e-5)
        assert got["n_nll"] == exact.n_nll_tokens and got["curve"] == pytest.approx(exact.nll_curve["loss"], rel=1e-5)
        assert got["gain"]["n_examples"] == len(EXAMPLES)
        assert got["gain"]["improvement"] == pytest.approx(exact.nll_gain["improvement"], rel=1e-3, abs=1e-6)
        assert got["gain"]["ci"] == pytest.approx(exact.nll_gain["ci"], rel=1e-3, abs=1e-6)  # examples in one order


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
