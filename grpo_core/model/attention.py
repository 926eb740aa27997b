"""Grouped-query self-attention with three input layouts and two backends.

Layouts (chosen once per model forward, described by ``AttnContext``):
- "causal": a dense [B, T] batch, every row one sequence starting at position 0 (or at given positions);
- "varlen": a packed stream [1, total] of several sequences delimited by ``cu_seqlens``; tokens never attend
  across sequences;
- "cache": incremental decoding against a ``KVCache``; each row's new tokens attend to that row's cached
  tokens plus themselves.
Backends: flash-attn (CUDA, fp16/bf16, imported only when used) and torch SDPA (everywhere, exact on CPU).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grpo_core import GPU_EXTRA_INSTALL
from grpo_core.model.config import ModelArgs
from grpo_core.model.kv_cache import KVCache
from grpo_core.model.layers import RMSNorm, apply_rotary

ATTN_BACKENDS = ("auto", "sdpa", "flash_attn")
_FLASH_MISSING = f"attn_backend='flash_attn' needs flash-attn (the gpu extra): {GPU_EXTRA_INSTALL}"
# SDPA grew native grouped-query support (enable_gqa) in torch 2.5; before that k/v are repeated.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@functools.lru_cache(maxsize=None)  # asked on every forward; a sys.path scan each time would add up
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_attn_backend(name: str) -> None:
    """Fail at model construction, not at the first forward, when the backend is unknown or missing."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {name!r}")
    if name == "flash_attn" and not flash_attn_installed():
        raise ImportError(_FLASH_MISSING)


def use_flash_attn(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this forward runs flash-attn: asked for by name, or "auto" with it installed on CUDA in half."""
    if backend == "sdpa":
        return False
    usable = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if backend == "flash_attn":
        if not flash_attn_installed():
            raise ImportError(_FLASH_MISSING)
        if not usable:
            raise ValueError(
                f"attn_backend='flash_attn' runs on CUDA in fp16/bf16 only; got device={device.type}, dtype={dtype}"
            )
        return True
    return usable and flash_attn_installed()


@dataclass
class AttnContext:
    """Per-forward attention inputs shared by all layers (built once in CausalLM.forward)."""

    kind: str  # "causal" | "varlen" | "cache"
    use_flash: bool = False
    cu_seqlens: torch.Tensor | None = None  # int32 [S + 1], varlen only
    max_seqlen: int = 0  # longest packed sequence, flash varlen only
    mask: torch.Tensor | None = None  # bool, True = attend: [1, 1, total, total] varlen-SDPA / [B, 1, T, L + 1] cache
    # varlen-SDPA as a right-padded batch [S, L] (when cheaper than the block-diagonal mask, see
    # CausalLM._varlen_context): pad_index [S, L] packed token of each padded slot (clamped inside the stream),
    # unpad_index [total] padded slot (s * L + t) of each packed token.
    pad_index: torch.Tensor | None = None
    unpad_index: torch.Tensor | None = None
    cache: KVCache | None = None
    write_slot: torch.Tensor | None = None  # [B, T] long, cache only
    batch_index: torch.Tensor | None = None  # [B, T] long row index for the cache scatter


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q [B, H, T, hd]; k, v [B, Hkv, S, hd]; mask bool broadcastable to [B, H, T, S] -> [B, H, T, hd]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _SDPA_GQA:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    kwargs = {"enable_gqa": True} if groups > 1 and _SDPA_GQA else {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, **kwargs)


class Attention(nn.Module):
    """Multi-head attention with H query heads sharing Hkv key/value heads, RoPE, optional per-head q/k norm."""

    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = args.num_attention_heads
        self.num_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, self.num_heads * self.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, self.num_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, args.hidden_size, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """x: [B, T, D]; cos/sin: [B, T, head_dim] -> [B, T, D]."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if ctx.kind == "cache":
            out = self._cached(q, k, v, ctx)
        elif ctx.use_flash:
            out = self._flash(q, k, v, ctx)
        elif ctx.kind == "varlen" and ctx.pad_index is not None:
            out = self._padded_varlen(q, k, v, ctx)
        elif ctx.kind == "varlen":
            out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.mask, causal=False)
            out = out.transpose(1, 2)
        else:
            out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, causal=True)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.head_dim))

    @staticmethod
    def _padded_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Packed [1, total, H, hd] -> a right-padded batch [S, H, L, hd] -> causal SDPA -> packed again.
        Exact: a real token attends only to earlier tokens of its own sequence, all real (padding sits at the end
        of each row); padded queries are dropped and padded keys are seen by padded queries only, so they get
        no gradient. Attention work is S * L^2 instead of total^2, and no [total, total] mask is built."""
        s_count, length = ctx.pad_index.shape
        pad = lambda x: x[0][ctx.pad_index].transpose(1, 2)  # [S, L, h, hd] -> [S, h, L, hd]
        out = _sdpa(pad(q), pad(k), pad(v), None, causal=True)  # [S, H, L, hd]
        out = out.transpose(1, 2).reshape(s_count * length, *out.shape[1:2], out.shape[-1])
        return out[ctx.unpad_index][None]

    def _cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """Scatter the new k/v into the cache, then attend over the whole slab with a per-row position mask."""
        k_cache, v_cache = ctx.cache.layer(self.layer_idx)  # [B, L + 1, Hkv, hd]
        k_cache[ctx.batch_index, ctx.write_slot] = k.to(k_cache.dtype)
        v_cache[ctx.batch_index, ctx.write_slot] = v.to(v_cache.dtype)
        out = _sdpa(
            q.transpose(1, 2), k_cache.transpose(1, 2).to(q.dtype), v_cache.transpose(1, 2).to(q.dtype),
            ctx.mask, causal=False,
        )
        return out.transpose(1, 2)

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """flash-attn on [B, T, H, hd] (dense) or the packed [total, H, hd] stream (varlen)."""
        import flash_attn  # only reached on CUDA with flash-attn installed (see use_flash_attn)

        if ctx.kind == "varlen":
            out = flash_attn.flash_attn_varlen_func(
                q[0], k[0], v[0], ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen, causal=True
            )
            return out.unsqueeze(0)
        return flash_attn.flash_attn_func(q, k, v, causal=True)
