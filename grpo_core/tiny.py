"""A tiny randomly initialised model + the tiny tokenizer in HF layout, for tests and the CPU demo."""
from __future__ import annotations

import os

import torch

from grpo_core.model import CausalLM, ModelArgs
from grpo_core.tokenizer import build_tiny_tokenizer


def build_tiny_model_dir(
    out_dir: str | os.PathLike,
    family: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_position_embeddings: int = 512,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Write tokenizer files, config.json and model.safetensors into out_dir; returns out_dir as a str.

    The model's vocabulary is exactly the tiny tokenizer's; weights are Normal(0, 0.02) from ``seed``.
    """
    out_dir = os.fspath(out_dir)
    tokenizer = build_tiny_tokenizer(out_dir)
    args = ModelArgs(
        family=family,
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CausalLM.from_config(args, dtype=dtype, seed=seed)
    # save_pretrained swaps in a fresh directory atomically and carries the tokenizer files over.
    model.save_pretrained(out_dir)
    return out_dir
