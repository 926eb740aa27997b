"""Clipped-ratio policy loss with Near-boundary Stochastic Rescue (NSR), token level (PPO/GRPO/DAPO) and
sequence level (GSPO). Spec: docs/algorithms.md §3.

Per token, with r = exp(logprob - old_logprob), b_l = 1 - eps_low, b_h = 1 + eps_high (DAPO clip-higher):
    l = -min(r * A, clip(r, b_l, b_h) * A),  optional dual clip for A < 0: l = min(l, -c * A).
The clip is *active* (zero gradient) on the upper side when A > 0 and r > b_h, on the lower side when
A < 0 and r < b_l. NSR gives some of those tokens their gradient back:
    rule `scaled`: rho = b_h / r (upper) or r / b_l (lower), u ~ U(0, 1); rescued iff u <= rho, and the
                   token then contributes -(u * r) * A (gradient -(u * r) * A w.r.t. logprob);
                   expected gradient weight rho^2 / 2.
    rule `band`:   rescued with probability nsr_prob (u < nsr_prob) iff rho >= 1 / (1 + nsr_band); it then
                   contributes the unclipped surrogate -r * A (weight 1).
u is counter-based Philox: u = philox(key=seed, counter=(offset + i, step, 0)) converted to [0, 1) exactly as
`tl.rand` does (with step = 0 it *is* `tl.rand(seed, offset + i)`). Token i of a call is global token
`offset + i`, so a batch split into pieces (micro-batches, ranks) draws the same u per token as one pass
when every piece is given the global index of its first token as `offset` (or, for packed micro-batches
whose tokens are not one contiguous global range, each token's global counter in `token_index`).

Forward and backward are fused: the forward pass writes the loss and d loss / d logprob in one sweep;
backward only multiplies by the upstream gradient. Statistics are returned as 0-dim device tensors (counts
for an all-reduce, and fractions), so nothing here synchronizes with the host.

Backends (kernels/common.py): "triton" (the fused kernel; on CPU it runs only under TRITON_INTERPRET=1), "torch"
(same math in plain PyTorch ops, with a bit-exact PyTorch Philox), "auto" = triton for CUDA tensors, torch
otherwise (the interpreter is ~100x slower than the torch path on CPU, and the two give the same u and decisions).
GSPO's sequence-level loss has no kernel of its own (its clip math runs once per sequence): both backends run
its torch ops; `backend` is still resolved and validated, so a bad value fails the same way everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.random import philox as _tl_philox
from triton.language.random import uint_to_uniform_float as _tl_uint_to_uniform_float

from grpo_kernels.common import resolve_backend

NSR_RULES = ("off", "scaled", "band")
_NSR_CODE = {"off": 0, "scaled": 1, "band": 2}
# Per-block counters written by the kernel, in this order.
_COUNT_NAMES = ("n_tokens", "n_clip_low", "n_clip_high", "n_rescued", "n_dual_clip")
# A fixed block: the op is a memory-bound elementwise sweep, and autotuning keyed on N would re-benchmark
# on every new micro-batch length.
_BLOCK = 1024
# 8 warps: with 4, triton 3.6 (ptxas 12.8) spills 8 bytes in the dual-clip bf16 variants on sm_90
# (python -m grpo_kernels.compile_check); 8 warps compile without spills on triton 3.6 and 3.9.
_NUM_WARPS = 8
_M32 = 0xFFFFFFFF
# Numerical guards (docs/algorithms.md, "Numerical guards"): the token log-ratio is clamped to
# [-TOKEN_LOG_RATIO_MAX, TOKEN_LOG_RATIO_MAX] before exp (as verl), GSPO's sequence log-ratio to
# [SEQ_LOG_RATIO_MIN, SEQ_LOG_RATIO_MAX]; the gradient is zero where a clamp binds, as autograd gives for clamp.
TOKEN_LOG_RATIO_MAX = 20.0
SEQ_LOG_RATIO_MIN, SEQ_LOG_RATIO_MAX = -20.0, 10.0
_TOKEN_LOG_RATIO_MAX_TL = tl.constexpr(TOKEN_LOG_RATIO_MAX)


# --------------------------------------------------------------------------------------------------------
# Philox4x32-10 in PyTorch, bit-identical to triton.language.random (tl.rand).
# --------------------------------------------------------------------------------------------------------
def _mul_hi_lo(const: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of const * x for a uint32 constant and int64 tensor x in [0, 2^32).

    Split x into 16-bit halves so every partial product stays below 2^48 (no int64 overflow)."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = const * x_hi, const * x_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _M32
    return hi, lo


def philox_uniform(seed: int, index: torch.Tensor, step: int = 0) -> torch.Tensor:
    """U[0, 1) float32 draws, bit-identical to the Triton kernels' Philox.

    seed: int in [0, 2^63); index: int64 tensor of global counters (>= 0), any shape; step: int in [0, 2^32).
    Returns float32 with index's shape: philox(key=(seed_lo, seed_hi), counter=(index_lo, index_hi, step, 0))
    first word, mapped to [0, 1) like triton's uint_to_uniform_float. With step = 0 this equals
    tl.rand(seed, index).
    """
    _check_seed(seed, step)
    if index.dtype != torch.int64:
        raise TypeError(f"philox_uniform: index must be int64, got {index.dtype}")
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1 = index & _M32, (index >> 32) & _M32
    c2 = torch.full_like(index, step & _M32)
    c3 = torch.zeros_like(index)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(0xCD9E8D57, c2)
        hi_a, lo_a = _mul_hi_lo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    # Triton bitcasts to int32, flips negatives with ~x, converts to fp32 and scales by 4.6566127342e-10.
    x = torch.where(c0 > 0x7FFFFFFF, _M32 - c0, c0)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=index.device)


# --------------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "seed", "offset", "step"])
def _policy_loss_fwd_kernel(
    p_logp, p_old, p_adv, p_mask, p_index, p_loss, p_dlogp, p_counts,
    N, seed, offset, step,
    b_low, b_high, dual_c, band_min_rho, nsr_prob,
    DUAL: tl.constexpr, NSR: tl.constexpr, HAS_INDEX: tl.constexpr, BLOCK: tl.constexpr,
):
    """loss_i = -min(r A, clip(r, b_low, b_high) A) (+ dual clip, + NSR); dlogp_i = d loss_i / d logprob_i."""
    i_b = tl.program_id(0)
    o_i = i_b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < N
    b_logp = tl.load(p_logp + o_i, mask=m_i, other=0.0).to(tl.float32)
    b_old = tl.load(p_old + o_i, mask=m_i, other=0.0).to(tl.float32)
    b_adv = tl.load(p_adv + o_i, mask=m_i, other=0.0).to(tl.float32)
    b_valid = (tl.load(p_mask + o_i, mask=m_i, other=0) != 0) & m_i

    b_lr = b_logp - b_old
    b_in = (b_lr >= -_TOKEN_LOG_RATIO_MAX_TL) & (b_lr <= _TOKEN_LOG_RATIO_MAX_TL)  # the clamp passes gradient
    b_r = tl.exp(tl.minimum(tl.maximum(b_lr, -_TOKEN_LOG_RATIO_MAX_TL), _TOKEN_LOG_RATIO_MAX_TL))
    b_upper = b_valid & (b_adv > 0) & (b_r > b_high)
    b_lower = b_valid & (b_adv < 0) & (b_r < b_low)
    b_active = b_upper | b_lower
    b_loss = -tl.minimum(b_r * b_adv, tl.minimum(tl.maximum(b_r, b_low), b_high) * b_adv)
    # Weight w of the unclipped gradient -r * A: 0 where the clip is active, 1 elsewhere, u or 1 if rescued.
    b_w = tl.where(b_active, 0.0, 1.0)
    b_rescued = tl.zeros([BLOCK], dtype=tl.int1)
    if NSR != 0:
        # Same counters as tl.rand(seed, offset + i), plus `step` in the third counter word.
        if HAS_INDEX:
            o_g = offset + tl.load(p_index + o_i, mask=m_i, other=0).to(tl.int64)
        else:
            o_g = offset + o_i
        c_lo = o_g.to(tl.uint32)
        c_hi = (o_g >> 32).to(tl.uint32)
        c_zero = c_lo * 0
        c_step = c_zero + step.to(tl.uint32)
        b_bits, _, _, _ = _tl_philox(seed, c_lo, c_hi, c_step, c_zero)
        b_u = _tl_uint_to_uniform_float(b_bits)
        b_rho = tl.where(b_upper, b_high / b_r, b_r / b_low)
        if NSR == 1:
            b_rescued = b_active & (b_u <= b_rho)
            b_weight = b_u
        else:
            b_rescued = b_active & (b_rho >= band_min_rho) & (b_u < nsr_prob)
            b_weight = tl.full([BLOCK], 1.0, tl.float32)
        b_loss = tl.where(b_rescued, -(b_weight * b_r) * b_adv, b_loss)
        b_w = tl.where(b_rescued, b_weight, b_w)
    b_dual = tl.zeros([BLOCK], dtype=tl.int1)
    if DUAL:
        b_dual = b_valid & (b_adv < 0) & (b_loss > -dual_c * b_adv)
        b_loss = tl.where(b_dual, -dual_c * b_adv, b_loss)
        b_w = tl.where(b_dual, 0.0, b_w)
    b_loss = tl.where(b_valid, b_loss, 0.0)
    # where() rather than w * (...) so an overflowed r (inf) on a zero-weight token gives 0, not NaN.
    b_dlogp = tl.where(b_valid & b_in & (b_w > 0), -(b_w * b_r) * b_adv, 0.0)
    tl.store(p_loss + o_i, b_loss, mask=m_i)
    tl.store(p_dlogp + o_i, b_dlogp, mask=m_i)

    p_c = p_counts + i_b * 5
    tl.store(p_c + 0, tl.sum(b_valid.to(tl.int32), axis=0))
    tl.store(p_c + 1, tl.sum(b_lower.to(tl.int32), axis=0))
    tl.store(p_c + 2, tl.sum(b_upper.to(tl.int32), axis=0))
    tl.store(p_c + 3, tl.sum(b_rescued.to(tl.int32), axis=0))
    tl.store(p_c + 4, tl.sum(b_dual.to(tl.int32), axis=0))


# --------------------------------------------------------------------------------------------------------
# Shared parameters, validation, torch math
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ClipParams:
    eps_low: float
    eps_high: float
    dual_clip: Optional[float]
    nsr: str
    nsr_prob: float
    nsr_band: float
    seed: int
    offset: int
    step: int

    @property
    def b_low(self) -> float:
        return 1.0 - self.eps_low

    @property
    def b_high(self) -> float:
        return 1.0 + self.eps_high

    @property
    def band_min_rho(self) -> float:
        return 1.0 / (1.0 + self.nsr_band)


def _check_seed(seed: int, step: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    if not isinstance(step, int) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an int in [0, 2^32), got {step!r}")


def _make_params(eps_low, eps_high, dual_clip, nsr, nsr_prob, nsr_band, seed, offset, step) -> _ClipParams:
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be None or > 1, got {dual_clip}")
    if nsr not in NSR_RULES:
        raise ValueError(f"nsr must be one of {NSR_RULES}, got {nsr!r}")
    if not 0.0 <= nsr_prob <= 1.0:
        raise ValueError(f"nsr_prob must be in [0, 1], got {nsr_prob}")
    if not nsr_band > 0.0:
        raise ValueError(f"nsr_band must be > 0, got {nsr_band}")
    _check_seed(seed, step)
    if not isinstance(offset, int) or offset < 0 or offset >= 2**62:
        raise ValueError(f"offset must be an int in [0, 2^62), got {offset!r}")
    return _ClipParams(float(eps_low), float(eps_high), None if dual_clip is None else float(dual_clip),
                       nsr, float(nsr_prob), float(nsr_band), seed, offset, step)


def _check_token_inputs(name: str, logprob, old_logprob, advantages, mask) -> None:
    for arg, t in (("logprob", logprob), ("old_logprob", old_logprob), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name}: {arg} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t))}")
        if t.shape != logprob.shape:
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)}, expected {tuple(logprob.shape)}")
        if t.device != logprob.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, logprob on {logprob.device}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != logprob.shape or mask.device != logprob.device:
        raise ValueError(f"{name}: mask has shape {tuple(mask.shape)} on {mask.device}, expected "
                         f"{tuple(logprob.shape)} on {logprob.device}")


def _check_index(name: str, arg: str, index, shape, device) -> None:
    if index is None:
        return
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"{name}: {arg} must be an int64 tensor, got {getattr(index, 'dtype', type(index))}")
    if tuple(index.shape) != tuple(shape) or index.device != device:
        raise ValueError(f"{name}: {arg} has shape {tuple(index.shape)} on {index.device}, expected "
                         f"{tuple(shape)} on {device}")


def _clip_math(log_ratio, adv, valid, u, p: _ClipParams, lo: float, hi: float):
    """Torch twin of the kernel body (float32 in, float32 out): loss, d loss / d log ratio and counters.

    log_ratio, adv, u: float32 [K]; valid: bool [K]; u may be None when p.nsr == 'off'. The ratio is
    exp(clamp(log_ratio, lo, hi)) and the gradient is zero where the clamp binds. The gradient is w.r.t. the
    log ratio (= logprob for the token form and for GSPO's token form alike)."""
    inside = (log_ratio >= lo) & (log_ratio <= hi)
    ratio = torch.exp(log_ratio.clamp(lo, hi))
    upper = valid & (adv > 0) & (ratio > p.b_high)
    lower = valid & (adv < 0) & (ratio < p.b_low)
    active = upper | lower
    loss = -torch.minimum(ratio * adv, ratio.clamp(p.b_low, p.b_high) * adv)
    w = (~active).to(torch.float32)
    rescued = torch.zeros_like(active)
    if p.nsr != "off":
        rho = torch.where(upper, p.b_high / ratio, ratio / p.b_low)
        if p.nsr == "scaled":
            rescued = active & (u <= rho)
            weight = u
        else:
            rescued = active & (rho >= p.band_min_rho) & (u < p.nsr_prob)
            weight = torch.ones_like(u)
        loss = torch.where(rescued, -(weight * ratio) * adv, loss)
        w = torch.where(rescued, weight, w)
    dual = torch.zeros_like(active)
    if p.dual_clip is not None:
        dual = valid & (adv < 0) & (loss > -p.dual_clip * adv)
        loss = torch.where(dual, -p.dual_clip * adv, loss)
        w = torch.where(dual, torch.zeros_like(w), w)
    zero = torch.zeros_like(loss)
    loss = torch.where(valid, loss, zero)
    dlogp = torch.where(valid & inside & (w > 0), -(w * ratio) * adv, zero)
    return loss, dlogp, (valid, lower, upper, rescued, dual)


def _stats(counts: torch.Tensor, prefix: str = "") -> Dict[str, torch.Tensor]:
    """counts: int64 [5] in _COUNT_NAMES order -> dict of 0-dim counts and fractions over masked tokens."""
    out = {prefix + name: counts[k] for k, name in enumerate(_COUNT_NAMES)}
    denom = counts[0].clamp(min=1).to(torch.float32)
    for frac, k in (("clip_low_frac", 1), ("clip_high_frac", 2), ("rescue_frac", 3), ("dual_clip_frac", 4)):
        out[prefix + frac] = counts[k].to(torch.float32) / denom
    return out


def _token_forward_triton(logprob, old_logprob, advantages, mask, token_index, p: _ClipParams):
    n = logprob.numel()
    loss = torch.empty(n, dtype=torch.float32, device=logprob.device)
    dlogp = torch.empty(n, dtype=torch.float32, device=logprob.device)
    n_blocks = max(triton.cdiv(n, _BLOCK), 1)
    counts = torch.zeros(n_blocks, 5, dtype=torch.int32, device=logprob.device)
    if n > 0:
        _policy_loss_fwd_kernel[(n_blocks,)](
            logprob.reshape(-1), old_logprob.reshape(-1), advantages.reshape(-1),
            mask.reshape(-1).view(torch.uint8), token_index.reshape(-1) if token_index is not None else loss,
            loss, dlogp, counts, n, p.seed, p.offset, p.step,
            p.b_low, p.b_high, p.dual_clip if p.dual_clip is not None else 0.0, p.band_min_rho, p.nsr_prob,
            DUAL=p.dual_clip is not None, NSR=_NSR_CODE[p.nsr], HAS_INDEX=token_index is not None,
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
    return loss, dlogp, counts.sum(0, dtype=torch.int64)


def _token_forward_torch(logprob, old_logprob, advantages, mask, token_index, p: _ClipParams):
    logp = logprob.reshape(-1).to(torch.float32)
    log_ratio = logp - old_logprob.reshape(-1).to(torch.float32)
    u = None
    if p.nsr != "off":
        if token_index is not None:
            index = p.offset + token_index.reshape(-1)
        else:
            index = p.offset + torch.arange(logp.numel(), dtype=torch.int64, device=logp.device)
        u = philox_uniform(p.seed, index, p.step)
    loss, dlogp, flags = _clip_math(log_ratio, advantages.reshape(-1).to(torch.float32), mask.reshape(-1), u, p,
                                    -TOKEN_LOG_RATIO_MAX, TOKEN_LOG_RATIO_MAX)
    counts = torch.stack([f.sum(dtype=torch.int64) for f in flags])
    return loss, dlogp, counts


class _FusedGradLoss(torch.autograd.Function):
    """Returns a precomputed per-token loss; backward = upstream grad * the precomputed d loss / d logprob."""

    @staticmethod
    def forward(ctx, logprob, loss, dlogp):
        ctx.save_for_backward(dlogp)
        ctx.logprob_dtype = logprob.dtype
        ctx.logprob_shape = logprob.shape
        return loss.view(logprob.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        (dlogp,) = ctx.saved_tensors
        grad = (grad_loss.reshape(-1).to(torch.float32) * dlogp).to(ctx.logprob_dtype)
        return grad.view(ctx.logprob_shape), None, None


def clipped_policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: Optional[float] = None,
    nsr: str = "off",
    nsr_prob: float = 0.5,
    nsr_band: float = 0.1,
    seed: int = 0,
    offset: int = 0,
    step: int = 0,
    token_index: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Token-level clipped-ratio policy loss with optional dual clip and NSR (docs/algorithms.md §3).

    Args:
        logprob: [N] (or any shape S) float, log pi_theta of the taken tokens; the only input that gets a
            gradient.
        old_logprob: same shape, float, log pi_old (treated as constant).
        advantages: same shape, float, A per token (treated as constant).
        mask: same shape, bool, True where the token counts.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher).
        dual_clip: c > 1 for dual clip on A < 0 tokens (l = min(l, -c A)), or None.
        nsr: "off" | "scaled" | "band" (see module docstring); nsr_prob, nsr_band: parameters of "band".
        seed: Philox key in [0, 2^63); offset: global index of this call's first token (flattened
            row-major); step: optimizer step in [0, 2^32), a separate Philox counter word.
        token_index: optional int64 tensor shaped like logprob, the global counter of every token (for
            packed micro-batches whose tokens are not a contiguous global range); the counter is then
            offset + token_index[i] instead of offset + i. Values must be >= 0 (not checked: no host sync).
        backend: "auto" | "triton" | "torch".

    Returns:
        loss: float32, shape S, per-token loss (0 where mask is False), differentiable w.r.t. logprob.
        stats: dict of 0-dim tensors on logprob's device. int64 counts over masked tokens, for summing
            across micro-batches / ranks: n_tokens, n_clip_low (A < 0 and r < 1 - eps_low), n_clip_high
            (A > 0 and r > 1 + eps_high), n_rescued (NSR), n_dual_clip (dual clip active); and float32
            fractions of n_tokens: clip_low_frac, clip_high_frac, rescue_frac, dual_clip_frac. A rescued
            token is still counted in its clip side.
    """
    _check_token_inputs("clipped_policy_loss", logprob, old_logprob, advantages, mask)
    _check_index("clipped_policy_loss", "token_index", token_index, logprob.shape, logprob.device)
    p = _make_params(eps_low, eps_high, dual_clip, nsr, nsr_prob, nsr_band, seed, offset, step)
    impl = resolve_backend(backend, logprob.device, "clipped_policy_loss")
    with torch.no_grad():
        if impl == "triton":
            loss, dlogp, counts = _token_forward_triton(
                logprob.contiguous(), old_logprob.contiguous(), advantages.contiguous(), mask.contiguous(),
                None if token_index is None else token_index.contiguous(), p)
        else:
            loss, dlogp, counts = _token_forward_torch(logprob, old_logprob, advantages, mask, token_index, p)
    return _FusedGradLoss.apply(logprob, loss, dlogp), _stats(counts)


def gspo_policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    nsr: str = "off",
    nsr_prob: float = 0.5,
    nsr_band: float = 0.1,
    seed: int = 0,
    offset: int = 0,
    step: int = 0,
    seq_index: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """GSPO sequence-level clipped loss (Zheng et al. 2025, token form; docs/algorithms.md §3), with NSR on s_i.

    s_i = exp(sum_t M log r_{i,t} / sum_t M); per token log s_{i,t} = sg[log s_i] + logp_{i,t} - sg[logp_{i,t}],
    so s_{i,t} = s_i in value and d s_{i,t} / d logp_{i,t} = s_i; l_{i,t} = -min(s A_i, clip(s, 1-eps_low,
    1+eps_high) A_i). A_i is the mean advantage over the sequence's masked tokens (the advantage is constant
    within a sequence). NSR tests s_i once per sequence with u = philox(seed, offset + i, step): here
    `offset` counts *sequences* (the global index of this call's first sequence), not tokens.

    Args:
        logprob, old_logprob, advantages: [N] float (packed sequences); mask: [N] bool.
        cu_seqlens: [B + 1] int, cumulative sequence starts (cu_seqlens[0] = 0, cu_seqlens[-1] = N).
        seq_index: optional [B] int64 global sequence counters; NSR then uses offset + seq_index[i].
        backend: "auto" | "triton" | "torch", validated as everywhere; the per-sequence math is torch ops for all.
        Other arguments as in clipped_policy_loss.

    Returns:
        loss: [N] float32 per token (0 where mask is False), differentiable w.r.t. logprob.
        stats: token-weighted counts / fractions with the same keys as clipped_policy_loss (a token counts
            as clipped when its sequence is), plus sequence counts n_seqs (sequences with >= 1 masked token),
            seq_n_clip_low, seq_n_clip_high, seq_n_rescued.
    """
    _check_token_inputs("gspo_policy_loss", logprob, old_logprob, advantages, mask)
    resolve_backend(backend, logprob.device, "gspo_policy_loss")
    if logprob.dim() != 1:
        raise ValueError(f"gspo_policy_loss: logprob must be 1-D (packed), got shape {tuple(logprob.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 \
            or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError("gspo_policy_loss: cu_seqlens must be a 1-D int32/int64 tensor of B + 1 offsets")
    n = logprob.numel()
    if cu_seqlens.device.type == "cpu":  # value checks only where they cost no device sync
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"gspo_policy_loss: cu_seqlens must rise from 0 to N={n}, got {cu_seqlens.tolist()}")
    p = _make_params(eps_low, eps_high, None, nsr, nsr_prob, nsr_band, seed, offset, step)
    dev = logprob.device
    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    n_seq = cu.numel() - 1
    _check_index("gspo_policy_loss", "seq_index", seq_index, (n_seq,), dev)
    with torch.no_grad():
        seq = torch.repeat_interleave(torch.arange(n_seq, device=dev), cu[1:] - cu[:-1], output_size=n)
        valid = mask.to(torch.float32)
        log_ratio = (logprob.to(torch.float32) - old_logprob.to(torch.float32)) * valid
        tok_count = torch.zeros(n_seq, device=dev).index_add_(0, seq, valid)
        denom = tok_count.clamp(min=1.0)
        log_s = torch.zeros(n_seq, device=dev).index_add_(0, seq, log_ratio) / denom
        adv_seq = torch.zeros(n_seq, device=dev).index_add_(0, seq, advantages.to(torch.float32) * valid) / denom
        u = None
        if p.nsr != "off":
            index = seq_index if seq_index is not None else torch.arange(n_seq, dtype=torch.int64, device=dev)
            u = philox_uniform(p.seed, p.offset + index, p.step)
        loss_seq, dlogp_seq, flags = _clip_math(log_s, adv_seq, tok_count > 0, u, p, SEQ_LOG_RATIO_MIN,
                                                SEQ_LOG_RATIO_MAX)
        loss = torch.where(mask, loss_seq[seq], torch.zeros((), device=dev))
        dlogp = torch.where(mask, dlogp_seq[seq], torch.zeros((), device=dev))
        tokens_of = tok_count.to(torch.int64)
        counts = torch.stack([(f.to(torch.int64) * tokens_of).sum() for f in flags])
        stats = _stats(counts)
        stats["n_seqs"] = flags[0].sum(dtype=torch.int64)
        for key, k in (("seq_n_clip_low", 1), ("seq_n_clip_high", 2), ("seq_n_rescued", 3)):
            stats[key] = flags[k].sum(dtype=torch.int64)
    return _FusedGradLoss.apply(logprob, loss, dlogp), stats
