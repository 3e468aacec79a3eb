"""Tiny random HuggingFace models and a character tokenizer, built locally (no downloads)."""
import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM)

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " ")


def char_tokenizer(pad=True):
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    # model_input_names: transformers 4.x's generic fast tokenizer also returns token_type_ids (5.x does not),
    # which HF generate refuses for models that take none
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>" if pad else None, model_input_names=["input_ids", "attention_mask"])
    return tok


VOCAB = len(SPECIALS) + len(CHARS)


def tiny_model(arch="llama", seed=0, tie=False):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gemma3":  # a sliding-window layer (window 4) and a full-attention one, as Gemma 3 alternates them
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=1, head_dim=8, sliding_window=4, max_position_embeddings=256,
                               layer_types=["sliding_attention", "full_attention"], **common)
        model = Gemma3ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # larger logits than the default init, so greedy decoding is not all ties
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.pad_token_id = 0
    return model.eval()
