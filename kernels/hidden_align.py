"""Hidden-Align: pull together the anchor hidden states of a prompt's correct rollouts (docs/algorithms.md §4).

For each group g with n >= 2 rows and u_i = h_i / max(||h_i||, eps):
    mean pairwise cosine  c_g = (||S_g||^2 - sum_i ||u_i||^2) / (n (n - 1)),   S_g = sum_i u_i
(sum_i ||u_i||^2 = n unless a row has norm < eps, so zero rows are handled exactly like the pairwise form);
    loss = mean over valid groups of (1 - c_g)       (the coefficient lambda is applied by the trainer).
This is O(M D) instead of the O(n^2 D) pairwise sum. Gradient, with v_i = S_g - u_i and
k_g = -2 / (n (n - 1) G_valid) times the upstream gradient:
    d loss / d h_i = k_g * (v_i - (u_i . v_i) u_i) / ||h_i||      (||h_i|| >= eps)
                   = k_g * v_i / eps                                (||h_i|| < eps: u_i = h_i / eps is linear)

Kernels (memory-bound, M is the number of correct rollouts in a micro-batch, D the hidden size):
    _hidden_align_norm_kernel: one program per row -> 1 / max(||h||, eps) and ||u||^2.
    _hidden_align_fwd_kernel:  one program per group (rows of a group found through a stable sort of the
                               group ids, so ids can be arbitrary and unsorted) -> S_g, ||S_g||^2,
                               sum ||u||^2. Deterministic: no atomics.
    _hidden_align_bwd_kernel:  one program per row -> d h_i from S_g.
Nothing synchronizes with the host: the number of groups is bounded by M and empty group slots are inert.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from grpo_kernels.common import check_same_device, interpreter_enabled, resolve_backend

_DEFAULT_EPS = 1e-8
_BLOCK_R = 16  # rows of one group summed per step of the forward kernel
_NUM_WARPS = 4


def _block_d(d: int) -> int:
    # The interpreter pays per op, not per element: one wide tile. On GPU 1024 fp32 per row tile is enough
    # to saturate bandwidth at num_warps=4 without spilling.
    cap = 4096 if interpreter_enabled() else 1024
    return min(triton.next_power_of_2(max(d, 1)), cap)


@triton.jit
def _hidden_align_norm_kernel(p_h, p_inv_norm, p_usq, D, eps, BLOCK_D: tl.constexpr):
    """inv_norm_i = 1 / max(||h_i||, eps); usq_i = ||u_i||^2: exactly 1 unless clamped, then < 1."""
    i_r = tl.program_id(0).to(tl.int64)
    b_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_h = tl.load(p_h + i_r * D + o_d, mask=o_d < D, other=0.0).to(tl.float32)
        b_acc += b_h * b_h
    b_sq = tl.sum(b_acc, axis=0)
    b_inv = 1.0 / tl.maximum(tl.sqrt(b_sq), eps)
    tl.store(p_inv_norm + i_r, b_inv)
    b_norm = tl.sqrt(b_sq)
    tl.store(p_usq + i_r, tl.where(b_norm >= eps, 1.0, b_sq * b_inv * b_inv))


@triton.jit
def _hidden_align_fwd_kernel(p_h, p_perm, p_start, p_count, p_inv_norm, p_sum, p_sq, D,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """S_g = sum over the group's rows of h_i * inv_norm_i; sq_g = ||S_g||^2."""
    i_g = tl.program_id(0).to(tl.int64)
    start = tl.load(p_start + i_g)
    n = tl.load(p_count + i_g)
    b_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_s = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, n, BLOCK_R):
            o_j = j0 + tl.arange(0, BLOCK_R)
            m_j = o_j < n
            b_row = tl.load(p_perm + start + o_j, mask=m_j, other=0)
            b_inv = tl.load(p_inv_norm + b_row, mask=m_j, other=0.0)
            p_tile = p_h + b_row[:, None] * D + o_d[None, :]
            b_h = tl.load(p_tile, mask=m_j[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_s += tl.sum(b_h * b_inv[:, None], axis=0)
        tl.store(p_sum + i_g * D + o_d, b_s, mask=m_d)
        b_sq += b_s * b_s
    tl.store(p_sq + i_g, tl.sum(b_sq, axis=0))


@triton.jit
def _hidden_align_bwd_kernel(p_h, p_group, p_inv_norm, p_clamped, p_coef, p_sum, p_dh, D,
                             BLOCK_D: tl.constexpr):
    """dh_i = coef_i * (v - [not clamped] (u . v) u) * inv_norm_i with u = h_i inv_norm_i, v = S_g - u."""
    i_r = tl.program_id(0).to(tl.int64)
    g = tl.load(p_group + i_r)
    b_inv = tl.load(p_inv_norm + i_r)
    b_coef = tl.load(p_coef + i_r)
    b_keep = 1.0 - tl.load(p_clamped + i_r).to(tl.float32)  # 0 when ||h|| < eps: no projection
    b_dot = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_u = tl.load(p_h + i_r * D + o_d, mask=m_d, other=0.0).to(tl.float32) * b_inv
        b_s = tl.load(p_sum + g * D + o_d, mask=m_d, other=0.0)
        b_dot += b_u * (b_s - b_u)
    b_proj = tl.sum(b_dot, axis=0) * b_keep
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_u = tl.load(p_h + i_r * D + o_d, mask=m_d, other=0.0).to(tl.float32) * b_inv
        b_s = tl.load(p_sum + g * D + o_d, mask=m_d, other=0.0)
        b_dh = b_coef * ((b_s - b_u) - b_proj * b_u) * b_inv
        tl.store(p_dh + i_r * D + o_d, b_dh.to(p_dh.dtype.element_ty), mask=m_d)


def _dense_groups(group_ids: torch.Tensor):
    """Map arbitrary ids to dense slots 0..G-1 without a host sync (G <= M; unused slots have count 0).

    Returns perm (rows sorted by group), start and count per slot [M], slot of each original row [M]."""
    m = group_ids.numel()
    sorted_ids, perm = torch.sort(group_ids, stable=True)
    new_group = torch.ones(m, dtype=torch.int64, device=group_ids.device)
    new_group[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    slot_sorted = torch.cumsum(new_group, 0) - 1
    count = torch.zeros(m, dtype=torch.int64, device=group_ids.device).index_add_(
        0, slot_sorted, torch.ones_like(slot_sorted))
    start = torch.cumsum(count, 0) - count
    slot_of_row = torch.empty_like(slot_sorted).scatter_(0, perm, slot_sorted)
    return perm, start, count, slot_of_row


def _group_reduce(sq, usq_sum, count):
    """Per-slot cosines -> (loss, mean_cos, valid mask, 1 / max(G_valid, 1)) as float32 tensors."""
    valid = count >= 2
    pairs = (count * (count - 1)).clamp(min=1).to(torch.float32)
    cos = (sq - usq_sum) / pairs
    zero = torch.zeros((), device=sq.device)
    inv_groups = 1.0 / valid.sum().clamp(min=1).to(torch.float32)
    loss = torch.where(valid, 1.0 - cos, zero).sum() * inv_groups
    mean_cos = torch.where(valid, cos, zero).sum() * inv_groups
    return loss, mean_cos, valid, pairs, inv_groups


class _HiddenAlignTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, group_ids, eps):
        m, d = hidden.shape
        dev = hidden.device
        perm, start, count, slot_of_row = _dense_groups(group_ids)
        block_d = _block_d(d)
        inv_norm = torch.empty(m, dtype=torch.float32, device=dev)
        usq = torch.empty(m, dtype=torch.float32, device=dev)
        _hidden_align_norm_kernel[(m,)](hidden, inv_norm, usq, d, eps, BLOCK_D=block_d, num_warps=_NUM_WARPS)
        sums = torch.empty(m, d, dtype=torch.float32, device=dev)
        sq = torch.empty(m, dtype=torch.float32, device=dev)
        _hidden_align_fwd_kernel[(m,)](hidden, perm, start, count, inv_norm, sums, sq, d,
                                       BLOCK_R=_BLOCK_R, BLOCK_D=block_d, num_warps=_NUM_WARPS)
        usq_sum = torch.zeros(m, dtype=torch.float32, device=dev).index_add_(0, slot_of_row, usq)
        loss, mean_cos, valid, pairs, inv_groups = _group_reduce(sq, usq_sum, count)
        # d loss / d cos_g = -inv_groups; d cos_g / d u_i = 2 v_i / pairs_g (folded into one per-row factor)
        coef_slot = torch.where(valid, -2.0 * inv_groups / pairs, torch.zeros((), device=dev))
        ctx.save_for_backward(hidden, slot_of_row, inv_norm, usq, coef_slot[slot_of_row], sums)
        ctx.mark_non_differentiable(mean_cos)
        return loss, mean_cos

    @staticmethod
    def backward(ctx, grad_loss, _grad_cos):
        hidden, slot_of_row, inv_norm, usq, coef, sums = ctx.saved_tensors
        m, d = hidden.shape
        dh = torch.empty_like(hidden)
        clamped = (usq < 1.0).to(torch.int8)  # the norm kernel writes exactly 1 for unclamped rows
        coef = (coef * grad_loss.to(torch.float32)).contiguous()
        _hidden_align_bwd_kernel[(m,)](hidden, slot_of_row, inv_norm, clamped, coef, sums, dh, d,
                                       BLOCK_D=_block_d(d), num_warps=_NUM_WARPS)
        return dh, None, None


def _hidden_align_torch(hidden, group_ids, eps):
    m, d = hidden.shape
    _, _, count, slot_of_row = _dense_groups(group_ids)
    x = hidden.to(torch.float32)
    u = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(eps)
    sums = torch.zeros(m, d, dtype=torch.float32, device=x.device).index_add(0, slot_of_row, u)
    usq_sum = torch.zeros(m, dtype=torch.float32, device=x.device).index_add(0, slot_of_row, (u * u).sum(1))
    loss, mean_cos, *_ = _group_reduce((sums * sums).sum(1), usq_sum, count)
    return loss, mean_cos.detach()


def hidden_align_loss(
    anchor_hidden: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = _DEFAULT_EPS,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hidden-Align loss over groups of anchor hidden states (docs/algorithms.md §4), without lambda.

    Args:
        anchor_hidden: [M, D] float (fp32/bf16/fp16/fp64), final-layer hidden state at the anchor token of
            each correct rollout.
        group_ids: [M] int64 (or int32), prompt group of each row; arbitrary values, any order. Groups with
            fewer than 2 rows contribute nothing.
        eps: lower bound on a row norm before normalizing.
        backend: "auto" (triton on CUDA, torch otherwise) | "triton" (CPU only under TRITON_INTERPRET=1) |
            "torch".

    Returns:
        loss: 0-dim float32, mean over groups with >= 2 rows of (1 - mean pairwise cosine); 0 when there is
            no such group (still differentiable, gradient zero). Differentiable w.r.t. anchor_hidden.
        mean_cos: 0-dim float32, detached, mean pairwise cosine over those groups (0 when none).
    """
    if not isinstance(anchor_hidden, torch.Tensor) or anchor_hidden.dim() != 2 \
            or not anchor_hidden.is_floating_point():
        raise ValueError(f"hidden_align_loss: anchor_hidden must be a 2-D float tensor [M, D], got "
                         f"{getattr(anchor_hidden, 'shape', type(anchor_hidden))}")
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype not in (torch.int64, torch.int32) \
            or group_ids.shape != anchor_hidden.shape[:1]:
        raise ValueError(f"hidden_align_loss: group_ids must be an int64 tensor of shape "
                         f"[{anchor_hidden.shape[0]}], got {getattr(group_ids, 'dtype', type(group_ids))} "
                         f"{tuple(getattr(group_ids, 'shape', ()))}")
    check_same_device("hidden_align_loss", anchor_hidden=anchor_hidden, group_ids=group_ids)
    if not eps > 0:
        raise ValueError(f"hidden_align_loss: eps must be > 0, got {eps}")
    backend = resolve_backend(backend, anchor_hidden.device, "hidden_align_loss")
    group_ids = group_ids.to(torch.int64)
    if anchor_hidden.shape[0] == 0 or anchor_hidden.shape[1] == 0:
        zero = (anchor_hidden.sum() * 0.0).to(torch.float32)
        return zero, torch.zeros((), dtype=torch.float32, device=anchor_hidden.device)
    if backend == "torch":
        return _hidden_align_torch(anchor_hidden, group_ids, float(eps))
    return _HiddenAlignTriton.apply(anchor_hidden.contiguous(), group_ids.contiguous(), float(eps))
