"""Tiny random-init configurations of the model families kvfx is tested on (shared by the tests)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96

# model_type -> config kwargs; hidden 64, 4 query heads (2 KV heads where the family has GQA), 2 layers.
FAMILIES = {
    "llama": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=64),
    "mistral": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                    intermediate_size=64, sliding_window=5),
    "qwen2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=64),
    "qwen3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=64, head_dim=16),
    "gemma2": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                   intermediate_size=64, head_dim=16, sliding_window=5),
    "phi3": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                 intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(n_embd=64, n_head=4, n_layer=2, bos_token_id=1, eos_token_id=2),
    "gptj": dict(n_embd=64, n_head=4, n_layer=2, rotary_dim=8, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                     bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, ffn_dim=64, word_embed_proj_dim=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "falcon": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, new_decoder_architecture=False,
                   multi_query=True, bos_token_id=1, eos_token_id=2),
    "mpt": dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, use_cache=True, bos_token_id=1,
                eos_token_id=2),
}


def tiny_model(family: str, attn_implementation: str, seed: int = 0, dtype=torch.float32):
    """A random tiny model of ``family``; raises ValueError if transformers lacks that attention implementation."""
    config = AutoConfig.for_model(family, vocab_size=VOCAB, **FAMILIES[family])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype).eval()


def left_padded_batch(lengths: list[int], seed: int = 0):
    """Random token ids with left padding (pad id 0) for prompts of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask
