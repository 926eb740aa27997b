"""Plain-PyTorch references of grpo_kernels.policy_loss, written straight from the formulas of docs/algorithms.md §3.

Gradients come from autograd through the formulas (torch.where/min/clamp select the live branch), the NSR
uniforms u are passed in explicitly, and everything runs in the inputs' dtype (use float64 in tests).
"""
from __future__ import annotations

from typing import Optional

import torch


def _surrogate(ratio, adv, u, *, eps_low, eps_high, dual_clip, nsr, nsr_prob, nsr_band):
    """Per-token surrogate loss for ratio (differentiable) and constant adv; u: NSR uniforms or None.

    Returns (loss, rescued) without masking."""
    b_low, b_high = 1.0 - eps_low, 1.0 + eps_high
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, b_low, b_high) * adv)
    upper = (adv > 0) & (ratio > b_high)
    lower = (adv < 0) & (ratio < b_low)
    candidate = (upper | lower).detach()
    rescued = torch.zeros_like(candidate)
    if nsr != "off":
        r = ratio.detach()
        rho = torch.where(upper, b_high / r, r / b_low)
        if nsr == "scaled":
            rescued = candidate & (u <= rho)
            loss = torch.where(rescued, -(u * ratio) * adv, loss)
        elif nsr == "band":
            rescued = candidate & (rho >= 1.0 / (1.0 + nsr_band)) & (u < nsr_prob)
            loss = torch.where(rescued, -ratio * adv, loss)
        else:
            raise ValueError(f"unknown nsr rule {nsr!r}")
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss, rescued


def clipped_policy_loss_ref(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    u: Optional[torch.Tensor] = None,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: Optional[float] = None,
    nsr: str = "off",
    nsr_prob: float = 0.5,
    nsr_band: float = 0.1,
):
    """Token-level clipped loss. All tensors [N]; mask bool; u [N] uniforms (required unless nsr='off').

    Returns (loss [N] in logprob's dtype, 0 where masked out; rescued [N] bool)."""
    ratio = torch.exp(torch.clamp(logprob - old_logprob, -20.0, 20.0))  # the token log-ratio guard
    loss, rescued = _surrogate(ratio, advantages, u, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                               nsr=nsr, nsr_prob=nsr_prob, nsr_band=nsr_band)
    return torch.where(mask, loss, torch.zeros_like(loss)), rescued & mask


def gspo_policy_loss_ref(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    u_seq: Optional[torch.Tensor] = None,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    nsr: str = "off",
    nsr_prob: float = 0.5,
    nsr_band: float = 0.1,
):
    """GSPO token form, one Python iteration per sequence. u_seq: [B] uniforms, one per sequence.

    A_i is taken from the sequence's first masked token (advantages are constant within a sequence).
    Returns (loss [N], rescued_seq [B] bool)."""
    pieces, rescued_seq = [], []
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        sl = slice(bounds[i], bounds[i + 1])
        lp, m = logprob[sl], mask[sl]
        if not bool(m.any()):
            pieces.append(lp * 0.0)
            rescued_seq.append(False)
            continue
        log_s = (lp - old_logprob[sl])[m].mean().detach()
        # value s_i, d/d logp_t = s_i; the sequence log-ratio guard clamps to [-20, 10] (zero gradient beyond)
        s_tok = torch.exp(torch.clamp(log_s + lp - lp.detach(), -20.0, 10.0))
        adv = advantages[sl][m][0]
        u = None if u_seq is None else u_seq[i]
        loss, rescued = _surrogate(s_tok, adv, u, eps_low=eps_low, eps_high=eps_high, dual_clip=None,
                                   nsr=nsr, nsr_prob=nsr_prob, nsr_band=nsr_band)
        pieces.append(torch.where(m, loss, torch.zeros_like(loss)))
        rescued_seq.append(bool(rescued[0]))
    loss = torch.cat(pieces) if pieces else logprob * 0.0
    return loss, torch.tensor(rescued_seq, dtype=torch.bool)
