"""Fused token log-probability and full-vocabulary entropy from the LM head, without [N, V] logits.

Math (z = hidden @ weight.T / temperature, p = softmax(z), lse = logsumexp(z)):
    logprob = z[target] - lse,      entropy H = lse - E_p[z] = -sum_v p_v log p_v   (nats)
    d z     = g_lp * (onehot(target) - p) - g_ent * p * (z - E_p[z]),  z - E_p[z] = log p + H
    d raw logits = d z / temperature;  d hidden = d logits @ weight;  d weight = d logits.T @ hidden

Design (chosen without a GPU measurement; benchmarks/bench_logprob_entropy.py compares on one):
    The FLOPs are three [N, D] x [D, V] GEMMs (6*N*D*V); everything else is O(N*V) memory traffic.
    The GEMMs run in cuBLAS on blocks; all softmax work is fused into memory-bound Triton epilogues:
      forward : token chunks of C rows. logits_c = hidden_c @ weight.T (fp32 output), then
                `_logprob_entropy_fwd_kernel` does one online-logsumexp pass over vocabulary tiles
                per row and saves lse [N] (entropy is an output anyway); nothing of size V is kept.
      backward: vocabulary slices of S columns over all N tokens (one token block by default).
                Per slice: recompute logits_s = hidden @ weight_s.T; `_logprob_entropy_bwd_kernel`
                turns them into d logits_s (needs only lse and H per row, saved by the forward);
                d weight_s = d logits_s.T @ hidden is one GEMM over all tokens, written straight into
                the gradient (cuBLAS accumulates in fp32); d hidden += d logits_s @ weight_s in fp32.
    Slicing the backward by vocabulary instead of by tokens is what keeps memory bounded: a token-
    chunked backward would need a [V, D] fp32 d weight accumulator (2.5 GB at V=151936, D=4096) and
    read-modify-write it once per chunk; the [N, D] fp32 d hidden accumulator is smaller whenever
    N < V (256 MiB at N=16384, D=4096).
    An all-Triton tl.dot kernel with the softmax fused into the GEMM would save the [C, V] round trip
    but must re-tune a GEMM per shape and split the V reduction across programs. Computing gradients
    inside the forward (3 GEMMs instead of 4) is not possible for this contract because the upstream
    gradients of a GRPO loss (clipped ratios) are unknown at forward time; the price of recomputation
    is a 4th GEMM: fwd+bwd does 8*N*D*V flops, 4/3 of the 3-GEMM roofline.

Precision: logits are produced in fp32 (cuBLAS bf16/fp16 GEMM with fp32 output, `out_dtype`) so the
epilogue never sees rounded logits; all reductions run in fp32; d hidden is accumulated across
vocabulary slices in fp32, and d weight across token blocks (only when there are several) in fp32.
d logits are rounded to the input dtype before the gradient GEMMs, as autograd through a 16-bit
matmul would. If the installed torch lacks fp32-output 16-bit GEMMs, logits fall back to the input
dtype (a warning says so once).

Peak extra memory (beyond inputs, outputs and the returned gradients) is bounded by the workspace
(_WORKSPACE_BYTES = 768 MiB) when chunk sizes are left to their defaults:
    forward : C * V * 4 bytes (fp32 logits of one chunk; C >= 128 rows) + O(N)
    backward: R * S * (4 + s) bytes (fp32 logits + d logits in the input dtype of s bytes; s = 0 for
              fp32 inputs, whose d logits overwrite the logits) + R * D * 4 bytes for the fp32
              d hidden accumulator when the inputs are 16-bit, + V * D * 4 bytes for a fp32 d weight
              accumulator only when there are several token blocks (R < N: chunk_size given, or N > V).
At N=16384, D=4096, V=151936 bf16 that is C=1280 (742 MiB) forward and R=N, S=5376 (760 MiB) backward.
The "torch" backend holds a few [C, V] / [R, S] fp32 temporaries instead of one.
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from grpo_kernels.common import interpreter_enabled, resolve_backend

IGNORE_INDEX = -100
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# The epilogue kernels are memory bound (one row per program, a loop over vocabulary tiles).
# The interpreter cannot autotune several configs and is fastest with few, mid-sized tiles.
if interpreter_enabled():
    _CONFIGS = [triton.Config({"BLOCK_V": 512}, num_warps=1)]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_V": 1024}, num_warps=4),
        triton.Config({"BLOCK_V": 2048}, num_warps=8),
        triton.Config({"BLOCK_V": 4096}, num_warps=8),
        triton.Config({"BLOCK_V": 4096}, num_warps=16),
        triton.Config({"BLOCK_V": 8192}, num_warps=16),
    ]


@triton.autotune(configs=_CONFIGS, key=["V"])
@triton.jit
def _logprob_entropy_fwd_kernel(
    p_logits,  # [C, V] raw logits (any float dtype), row stride stride_row
    p_targets,  # [C] int64
    p_logprob,  # [C] fp32 out
    p_entropy,  # [C] fp32 out
    p_lse,  # [C] fp32 out: logsumexp of the scaled logits (saved for backward)
    stride_row,
    V,
    inv_temp,
    IGNORE: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: lse = logsumexp(z), logprob = z[t] - lse, H = log s - sum e^(z-m)(z-m) / s (online)."""
    i_n = tl.program_id(0).to(tl.int64)
    p_row = p_logits + i_n * stride_row
    b_target = tl.load(p_targets + i_n)
    b_valid = b_target != IGNORE

    b_max = tl.full([], float("-inf"), tl.float32)
    b_sum = tl.zeros([], dtype=tl.float32)
    # sum_v e^(z_v - max) * (z_v - max): shifted so entropy has no lse - E[z] cancellation.
    b_ent = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_row + o_v, mask=m_v, other=float("-inf")).to(tl.float32) * inv_temp
        b_max_new = tl.maximum(b_max, tl.max(b_z, axis=0))
        b_scale = tl.exp(b_max - b_max_new)
        b_e = tl.exp(b_z - b_max_new)
        if WITH_ENTROPY:
            # First tile: b_max = -inf and b_sum = 0, so pick 0 before multiplying (no inf * 0).
            b_shift = tl.where(b_sum > 0, b_max - b_max_new, 0.0) * b_sum
            b_zs = tl.where(m_v, b_z - b_max_new, 0.0)
            b_ent = b_scale * (b_ent + b_shift) + tl.sum(b_e * b_zs, axis=0)
        b_sum = b_sum * b_scale + tl.sum(b_e, axis=0)
        b_max = b_max_new

    b_log_sum = tl.log(b_sum)
    b_lse = b_max + b_log_sum
    b_zt = tl.load(p_row + b_target, mask=b_valid, other=0.0).to(tl.float32) * inv_temp
    tl.store(p_lse + i_n, b_lse)
    tl.store(p_logprob + i_n, tl.where(b_valid, b_zt - b_lse, 0.0))
    if WITH_ENTROPY:
        tl.store(p_entropy + i_n, tl.where(b_valid, b_log_sum - b_ent / b_sum, 0.0))
    else:
        tl.store(p_entropy + i_n, 0.0)


