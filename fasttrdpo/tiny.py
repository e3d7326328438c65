"""Tiny models and tokenizers built in-process (no download): for tests, benchmarks and `--model tiny`.

`tiny_tokenizer()` is the byte-level ByT5 tokenizer (needs no vocabulary file; pad=0, eos=1, vocab 384).
`tiny_model()` is a GPTNeoX (the Pythia architecture) built from a config with random weights.
"""
from __future__ import annotations

import torch


def tiny_tokenizer():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    tok.padding_side = "right"
    return tok


def tiny_config(vocab_size: int = 384, hidden_size: int = 64, num_hidden_layers: int = 2,
                num_attention_heads: int = 4, intermediate_size: int | None = None,
                max_position_embeddings: int = 1024, attn_implementation: str = "sdpa"):
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomly initialised GPTNeoXForCausalLM (deterministic for a given seed)."""
    from transformers import GPTNeoXForCausalLM

    cfg = tiny_config(**config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(cfg)
    return model.to(dtype)


def pythia_14m_config(**overrides):
    """Pythia-14m's shape (hidden 128, 6 layers, 4 heads, vocab 50304), built locally."""
    kw = dict(vocab_size=50304, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
              intermediate_size=512, max_position_embeddings=2048)
    kw.update(overrides)
    return tiny_config(**kw)
