"""HF's static cache and compile path with steering: every one-forward route fills a static cache of 2B
rows and gives the tokens (and scores) of the dynamic-cache path, with eager and SDPA attention, left
padding, greedy, sampling and beam search; the decode step compiles in one graph (fullgraph=True) and
once for the whole call; routes that cannot say so in one error."""
import pytest
import torch
import transformers
from packaging.version import Version

from svd_fast.decoding import SteeredModel
from svd_fast.decoding.caches import PairedStaticCache

from hf_models import char_tokenizer
from test_steering import PROMPTS, adapted, left_padded

pytestmark = pytest.mark.skipif(Version(transformers.__version__) < Version("5.10"),
                                reason="the static cache with steering needs transformers >= 5.10")

ROUTE_OF = {"lora": "lora", "lora_embed": "mixed", "ia3": "ia3", "prompt": "virtual", "ptuning_v2": "virtual",
            "loha": "tuner", "dora": "tuner"}
FULLGRAPH = ["lora", "ia3", "prompt", "ptuning_v2", "loha"]  # the decode step compiles in one graph
GRAPH_BREAKS = ["lora_embed", "dora"]  # PEFT code dynamo cannot trace: compiles with graph breaks only
COMMON = dict(eos_token_id=None, pad_token_id=0, max_new_tokens=6, return_dict_in_generate=True, output_scores=True)
MODES = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=8),
         "beam": dict(do_sample=False, num_beams=3, num_return_sequences=2)}


def steered_for(method, attention="sdpa", arch="llama"):
    model = adapted(arch, method)
    model.get_base_model().config._attn_implementation = attention
    steered = SteeredModel(model, mu=2.0, alpha=0.3)
    assert steered.route == ROUTE_OF[method]
    return steered


def batch():
    return left_padded(char_tokenizer(), PROMPTS)


def generate(steered, seed=0, **kwargs):
    torch.manual_seed(seed)
    return steered.generate(**batch(), **COMMON, **kwargs)


def assert_same_decoding(static, dynamic):
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def compile_config(fullgraph=True, backend="eager"):
    """HF's compile path on the CPU; backend 'eager' traces with dynamo (graph breaks, recompiles) without
    inductor's code generation, which one test runs for real."""
    config = transformers.CompileConfig(fullgraph=fullgraph, backend=backend, mode="default")
    config._compile_all_devices = True
    return config


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("method", list(ROUTE_OF))
def test_static_cache_decodes_as_the_dynamic_one(method, attention, mode):
    steered = steered_for(method, attention)
    dynamic = generate(steered, **MODES[mode])
    static = generate(steered, cache_implementation="static", **MODES[mode])
    assert isinstance(static.past_key_values, PairedStaticCache)
    rows = len(PROMPTS) * MODES[mode].get("num_beams", 1)
    assert static.past_key_values.layers[0].keys.shape[0] == 2 * rows  # adapted and base rows
    assert_same_decoding(static, dynamic)


@pytest.mark.parametrize("mode", ["greedy", "beam"])
@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "ptuning_v2"])
def test_static_cache_with_sliding_window_layers(method, mode):
    """A tiny Gemma 3 (a sliding-window layer of window 4, a full-attention one): static sliding layers keep
    the last 4 positions, the padded mask still covers the whole sequence."""
    steered = steered_for(method, arch="gemma3")
    dynamic = generate(steered, **MODES[mode])
    static = generate(steered, cache_implementation="static", **MODES[mode])
    assert_same_decoding(static, dynamic)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_inputs_embeds_with_the_static_cache(method):
    steered = steered_for(method)
    inputs = batch()
    embeds = steered.model.get_base_model().get_input_embeddings()(inputs["input_ids"])
    kwargs = dict(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **COMMON)
    dynamic = steered.generate(**kwargs)
    static = steered.generate(**kwargs, cache_implementation="static")
    assert_same_decoding(static, dynamic)


def test_a_second_call_reuses_the_longer_cache_length():
    steered = steered_for("prompt")
    generate(steered, cache_implementation="static", max_cache_len=48)
    dynamic = generate(steered)
    static = generate(steered, cache_implementation="static")  # HF keeps the earlier, longer length
    assert static.past_key_values.positions == 48 + steered.peft_config.num_virtual_tokens
    assert_same_decoding(static, dynamic)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_continuing_from_a_static_cache_with_room(method):
    steered = steered_for(method)
    inputs = batch()
    whole = steered.generate(**inputs, **{**COMMON, "max_new_tokens": 6})
    first = steered.generate(**inputs, **{**COMMON, "max_new_tokens": 2}, cache_implementation="static",
                             max_cache_len=40)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1]:])], 1)
    second = steered.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                              **{**COMMON, "max_new_tokens": 4})
    assert second.sequences.tolist() == whole.sequences.tolist()


def test_continuing_past_the_static_cache_is_one_clear_error():
    steered = steered_for("lora")
    inputs = batch()
    first = steered.generate(**inputs, **{**COMMON, "max_new_tokens": 2}, cache_implementation="static")
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, inputs["input_ids"].shape[1]:])], 1)
    with pytest.raises(ValueError, match=r"static cache holds \d+ tokens .*max_cache_len"):
        steered.generate(input_ids=first.sequences, attention_mask=mask, past_key_values=first.past_key_values,
                         **{**COMMON, "max_new_tokens": 4})


def test_two_forwards_refuse_the_static_cache_in_one_line():
    steered = SteeredModel(adapted("llama", "lora"), mu=2.0, alpha=0.3, one_forward=False)
    with pytest.raises(ValueError, match="needs a one-forward route.*drop cache_implementation"):
        generate(steered, cache_implementation="static")


# ---------------------------------------------------------------------------------------------------
# Compiled decode steps.


@pytest.mark.parametrize("method", FULLGRAPH)
def test_the_decode_step_compiles_in_one_graph_once(method):
    """fullgraph=True fails on any graph break; one graph serves every decode step of the call (the mask is
    padded to the cache's width, the positions and the cache length are tensors)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    steered = steered_for(method)
    dynamic = generate(steered)
    compiled = generate(steered, cache_implementation="static", compile_config=compile_config(fullgraph=True))
    assert_same_decoding(compiled, dynamic)
    assert hasattr(steered._lm, "_compiled_call")  # HF took the compile path
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"{frames} graphs compiled for one generate call"


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_compiled_with_inductor_decodes_as_the_dynamic_path(method):
    torch._dynamo.reset()
    steered = steered_for(method)
    dynamic = generate(steered, **MODES["beam"])
    compiled = generate(steered, cache_implementation="static", compile_config=compile_config(backend="inductor"),
                        **MODES["beam"])
    assert compiled.sequences.tolist() == dynamic.sequences.tolist()
    for a, b in zip(compiled.scores, dynamic.scores):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)  # inductor fuses the float32 arithmetic differently


@pytest.mark.parametrize("method", GRAPH_BREAKS)
def test_routes_with_graph_breaks_say_so_under_fullgraph(method):
    steered = steered_for(method)
    with pytest.raises(ValueError, match="does not compile in one graph.*fullgraph=False"):
        generate(steered, cache_implementation="static", compile_config=compile_config(fullgraph=True))
    torch._dynamo.reset()
    dynamic = generate(steered)
    compiled = generate(steered, cache_implementation="static", compile_config=compile_config(fullgraph=False))
    assert_same_decoding(compiled, dynamic)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_cuda_graphs_decode_as_the_dynamic_path(method):
    """On CUDA HF compiles a static-cache decode step by itself, in its "reduce-overhead" mode (CUDA graphs)."""
    torch._dynamo.reset()
    steered = steered_for(method)
    steered.model.to("cuda")
    inputs = {k: v.to("cuda") for k, v in batch().items()}
    dynamic = steered.generate(**inputs, **COMMON, do_sample=False)
    compiled = steered.generate(**inputs, **COMMON, do_sample=False, cache_implementation="static")
    assert hasattr(steered._lm, "_compiled_call")
    assert compiled.sequences.tolist() == dynamic.sequences.tolist()