# Backward d logits: a 2-D grid over (row, vocabulary tile) of one [R, S] logits block, so small
# row counts still fill the GPU. Elementwise and memory bound: one fixed config (no autotuning, which
# would have to clone the in-place output on every tuning run).
if interpreter_enabled():
    _BWD_CONFIG = triton.Config({"BLOCK_V": 512}, num_warps=1)
else:
    _BWD_CONFIG = triton.Config({"BLOCK_V": 1024}, num_warps=4)


@triton.jit
def _logprob_entropy_bwd_kernel(
    p_logits,  # [R, S] raw logits of vocabulary entries v_offset .. v_offset + S (fp32 or fp64)
    p_dlogits,  # [R, S] out: gradient w.r.t. those raw logits (may alias p_logits when same dtype)
    p_targets,  # [R] int64 (global vocabulary ids)
    p_lse,  # [R] fp32
    p_entropy,  # [R] fp32
    p_dlogprob,  # [R] fp32 upstream gradient (unused unless HAS_DLOGPROB)
    p_dentropy,  # [R] fp32 upstream gradient (unused unless HAS_DENTROPY)
    stride_row,
    stride_drow,
    n_rows,
    n_cols,
    v_offset,
    inv_temp,
    IGNORE: tl.constexpr,
    HAS_DLOGPROB: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """d logits = (g_lp * (onehot - p) - g_ent * p * (log p + H)) / temperature, one tile per program."""
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    if i_n < n_rows:
        b_target = tl.load(p_targets + i_n)
        b_valid = b_target != IGNORE
        b_lse = tl.load(p_lse + i_n)
        b_dlp = tl.zeros([], dtype=tl.float32)
        b_dent = tl.zeros([], dtype=tl.float32)
        b_ent = tl.zeros([], dtype=tl.float32)
        if HAS_DLOGPROB:
            b_dlp = tl.load(p_dlogprob + i_n)
        if HAS_DENTROPY:
            b_dent = tl.load(p_dentropy + i_n)
            b_ent = tl.load(p_entropy + i_n)
        o_v = i_v * BLOCK_V + tl.arange(0, BLOCK_V)
        m_v = o_v < n_cols
        b_z = tl.load(p_logits + i_n * stride_row + o_v, mask=m_v, other=0.0).to(tl.float32) * inv_temp
        b_logp = b_z - b_lse
        b_p = tl.exp(b_logp)
        b_dz = -b_p * (b_dlp + b_dent * (b_logp + b_ent))
        b_dz = tl.where(o_v + v_offset == b_target, b_dz + b_dlp, b_dz)
        # tl.where (not a multiply by 0) so non-finite logits of ignored rows cannot leak NaN.
        b_dz = tl.where(b_valid, b_dz * inv_temp, 0.0)
        tl.store(p_dlogits + i_n * stride_drow + o_v, b_dz.to(p_dlogits.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------------------------
# Epilogues: Triton launchers and the plain-torch equivalents (same inputs and outputs).
# Forward: logits [C, V] of a token chunk -> logprob, entropy, lse [C] (slices of the [N] outputs).
# Backward: logits [R, S] of a (token block, vocabulary slice starting at v_offset) -> dlogits [R, S]
# (may alias the logits).


def _fwd_epilogue_triton(logits, targets, inv_temp, with_entropy, logprob, entropy, lse):
    n_rows, vocab = logits.shape
    _logprob_entropy_fwd_kernel[(n_rows,)](
        logits, targets, logprob, entropy, lse, logits.stride(0), vocab, inv_temp,
        IGNORE=IGNORE_INDEX, WITH_ENTROPY=with_entropy,
    )


def _fwd_epilogue_torch(logits, targets, inv_temp, with_entropy, logprob_out, entropy_out, lse_out):
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    z = logits.to(compute_dtype) * inv_temp
    lse = torch.logsumexp(z, dim=-1)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprob = z.gather(1, safe_targets[:, None]).squeeze(1) - lse
    zero = torch.zeros((), dtype=compute_dtype, device=logits.device)
    logprob_out.copy_(torch.where(valid, logprob, zero))
    lse_out.copy_(lse)
    if with_entropy:
        logp = z.sub_(lse[:, None])
        entropy_out.copy_(torch.where(valid, -logp.exp().mul_(logp).sum(dim=-1), zero))
    else:
        entropy_out.zero_()


def _bwd_epilogue_triton(logits, dlogits, targets, v_offset, lse, entropy, grad_logprob, grad_entropy,
                         inv_temp):
    n_rows, n_cols = logits.shape
    block_v = _BWD_CONFIG.kwargs["BLOCK_V"]
    _logprob_entropy_bwd_kernel[(n_rows, triton.cdiv(n_cols, block_v))](
        logits, dlogits, targets, lse, entropy,
        grad_logprob if grad_logprob is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        logits.stride(0), dlogits.stride(0), n_rows, n_cols, v_offset, inv_temp,
        IGNORE=IGNORE_INDEX, HAS_DLOGPROB=grad_logprob is not None, HAS_DENTROPY=grad_entropy is not None,
        BLOCK_V=block_v, num_warps=_BWD_CONFIG.num_warps,
    )


def _bwd_epilogue_torch(logits, dlogits, targets, v_offset, lse, entropy, grad_logprob, grad_entropy,
                        inv_temp):
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    valid = targets != IGNORE_INDEX
    logp = logits.to(compute_dtype) * inv_temp - lse[:, None].to(compute_dtype)
    # d z = -p * (g_lp + g_ent * (log p + H)) + g_lp * onehot(target)
    weight_of_p = torch.zeros_like(logp[:, :1])
    if grad_logprob is not None:
        weight_of_p = weight_of_p + grad_logprob.to(compute_dtype)[:, None]
    if grad_entropy is not None:
        weight_of_p = weight_of_p + grad_entropy.to(compute_dtype)[:, None] * (logp + entropy.to(compute_dtype)[:, None])
    dz = -logp.exp() * weight_of_p
    if grad_logprob is not None:
        # Only rows whose target lies in this vocabulary slice get the one-hot term.
        local = targets - v_offset
        in_slice = valid & (local >= 0) & (local < logits.shape[1])
        onehot_grad = torch.where(in_slice, grad_logprob.to(compute_dtype), torch.zeros((), dtype=compute_dtype,
                                                                                         device=dz.device))
        dz.scatter_add_(1, torch.where(in_slice, local, torch.zeros_like(local))[:, None], onehot_grad[:, None])
    dz = torch.where(valid[:, None], dz * inv_temp, torch.zeros((), dtype=compute_dtype, device=dz.device))
    dlogits.copy_(dz)


EPILOGUES = {
    "triton": (_fwd_epilogue_triton, _bwd_epilogue_triton),
    "torch": (_fwd_epilogue_torch, _bwd_epilogue_torch),
}

# ----------------------------------------------------------------------------------------------
# GEMMs with fp32 output / accumulation for 16-bit inputs (cuBLAS accumulates in fp32; we keep it).

_fp32_out_gemm_ok = True  # flipped once if this torch/device cannot do out_dtype GEMMs


def _warn_no_fp32_gemm(err: Exception) -> None:
    global _fp32_out_gemm_ok
    _fp32_out_gemm_ok = False
    warnings.warn(
        f"fused_logprob_entropy: fp32-output 16-bit GEMM unavailable ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}); "
        "logits and partial gradient sums are rounded to the input dtype before fp32 accumulation.",
        stacklevel=3,
    )


def _logits_block(hidden_block: torch.Tensor, weight_slice: torch.Tensor) -> torch.Tensor:
    """[R, D] x [S, D]^T -> [R, S] raw logits, fp32 for 16-bit CUDA inputs when possible."""
    if hidden_block.dtype in (torch.bfloat16, torch.float16) and hidden_block.is_cuda and _fp32_out_gemm_ok:
        try:
            return torch.mm(hidden_block, weight_slice.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError) as err:
            _warn_no_fp32_gemm(err)
    return torch.mm(hidden_block, weight_slice.T)


def addmm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, with acc in fp32 (or the operands' dtype) and a, b possibly 16-bit."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if not acc.is_cuda:
        # CPU has no 16-bit GEMM with fp32 output; upcasting one block is a bounded temporary.
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
        return
    if _fp32_out_gemm_ok:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError) as err:
            _warn_no_fp32_gemm(err)
    acc.add_(torch.mm(a, b))  # 16-bit product (fp32 inside cuBLAS), accumulated in fp32


# ----------------------------------------------------------------------------------------------
# Workspace: every temporary of size proportional to V comes out of one byte budget.

_WORKSPACE_BYTES = 768 << 20


def default_chunk_size(n_tokens: int, vocab_size: int, workspace_bytes: int | None = None) -> int:
    """Forward tokens per chunk: one chunk's fp32 logits fit the workspace (a multiple of 128, >= 128)."""
    workspace_bytes = _WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    chunk = workspace_bytes // (4 * max(1, vocab_size))
    chunk = max(128, min(8192, chunk // 128 * 128))
    return max(1, min(chunk, n_tokens))


def backward_blocks(n_tokens: int, vocab_size: int, dim: int, dtype: torch.dtype, *, need_hidden: bool = True,
                    chunk_size: int | None = None, vocab_chunk_size: int | None = None,
                    workspace_bytes: int | None = None) -> tuple[int, int]:
    """(token rows R, vocabulary columns S) of one backward block.

    By default R = N (all tokens in one block), so d weight of each vocabulary slice is one GEMM over
    all tokens, written straight into the gradient (cuBLAS accumulates in fp32) and no [V, D] fp32
    accumulator exists; d hidden is accumulated over slices in an [N, D] fp32 buffer when the inputs
    are 16-bit. S is then as large as the rest of the workspace allows for the [R, S] fp32 logits and
    the [R, S] 16-bit d logits. Token blocks (R < N) are used only when asked for (chunk_size) or when
    N > V, where an [N, D] accumulator would be larger than a [V, D] one.
    """
    workspace_bytes = _WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    wide = dtype in (torch.float32, torch.float64)
    logit_bytes = 8 if dtype == torch.float64 else 4
    dlogit_bytes = 0 if wide else torch.empty((), dtype=dtype).element_size()  # fp32 d logits are in place
    acc_row_bytes = 0 if (wide or not need_hidden) else 4 * dim
    if chunk_size is not None:
        rows = min(n_tokens, chunk_size)
    elif n_tokens <= vocab_size or n_tokens * acc_row_bytes <= workspace_bytes // 2:
        rows = n_tokens
    else:
        rows = max(128, (workspace_bytes // 2) // max(1, acc_row_bytes) // 128 * 128)
    rows = max(1, min(rows, n_tokens))
    if vocab_chunk_size is not None:
        cols = vocab_chunk_size
    else:
        left = max(0, workspace_bytes - rows * acc_row_bytes)
        cols = max(128, left // (rows * (logit_bytes + dlogit_bytes)) // 128 * 128)
    return rows, max(1, min(cols, vocab_size))


# ----------------------------------------------------------------------------------------------


def forward_chunks(hidden, weight, targets, inv_temp, with_entropy, chunk_size, backend):
    """The forward pass over token chunks: allocates (logprob, entropy, lse) [N] and returns them with an
    iterator that, per chunk, computes the logits, runs the forward epilogue into those outputs and yields
    (start, end, logits) (the caller may reuse or drop the chunk's logits before the next one)."""
    fwd_epilogue = EPILOGUES[backend][0]
    n_tokens = hidden.shape[0]
    stat_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logprob = torch.empty(n_tokens, dtype=stat_dtype, device=hidden.device)
    entropy = torch.empty_like(logprob)
    lse = torch.empty_like(logprob)
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n_tokens, weight.shape[0])

    def chunks():
        for start in range(0, n_tokens, chunk):
            end = min(start + chunk, n_tokens)
            logits = _logits_block(hidden[start:end], weight)
            fwd_epilogue(logits, targets[start:end], inv_temp, with_entropy,
                         logprob[start:end], entropy[start:end], lse[start:end])
            yield start, end, logits

    return (logprob, entropy, lse), chunks()


class _LogprobEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, with_entropy, chunk_size, vocab_chunk_size, backend):
        (logprob, entropy, lse), chunks = forward_chunks(hidden, weight, targets, inv_temp, with_entropy,
                                                          chunk_size, backend)
        for _ in chunks:
            pass
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temp, ctx.with_entropy, ctx.backend = inv_temp, with_entropy, backend
        ctx.chunk_size, ctx.vocab_chunk_size = chunk_size, vocab_chunk_size
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        no_grad = (None,) * 8
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logprob is not None:
            grad_logprob = grad_logprob.to(lse.dtype).contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        if (grad_logprob is None and grad_entropy is None) or not (need_hidden or need_weight):
            return no_grad

        bwd_epilogue = EPILOGUES[ctx.backend][1]
        (n_tokens, dim), vocab = hidden.shape, weight.shape[0]
        rows, cols = backward_blocks(n_tokens, vocab, dim, hidden.dtype, need_hidden=need_hidden,
                                     chunk_size=ctx.chunk_size, vocab_chunk_size=ctx.vocab_chunk_size)
        wide = hidden.dtype in (torch.float32, torch.float64)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = None
        if need_weight:
            # Several 16-bit token blocks add into d weight: a zeroed fp32 accumulator ([V, D], see
            # backward_blocks); otherwise the first block writes the gradient directly.
            if wide or rows == n_tokens:
                grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            else:
                grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for r0 in range(0, n_tokens, rows):
            r1 = min(r0 + rows, n_tokens)
            hidden_block = hidden[r0:r1]
            # d hidden of this block, summed over vocabulary slices (fp32 for 16-bit inputs).
            dh_acc = None
            if need_hidden:
                dh_acc = grad_hidden[r0:r1] if wide else torch.empty(r1 - r0, dim, dtype=torch.float32,
                                                                     device=hidden.device)
            for v0 in range(0, vocab, cols):
                v1 = min(v0 + cols, vocab)
                weight_slice = weight[v0:v1]
                logits = _logits_block(hidden_block, weight_slice)
                # d logits feed the GEMMs in the input dtype; fp32 inputs overwrite the logits in place.
                dlogits = logits if logits.dtype == hidden.dtype else torch.empty(
                    logits.shape, dtype=hidden.dtype, device=logits.device)
                bwd_epilogue(
                    logits, dlogits, targets[r0:r1], v0, lse[r0:r1], entropy[r0:r1],
                    None if grad_logprob is None else grad_logprob[r0:r1],
                    None if grad_entropy is None else grad_entropy[r0:r1],
                    ctx.inv_temp,
                )
                del logits
                if need_hidden:
                    if v0 == 0:
                        dh_acc.zero_()
                    addmm_(dh_acc, dlogits, weight_slice)
                if need_weight:
                    if r0 == 0 and grad_weight.dtype == weight.dtype:
                        torch.mm(dlogits.T, hidden_block, out=grad_weight[v0:v1])
                    else:
                        addmm_(grad_weight[v0:v1], dlogits.T, hidden_block)
                del dlogits
            if need_hidden and not wide:
                grad_hidden[r0:r1].copy_(dh_acc)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def validate_inputs(hidden, weight, targets, temperature, chunk_size, vocab_chunk_size):
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be a 2-D [N, D] tensor, got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, D] tensor, got {getattr(weight, 'shape', type(weight))}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D]={tuple(hidden.shape)} and weight [V, D]={tuple(weight.shape)} disagree on D"
        )
    if hidden.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"hidden dtype must be one of {_SUPPORTED_DTYPES}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.shape != (hidden.shape[0],):
        got = getattr(targets, "shape", type(targets))
        raise ValueError(f"targets must be a [N]={hidden.shape[0]} tensor, got {got}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets dtype must be int64 (or int32), got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight, targets must share a device, got {hidden.device}, {weight.device}, {targets.device}"
        )
    if isinstance(temperature, torch.Tensor) or not float(temperature) > 0 or float(temperature) == float("inf"):
        raise ValueError(f"temperature must be a finite Python float > 0, got {temperature!r}")
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    # One host sync per call (not per token): out-of-range targets would read out of bounds.
    vocab = weight.shape[0]
    bad = ((targets < 0) & (targets != IGNORE_INDEX)) | (targets >= vocab)
    if targets.numel() and bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"targets must be in [0, V={vocab}) or {IGNORE_INDEX}; found {first}")


def fused_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    with_entropy: bool = True,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target token and full-vocabulary entropy, never materializing [N, V].

    With z = hidden @ weight.T / temperature and p = softmax(z) over the V vocabulary entries:
        logprob[i] = log p[i, targets[i]],   entropy[i] = -sum_v p[i, v] log p[i, v]   (nats).

    Args:
        hidden: [N, D] fp32 / bf16 / fp16 (fp64 accepted for testing) final hidden states.
        weight: [V, D] same dtype: the LM head (the embedding matrix for tied embeddings).
        targets: [N] int64 (int32 accepted) in [0, V), or -100 for ignored positions, which get
            logprob 0, entropy 0 and no gradient.
        temperature: Python float > 0 (the sampling temperature; logits are divided by it).
        with_entropy: False skips the entropy work; entropy is then a zero tensor (not
            differentiable), so the (logprob, entropy) tuple shape is kept.
        chunk_size: tokens per forward chunk and per backward token block. Default: forward
            chunks whose fp32 logits fit the 768 MiB workspace (default_chunk_size) and one
            backward block of all N tokens (backward_blocks). Setting it also splits the backward
            into token blocks, which for 16-bit weights adds a [V, D] fp32 d weight accumulator.
        vocab_chunk_size: vocabulary entries per backward slice. Default: as many as fit the
            workspace beside the [N, D] fp32 d hidden accumulator (backward_blocks).
            Peak extra memory with the defaults stays near the 768 MiB workspace; the bound per
            case is in the module docstring.
        backend: "triton" (fused Triton epilogues; CPU tensors only under TRITON_INTERPRET=1),
            "torch" (the same chunked algorithm in plain torch), or "auto" (triton on CUDA, torch
            otherwise, whatever TRITON_INTERPRET says; see kernels/common.py).
    Returns:
        (logprob [N] fp32, entropy [N] fp32), differentiable w.r.t. hidden and weight
        (float64 for float64 inputs, whose "torch" backend then computes everything in float64).
    """
    validate_inputs(hidden, weight, targets, temperature, chunk_size, vocab_chunk_size)
    resolved = resolve_backend(backend, hidden.device, "fused_logprob_entropy")
    if hidden.shape[0] == 0:
        stat_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        empty = hidden.new_zeros(0, dtype=stat_dtype)
        # Keep the graph connected so .backward() on an empty batch still reaches hidden/weight.
        tie = (hidden.sum() + weight.sum()).to(stat_dtype) * 0
        return empty + tie, empty + tie
    if vocab_chunk_size is None and use_plain_autograd(resolved, hidden, weight, chunk_size):
        return plain_logprob_entropy(hidden, weight, targets, float(temperature), bool(with_entropy))
    return _LogprobEntropyFunction.apply(
        hidden, weight, targets.long().contiguous(), 1.0 / float(temperature), bool(with_entropy),
        chunk_size, vocab_chunk_size, resolved,
    )


# The "torch" backend with default chunk sizes on a small problem: when the fp32 [N, V] logits are at most this
# many elements (16 MiB), smaller than the chunked path's own forward chunk would be, plain autograd over them
# (3 GEMMs, no recompute, no per-slice loop) is the faster way on CPU; same values to fp32 rounding.
PLAIN_MAX_LOGITS = 1 << 22


def use_plain_autograd(resolved_backend: str, hidden, weight, chunk_size) -> bool:
    """Whether an LM-head op (this one, grpo_kernels.token_loss) takes the plain-autograd path: the "torch" backend with
    default chunking, a non-empty batch and at most PLAIN_MAX_LOGITS fp32 logits."""
    return (resolved_backend == "torch" and chunk_size is None and hidden.shape[0] > 0
            and hidden.shape[0] * weight.shape[0] <= PLAIN_MAX_LOGITS)


def plain_logprob_entropy(hidden, weight, targets, temperature: float, with_entropy: bool):
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden.to(compute_dtype) @ weight.to(compute_dtype).T) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != -100
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    zero = torch.zeros((), dtype=compute_dtype, device=hidden.device)
    logprob = torch.where(valid, logp.gather(1, safe[:, None]).squeeze(1), zero)
    if not with_entropy:
        return logprob, torch.zeros_like(logprob, requires_grad=False)
    entropy = torch.where(valid, -(logp.exp() * logp).sum(dim=-1), zero)
    return logprob, entropy
