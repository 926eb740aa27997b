"""Fused token log-probability and full-vocabulary entropy from the LM head, without [N, V] logits.

Math (z = hidden @ weight.T / temperature, p = softmax(z), lse = logsumexp(z)):
    logprob = z[target] - lse,      entropy H = lse - E_p[z] = -sum_v p_v log p_v   (nats)
    d z     = g_lp * (onehot(target) - p) - g_ent * p * (z - E_p[z]),  z - E_p[z] = log p + H
    d raw logits = d z / temperature;  d hidden = d logits @ weight;  d weight = d logits.T @ hidden

Design (chosen for H100 without measuring on one; benchmarks/bench_logprob_entropy.py compares):
    The FLOPs are three [N, D] x [D, V] GEMMs (6*N*D*V); everything else is O(N*V) memory traffic.
    We run the GEMMs with cuBLAS over chunks of `chunk_size` tokens and fuse all the softmax work
    into one memory-bound Triton epilogue kernel per chunk:
      forward : logits_c = hidden_c @ weight.T (fp32 output), then `_logprob_entropy_fwd_kernel`
                does one online-logsumexp pass over vocabulary tiles and saves lse [N] (entropy is an
                output anyway); nothing of size V is kept.
      backward: recompute logits_c, `_logprob_entropy_bwd_kernel` turns them into d logits_c in the
                GEMM dtype, then d hidden_c = d logits_c @ weight and d weight += d logits_c.T @ hidden_c.
    cuBLAS reaches ~70-80% of bf16 peak on these shapes; an all-Triton tl.dot kernel with the
    softmax fused into the GEMM saves the [chunk, V] round trip (a few % of the time at D >= 2048)
    but must re-tune a GEMM per shape and split the V reduction across programs, which is much harder
    to make both fast and correct. Computing gradients inside the forward is not possible here
    because the upstream gradients of a GRPO loss (clipped ratios) are unknown at forward time.
    The price of recomputation is a 4th GEMM: fwd+bwd does 8*N*D*V flops, 4/3 of the 3-GEMM roofline.

Precision: logits are produced in fp32 (cuBLAS bf16/fp16 GEMM with fp32 output, `out_dtype`) so the
epilogue never sees rounded logits; all reductions run in fp32; d weight is accumulated across
chunks in fp32. If the installed torch lacks fp32-output 16-bit GEMMs, logits fall back to the input
dtype (a warning says so once).

Peak extra memory (beyond inputs, outputs and the returned gradients), with C = chunk_size:
    forward : C * V * 4 bytes (fp32 logits of one chunk) + O(N)
    backward: C * V * (4 + s) bytes (logits + d logits in the input dtype of s bytes; s = 0 for
              fp32 inputs, which are overwritten in place) + V * D * 4 bytes for the fp32 d weight
              accumulator when weight is 16-bit and there is more than one chunk.
The "torch" backend holds a few [C, V] fp32 temporaries instead of one.
"""
from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

IGNORE_INDEX = -100
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Default chunk: the fp32 logits of one chunk take about this many bytes.
_CHUNK_BYTES = 1 << 30


def _interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The epilogue kernels are memory bound (one row per program, a loop over vocabulary tiles).
# The interpreter cannot autotune several configs and is fastest with few, mid-sized tiles.
if _interpreter_enabled():
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


