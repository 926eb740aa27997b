"""Plain-PyTorch reference of grpo_kernels.logprob_entropy: materializes the full [N, V] logits.

Used by tests (as ground truth, in float64) and by benchmarks (as the "naive torch" baseline).
Not memory-efficient on purpose: it is the simplest correct statement of the math.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def logprob_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probabilities and full-vocabulary entropies from materialized logits.

    With z = hidden @ weight.T / temperature and p = softmax(z):
        logprob[i] = log p[i, targets[i]],   entropy[i] = -sum_v p[i, v] log p[i, v]   (nats).
    Positions with targets == -100 get logprob 0 and entropy 0 (and no gradient).

    Args:
        hidden: [N, D] float tensor (any float dtype).
        weight: [V, D] float tensor (the LM head).
        targets: [N] integer tensor, values in [0, V) or -100.
        temperature: > 0.
    Returns:
        (logprob [N], entropy [N]): float64 if hidden is float64, else float32. Differentiable.
    """
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    # Ignored targets are clamped to a valid index only to gather; the value is masked out below.
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logprob = logp.gather(1, safe_targets[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    zero = torch.zeros((), dtype=compute_dtype, device=hidden.device)
    return torch.where(valid, logprob, zero), torch.where(valid, entropy, zero)
