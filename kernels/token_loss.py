"""Loss-fused LM head: a token-separable loss of (logprob, entropy) with its gradients made in the forward.

grpo_kernels.fused_logprob_entropy must recompute the logits in backward (4 GEMMs, 8*N*D*V flops) because
the upstream gradients of logprob and entropy are unknown when its forward runs. When the caller can
state the loss as a function of the per-token logprob and entropy in which token i's term depends only
on token i (the clipped policy loss, its NSR rescue, an entropy bonus, a k1/k3 KL to given reference
logprobs, any fixed per-token weights and normalizers), those gradients are known chunk by chunk inside
the forward, so the whole op is the 3-GEMM roofline (6*N*D*V flops):

    per token chunk c of C rows:
        logits_c = hidden_c @ weight.T                          (fp32 output; GEMM 1)
        logprob_c, entropy_c, lse_c                             (_logprob_entropy_fwd_kernel)
        loss_c = loss_fn(logprob_c, entropy_c, start, end)      (autograd on [C] tensors only)
        g_lp, g_ent = d loss_c / d logprob_c, d entropy_c
        d logits_c from logits_c, lse, H, g_lp, g_ent           (_logprob_entropy_bwd_kernel, in place)
        d hidden_c = d logits_c @ weight                        (GEMM 2, written to the gradient)
        d weight  += d logits_c.T @ hidden_c                    (GEMM 3, fp32 accumulator)
    backward: scale the stored gradients by the upstream scalar gradient of the loss.

Memory beyond inputs and outputs: the forward's C * V * 4 bytes of fp32 logits (for fp32 inputs the d logits
overwrite them in place; for 16-bit inputs they go to a C * V * s buffer of the input dtype), the gradients of
hidden and weight held from forward to backward (they are the returned gradients), and, for 16-bit
weights with more than one chunk, a V * D * 4 bytes fp32 d weight accumulator unless
fp32_grad_weight_accumulator=False, which accumulates in the weight dtype (one rounding per chunk).

Not for sequence-level losses (GSPO's length-normalized sequence ratio couples a sequence's tokens,
which may sit in different chunks) or for losses that need logprob/entropy anywhere else: use
fused_logprob_entropy there.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from grpo_kernels.common import resolve_backend
from grpo_kernels.logprob_entropy import (
    EPILOGUES,
    addmm_,
    default_chunk_size,
    forward_chunks,
    plain_logprob_entropy,
    use_plain_autograd,
    validate_inputs,
)

TokenLossFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def _check_scalar(loss, start: int, end: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar tensor (the sum of the chunk's per-token terms), "
                         f"got {getattr(loss, 'shape', type(loss))} for rows {start}:{end}")


def _token_loss_grads(loss_fn, logprob, entropy, start, end, with_entropy, need_grads):
    """(loss of rows start:end, d loss / d logprob, d loss / d entropy); None for an unused input."""
    lp = logprob[start:end].detach().requires_grad_(need_grads)
    ent = entropy[start:end].detach().requires_grad_(need_grads and with_entropy)
    with torch.enable_grad():
        loss = loss_fn(lp, ent, start, end)
    _check_scalar(loss, start, end)
    if not need_grads or not loss.requires_grad:
        return loss.detach().to(logprob.dtype), None, None
    inputs = [lp, ent] if with_entropy else [lp]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grad_lp = None if grads[0] is None else grads[0].to(logprob.dtype).contiguous()
    grad_ent = None if not with_entropy or grads[1] is None else grads[1].to(logprob.dtype).contiguous()
    return loss.detach().to(logprob.dtype), grad_lp, grad_ent


class _TokenLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, loss_fn, inv_temp, with_entropy, chunk_size, fp32_acc, backend,
                need_hidden, need_weight):
        bwd_epilogue = EPILOGUES[backend][1]
        (logprob, entropy, lse), chunks = forward_chunks(hidden, weight, targets, inv_temp, with_entropy,
                                                          chunk_size, backend)
        total = torch.zeros((), dtype=logprob.dtype, device=hidden.device)
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_size if chunk_size is not None else default_chunk_size(n_tokens, vocab)
        wide = hidden.dtype in (torch.float32, torch.float64)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None
        if need_weight:
            acc_dtype = weight.dtype if (wide or n_tokens <= chunk or not fp32_acc) else torch.float32
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start, end, logits in chunks:
            loss, grad_lp, grad_ent = _token_loss_grads(loss_fn, logprob, entropy, start, end, with_entropy,
                                                        need_hidden or need_weight)
            total += loss
            if grad_lp is None and grad_ent is None:  # the loss does not depend on these rows
                if need_hidden:
                    grad_hidden[start:end].zero_()
                continue
            dlogits = logits if logits.dtype == hidden.dtype else torch.empty(
                logits.shape, dtype=hidden.dtype, device=logits.device)
            bwd_epilogue(logits, dlogits, targets[start:end], 0, lse[start:end], entropy[start:end],
                         grad_lp, grad_ent, inv_temp)
            del logits
            if need_hidden:
                torch.mm(dlogits, weight, out=grad_hidden[start:end])
            if need_weight:
                addmm_(grad_weight, dlogits.T, hidden[start:end])
            del dlogits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logprob, entropy)
        return total, logprob, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprob, _grad_entropy):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss.to(grad_weight.dtype)).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def fused_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: TokenLossFn,
    temperature: float = 1.0,
    *,
    with_entropy: bool = True,
    chunk_size: int | None = None,
    fp32_grad_weight_accumulator: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum over chunks of loss_fn(logprob, entropy) through the LM head, gradients made in the forward.

    With z = hidden @ weight.T / temperature, p = softmax(z), logprob = log p[target] and entropy =
    -sum_v p log p (as grpo_kernels.fused_logprob_entropy), returns loss = sum_c loss_fn(logprob[c], entropy[c],
    start_c, end_c) over token chunks c = start_c:end_c, differentiable w.r.t. hidden and weight.

    Args:
        hidden: [N, D] fp32 / bf16 / fp16 (fp64 for testing); weight: [V, D] same dtype (the LM head).
        targets: [N] int64 in [0, V) or -100 (ignored: logprob 0, entropy 0 passed to loss_fn, and no
            gradient reaches hidden/weight through these rows whatever loss_fn does with them).
        loss_fn: (logprob [C] fp32, entropy [C] fp32, start, end) -> scalar tensor, the sum of the
            per-token loss terms of rows start:end. It must be token-separable (row i's term depends
            only on logprob[i], entropy[i] and constants such as old_logprob[start:end]), and its only
            differentiable inputs are logprob and entropy; it runs under autograd on [C] tensors.
        temperature: Python float > 0, the sampling temperature.
        with_entropy: False skips the entropy work; loss_fn then receives zeros for entropy.
        chunk_size: tokens per chunk (default: one chunk's fp32 logits fit the 768 MiB workspace).
        fp32_grad_weight_accumulator: for 16-bit weights over several chunks, accumulate d weight in
            fp32 (V * D * 4 extra bytes; default) or in the weight dtype (one rounding per chunk).
        backend: "triton", "torch" or "auto", as in fused_logprob_entropy.
    Returns:
        (loss [] fp32, logprob [N] fp32, entropy [N] fp32); logprob and entropy are detached (for
        metrics). Backward costs two elementwise scalings: the three GEMMs all ran in the forward, so
        its peak memory includes the held gradients of hidden and weight.
    """
    validate_inputs(hidden, weight, targets, temperature, chunk_size, None)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logprob, entropy, start, end) -> scalar, got {type(loss_fn)}")
    resolved = resolve_backend(backend, hidden.device, "fused_token_loss")
    if use_plain_autograd(resolved, hidden, weight, chunk_size):
        return _plain_token_loss(hidden, weight, targets, loss_fn, float(temperature), bool(with_entropy))
    need_hidden = hidden.requires_grad and torch.is_grad_enabled()
    need_weight = weight.requires_grad and torch.is_grad_enabled()
    return _TokenLossFunction.apply(
        hidden, weight, targets.long().contiguous(), loss_fn, 1.0 / float(temperature), bool(with_entropy),
        chunk_size, bool(fp32_grad_weight_accumulator), resolved, need_hidden, need_weight,
    )


def _plain_token_loss(hidden, weight, targets, loss_fn, temperature: float, with_entropy: bool):
    """A small problem (logprob_entropy.use_plain_autograd): one chunk in plain autograd, whose backward runs the
    GEMMs. On CPU that is faster than making the gradients in the forward (5.1 vs 8.7 ms fwd+bwd at N=1800, D=64,
    V=101, one thread); same values to fp32 rounding, and ignored rows still pass no gradient (torch.where)."""
    logprob, entropy = plain_logprob_entropy(hidden, weight, targets, temperature, with_entropy)
    loss = loss_fn(logprob, entropy, 0, hidden.shape[0])
    _check_scalar(loss, 0, hidden.shape[0])
    return loss.to(logprob.dtype), logprob.detach(), entropy.detach()
