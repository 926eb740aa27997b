"""Plain-PyTorch reference of grpo_kernels.hidden_align: explicit O(n^2) pairwise cosines per group (docs/algorithms.md §4).

Run it in float64 in tests. Rows are normalized as h / max(||h||, eps), as in the kernel.
"""
from __future__ import annotations

from typing import Tuple

import torch


def hidden_align_loss_ref(anchor_hidden: torch.Tensor, group_ids: torch.Tensor,
                          eps: float = 1e-8) -> Tuple[torch.Tensor, torch.Tensor]:
    """anchor_hidden [M, D] float, group_ids [M] int -> (loss 0-dim, mean_cos 0-dim detached).

    loss = mean over groups with >= 2 rows of (1 - mean_{i != j} cos(h_i, h_j)); 0 if there is none."""
    cosines = []
    for g in torch.unique(group_ids).tolist():
        rows = anchor_hidden[group_ids == g]
        n = rows.shape[0]
        if n < 2:
            continue
        u = rows / rows.norm(dim=1, keepdim=True).clamp_min(eps)
        gram = u @ u.T
        cosines.append((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
    if not cosines:
        return anchor_hidden.sum() * 0.0, torch.zeros((), dtype=anchor_hidden.dtype)
    cos = torch.stack(cosines)
    return (1.0 - cos).mean(), cos.mean().detach()