# Restoring d logits keeps autotuning correct when d logits overwrite the logits in place.
@triton.autotune(configs=_CONFIGS, key=["V"], restore_value=["p_dlogits"])
@triton.jit
def _logprob_entropy_bwd_kernel(
    p_logits,  # [C, V] raw logits
    p_dlogits,  # [C, V] out: gradient w.r.t. the raw logits (may alias p_logits)
    p_targets,  # [C] int64
    p_lse,  # [C] fp32
    p_entropy,  # [C] fp32
    p_dlogprob,  # [C] fp32 upstream gradient (unused unless HAS_DLOGPROB)
    p_dentropy,  # [C] fp32 upstream gradient (unused unless HAS_DENTROPY)
    stride_row,
    stride_drow,
    V,
    inv_temp,
    IGNORE: tl.constexpr,
    HAS_DLOGPROB: tl.constexpr,
    HAS_DENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row: d logits = (g_lp * (onehot - p) - g_ent * p * (log p + H)) / temperature."""
    i_n = tl.program_id(0).to(tl.int64)
    p_row = p_logits + i_n * stride_row
    p_drow = p_dlogits + i_n * stride_drow
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
    for v0 in range(0, V, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)
        m_v = o_v < V
        b_z = tl.load(p_row + o_v, mask=m_v, other=0.0).to(tl.float32) * inv_temp
        b_logp = b_z - b_lse
        b_p = tl.exp(b_logp)
        b_dz = -b_p * (b_dlp + b_dent * (b_logp + b_ent))
        b_dz = tl.where(o_v == b_target, b_dz + b_dlp, b_dz)
        # tl.where (not a multiply by 0) so non-finite logits of ignored rows cannot leak NaN.
        b_dz = tl.where(b_valid, b_dz * inv_temp, 0.0)
        tl.store(p_drow + o_v, b_dz.to(p_dlogits.dtype.element_ty), mask=m_v)


# ----------------------------------------------------------------------------------------------
# Per-chunk epilogues: Triton launchers and the plain-torch equivalents (same inputs and outputs).


# Forward epilogues write logprob, entropy, lse [C] (contiguous slices of the [N] outputs) from
# logits [C, V]; backward epilogues write dlogits [C, V] (may alias logits).


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


def _bwd_epilogue_triton(logits, dlogits, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp):
    n_rows, vocab = logits.shape
    _logprob_entropy_bwd_kernel[(n_rows,)](
        logits, dlogits, targets, lse, entropy,
        grad_logprob if grad_logprob is not None else lse,
        grad_entropy if grad_entropy is not None else lse,
        logits.stride(0), dlogits.stride(0), vocab, inv_temp,
        IGNORE=IGNORE_INDEX, HAS_DLOGPROB=grad_logprob is not None, HAS_DENTROPY=grad_entropy is not None,
    )


def _bwd_epilogue_torch(logits, dlogits, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp):
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
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        dz.scatter_add_(1, safe_targets[:, None], grad_logprob.to(compute_dtype)[:, None])
    dz = torch.where(valid[:, None], dz * inv_temp, torch.zeros((), dtype=compute_dtype, device=dz.device))
    dlogits.copy_(dz)


_EPILOGUES = {
    "triton": (_fwd_epilogue_triton, _bwd_epilogue_triton),
    "torch": (_fwd_epilogue_torch, _bwd_epilogue_torch),
}

# ----------------------------------------------------------------------------------------------
# GEMMs with fp32 output for 16-bit inputs (cuBLAS accumulates in fp32 anyway; we keep it).

_fp32_out_gemm_ok = True  # flipped once if this torch/device cannot do out_dtype GEMMs


def _warn_no_fp32_gemm(err: Exception) -> None:
    global _fp32_out_gemm_ok
    _fp32_out_gemm_ok = False
    warnings.warn(
        f"fused_logprob_entropy: fp32-output 16-bit GEMM unavailable ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}); "
        "logits and d weight partial sums are rounded to the input dtype instead.",
        stacklevel=3,
    )


def _logits_chunk(hidden_chunk: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[C, D] x [V, D]^T -> [C, V] raw logits, fp32 for 16-bit CUDA inputs when possible."""
    if hidden_chunk.dtype in (torch.bfloat16, torch.float16) and hidden_chunk.is_cuda and _fp32_out_gemm_ok:
        try:
            return torch.mm(hidden_chunk, weight.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError) as err:
            _warn_no_fp32_gemm(err)
    return torch.mm(hidden_chunk, weight.T)


def _accumulate_grad_weight(acc: torch.Tensor, dlogits: torch.Tensor, hidden_chunk: torch.Tensor) -> None:
    """acc [V, D] (fp32 or the weight dtype) += dlogits.T [V, C] @ hidden_chunk [C, D]."""
    if acc.dtype == dlogits.dtype:
        acc.addmm_(dlogits.T, hidden_chunk)
        return
    if not acc.is_cuda:
        # CPU has no 16-bit GEMM with fp32 output; upcasting one chunk is a bounded temporary.
        acc.addmm_(dlogits.T.to(acc.dtype), hidden_chunk.to(acc.dtype))
        return
    if _fp32_out_gemm_ok:
        try:
            torch.addmm(acc, dlogits.T, hidden_chunk, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError) as err:
            _warn_no_fp32_gemm(err)
    # Fallback: 16-bit partial products over vocabulary slices keep the temporary bounded.
    step = max(1, _CHUNK_BYTES // (2 * max(1, hidden_chunk.shape[1])))
    for v0 in range(0, acc.shape[0], step):
        acc[v0 : v0 + step].add_(torch.mm(dlogits[:, v0 : v0 + step].T, hidden_chunk))


# ----------------------------------------------------------------------------------------------


class _LogprobEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, with_entropy, chunk_size, backend):
        fwd_epilogue = _EPILOGUES[backend][0]
        n_tokens = hidden.shape[0]
        stat_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logprob = torch.empty(n_tokens, dtype=stat_dtype, device=hidden.device)
        entropy = torch.empty_like(logprob)
        lse = torch.empty_like(logprob)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            logits = _logits_chunk(hidden[start:end], weight)
            fwd_epilogue(logits, targets[start:end], inv_temp, with_entropy,
                         logprob[start:end], entropy[start:end], lse[start:end])
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temp, ctx.with_entropy, ctx.chunk_size, ctx.backend = inv_temp, with_entropy, chunk_size, backend
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.with_entropy:
            grad_entropy = None
        if grad_logprob is not None:
            grad_logprob = grad_logprob.to(lse.dtype).contiguous()
        if grad_entropy is not None:
            grad_entropy = grad_entropy.to(lse.dtype).contiguous()
        if (grad_logprob is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None, None

        bwd_epilogue = _EPILOGUES[ctx.backend][1]
        n_tokens, chunk_size = hidden.shape[0], ctx.chunk_size
        n_chunks = triton.cdiv(n_tokens, chunk_size)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = None
        if need_weight:
            # fp32 accumulation across chunks; a single chunk is one GEMM, written in place.
            wide = n_chunks == 1 or weight.dtype in (torch.float32, torch.float64)
            acc_dtype = weight.dtype if wide else torch.float32
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            hidden_chunk = hidden[start:end]
            logits = _logits_chunk(hidden_chunk, weight)
            # d logits feed the GEMMs in the input dtype; fp32 inputs overwrite the logits in place.
            if logits.dtype == hidden.dtype:
                dlogits = logits
            else:
                dlogits = torch.empty(logits.shape, dtype=hidden.dtype, device=logits.device)
            bwd_epilogue(
                logits, dlogits, targets[start:end], lse[start:end], entropy[start:end],
                None if grad_logprob is None else grad_logprob[start:end],
                None if grad_entropy is None else grad_entropy[start:end],
                ctx.inv_temp,
            )
            del logits
            if need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[start:end])
            if need_weight:
                _accumulate_grad_weight(grad_weight, dlogits, hidden_chunk)
            del dlogits
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return "triton" if (device.type == "cuda" or _interpreter_enabled()) else "torch"
    if backend == "triton" and device.type != "cuda" and not _interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got device {device}) or TRITON_INTERPRET=1 set before "
            "kernels is imported; use backend='torch' or 'auto' on CPU"
        )
    return backend


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits take about 1 GiB (a multiple of 128, >= 128)."""
    chunk = _CHUNK_BYTES // (4 * max(1, vocab_size))
    chunk = max(128, min(8192, chunk // 128 * 128))
    return max(1, min(chunk, n_tokens))


def _validate(hidden, weight, targets, temperature, chunk_size):
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
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
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
        chunk_size: tokens per chunk (default: one chunk's fp32 logits take about 1 GiB, see
            default_chunk_size). Peak extra memory is about chunk_size * V * (4 + 2) bytes in
            backward, plus V * D * 4 bytes when weight is 16-bit and there are several chunks
            (the fp32 d weight accumulator); see the module docstring.
        backend: "triton" (fused Triton epilogues; CPU tensors only under TRITON_INTERPRET=1),
            "torch" (the same chunked algorithm in plain torch), or "auto" (triton on CUDA or
            under the interpreter, torch otherwise).
    Returns:
        (logprob [N] fp32, entropy [N] fp32), differentiable w.r.t. hidden and weight
        (float64 for float64 inputs, whose "torch" backend then computes everything in float64).
    """
    _validate(hidden, weight, targets, temperature, chunk_size)
    resolved = _resolve_backend(backend, hidden.device)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    if n_tokens == 0:
        stat_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        empty = hidden.new_zeros(0, dtype=stat_dtype)
        # Keep the graph connected so .backward() on an empty batch still reaches hidden/weight.
        tie = (hidden.sum() + weight.sum()).to(stat_dtype) * 0
        return empty + tie, empty + tie
    chunk = chunk_size if chunk_size is not None else default_chunk_size(n_tokens, vocab)
    return _LogprobEntropyFunction.apply(
        hidden, weight, targets.long().contiguous(), 1.0 / float(temperature), bool(with_entropy), chunk, resolved
    )
