"""From-scratch Qwen2/Qwen2.5, Qwen3 and Llama 3 decoders with HF-compatible weights and checkpoints.

    from grpo_core.model import CausalLM
    m = CausalLM.from_pretrained(path, dtype=torch.float32)
    h = m(input_ids)          # [B, T, D] final hidden states
    logits = m.lm_head(h)     # [B, T, V]
    m.save_pretrained(out_dir)
"""
from grpo_core.model.attention import ATTN_BACKENDS
from grpo_core.model.config import ModelArgs
from grpo_core.model.kv_cache import KVCache
from grpo_core.model.layers import LMHead, RMSNorm
from grpo_core.model.transformer import CausalLM

__all__ = ["ATTN_BACKENDS", "CausalLM", "KVCache", "LMHead", "ModelArgs", "RMSNorm"]
