"""Loss aggregation, KL and entropy terms, truncated importance sampling (spec section 3).

The per-token policy loss itself (clip-higher PPO/DAPO, dual-clip, GSPO, NSR) comes from ``kernels``;
this module turns per-token terms of one micro-batch into that micro-batch's share of the step loss.

Gradient-accumulation and data-parallel convention
---------------------------------------------------
All normalizers (:class:`LossNormalizer`) are counted over the whole optimizer step: every micro-batch on
every data-parallel rank. The loss a micro-batch returns is its *share* of the global step loss, so

    step loss = sum over ranks, sum over micro-batches of aggregate(...)

and the step gradient is the sum of the micro-batch gradients over micro-batches and ranks, whatever the
split. Engines do not sum: DDP / DeepSpeed average gradients over the ``world_size`` ranks, and DeepSpeed's
``engine.backward`` divides the loss by ``gradient_accumulation_steps`` by default. The trainer therefore
calls ``engine.backward(loss * world_size, scale_wrt_gas=False)`` (see :func:`backward_scale`), which
yields exactly the gradient of the global step loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-sum-constant")


def _check_tokens(n: int, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must be a 1-D tensor of {n} tokens, got shape {getattr(t, 'shape', None)}")


def _check_mask(mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")


def _seq_index(seq_ids: Tensor) -> tuple[Tensor, int]:
    if seq_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seq_ids must be an int32/int64 tensor, got {seq_ids.dtype}")
    uniq, inverse = torch.unique(seq_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def _per_seq_sum(values: Tensor, seq_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of values per sequence [S], sequence index of each token [N])."""
    index, num_seqs = _seq_index(seq_ids)
    return values.new_zeros(num_seqs).index_add(0, index, values), index


def count_valid_seqs(mask: Tensor, seq_ids: Tensor) -> Tensor:
    """Number of sequences with at least one valid token (0-dim long tensor, no host sync)."""
    _check_tokens(mask.numel(), mask=mask, seq_ids=seq_ids)
    _check_mask(mask)
    lengths, _ = _per_seq_sum(mask.to(torch.float64), seq_ids)
    return (lengths > 0).sum()


@dataclass
class LossNormalizer:
    """Step-global counts dividing every aggregated loss (spec 3), identical on all ranks.

    A sequence counts only if it has at least one valid token (an all-masked sequence adds nothing).
    """

    global_tokens: float  # valid response tokens in the step, all micro-batches and ranks
    global_seqs: float  # sequences with >= 1 valid token in the step, all micro-batches and ranks
    gen_max_len: float  # L_gen_max for seq-sum-constant: the rollout's max_new_tokens

    def __post_init__(self):
        if self.global_tokens < 0 or self.global_seqs < 0:
            raise ValueError(f"LossNormalizer counts must be >= 0, got tokens={self.global_tokens}, "
                             f"seqs={self.global_seqs}")
        if self.gen_max_len <= 0:
            raise ValueError(f"LossNormalizer.gen_max_len must be > 0, got {self.gen_max_len}")

    @classmethod
    def from_step(
        cls,
        masks: Sequence[Tensor],
        seq_ids: Sequence[Tensor],
        gen_max_len: int,
        process_group=None,
    ) -> "LossNormalizer":
        """Count this rank's micro-batches and sum the counts over ranks (one all_reduce, one host sync).

        Args:
            masks: per micro-batch, bool [N_mb] response masks.
            seq_ids: per micro-batch, long [N_mb]; a sequence never spans micro-batches (ids may repeat
                across micro-batches: each micro-batch is counted on its own).
            gen_max_len: max_new_tokens of the rollout (seq-sum-constant's constant).
            process_group: torch.distributed group; all ranks of it when distributed is initialised.
        """
        if len(masks) != len(seq_ids):
            raise ValueError(f"got {len(masks)} masks and {len(seq_ids)} seq_ids lists")
        if len(masks) == 0:
            raise ValueError("from_step needs at least one micro-batch")
        device = masks[0].device
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for mask, ids in zip(masks, seq_ids):
            _check_tokens(mask.numel(), mask=mask, seq_ids=ids)
            _check_mask(mask)
            counts[0] += mask.sum()
            counts[1] += count_valid_seqs(mask, ids)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)
        tokens, seqs = counts.tolist()
        return cls(global_tokens=tokens, global_seqs=seqs, gen_max_len=float(gen_max_len))


def backward_scale(world_size: int) -> float:
    """Factor the trainer multiplies each micro-batch loss by before a gradient-averaging backward.

    DDP / DeepSpeed divide the summed gradients by ``world_size``; with :func:`aggregate`'s step-global
    normalizers the wanted gradient is the plain sum, so multiply by ``world_size`` (and pass
    ``scale_wrt_gas=False`` to DeepSpeed's ``engine.backward``).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return float(world_size)


def aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    seq_ids: Tensor,
    mode: str,
    normalizer: LossNormalizer,
) -> Tensor:
    """One micro-batch's share of the step-aggregated loss (0-dim), spec 3.

    - ``token-mean`` (DAPO, Yu et al. 2025): sum_t M l / global_tokens.
    - ``seq-mean-token-mean`` (GRPO, Shao et al. 2024; GSPO, Zheng et al. 2025):
      sum_i (sum_t M l / |y_i|) / global_seqs, |y_i| the sequence's valid length.
    - ``seq-sum-constant`` (Dr. GRPO, Liu et al. 2025): sum_i (sum_t M l / L_gen_max) / global_seqs.

    Summed over all micro-batches and ranks this is the step loss, independent of the split (see the
    module docstring for the backward convention). With an empty step (no valid tokens) it is 0.

    Args:
        per_token_loss: float [N] packed tokens of the micro-batch.
        mask: bool [N]; masked tokens contribute nothing (NaN/inf there are ignored too).
        seq_ids: long [N]; tokens of one sequence share an id; a sequence lies in one micro-batch.
    """
    _check_tokens(per_token_loss.numel(), per_token_loss=per_token_loss, mask=mask, seq_ids=seq_ids)
    _check_mask(mask)
    if mode not in AGG_MODES:
        raise ValueError(f"aggregation mode must be one of {AGG_MODES}, got {mode!r}")
    # where(), not multiplication, so a non-finite value at a masked position cannot poison the sum.
    # bf16 cannot count lengths past 256 exactly nor sum many tokens well: work in at least float32.
    work = torch.promote_types(per_token_loss.dtype, torch.float32)
    loss = per_token_loss.to(work)
    masked = torch.where(mask, loss, torch.zeros_like(loss))
    if mode == "token-mean":
        return masked.sum() / max(normalizer.global_tokens, 1.0)
    if mode == "seq-sum-constant":
        return masked.sum() / (normalizer.gen_max_len * max(normalizer.global_seqs, 1.0))
    lengths, index = _per_seq_sum(mask.to(work), seq_ids)
    per_token_share = masked / lengths.clamp_min(1.0)[index]
    return per_token_share.sum() / max(normalizer.global_seqs, 1.0)


def aggregation_weights(mask: Tensor, seq_ids: Tensor, mode: str, normalizer: LossNormalizer) -> Tensor:
    """Per-token weights w [N] (float32, 0 at masked tokens) with aggregate(l, ...) == sum_t w_t l_t for every
    finite l: the aggregation as constants, for losses computed chunk by chunk (kernels.fused_token_loss)."""
    _check_tokens(mask.numel(), mask=mask, seq_ids=seq_ids)
    _check_mask(mask)
    if mode not in AGG_MODES:
        raise ValueError(f"aggregation mode must be one of {AGG_MODES}, got {mode!r}")
    ones = mask.to(torch.float32)
    if mode == "token-mean":
        return ones / max(normalizer.global_tokens, 1.0)
    if mode == "seq-sum-constant":
        return ones / (normalizer.gen_max_len * max(normalizer.global_seqs, 1.0))
    lengths, index = _per_seq_sum(ones, seq_ids)
    return ones / lengths.clamp_min(1.0)[index] / max(normalizer.global_seqs, 1.0)


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate to a frozen reference policy (spec 3; Schulman 2020, "Approximating KL").

    - ``k1``: log(pi / pi_ref) = logprob - ref_logprob.
    - ``k3``: exp(ref - lp) - (ref - lp) - 1, clamped to [-10, 10]. The log-ratio is first clamped to
      [-20, 20] so exp never overflows (an inf there would turn the clamp's zero gradient into NaN);
      the final clamp binds long before that range matters.

    Args: float tensors of equal shape (any shape). Returns: same shape; differentiable in ``logprob``.
    """
    if logprob.shape != ref_logprob.shape:
        raise ValueError(f"logprob {tuple(logprob.shape)} and ref_logprob {tuple(ref_logprob.shape)} differ")
    if kind == "k1":
        return logprob - ref_logprob
    if kind == "k3":
        log_ratio = (ref_logprob - logprob).clamp(-20.0, 20.0)
        return (log_ratio.exp() - log_ratio - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kl kind must be 'k1' or 'k3', got {kind!r}")


def policy_objective(
    policy_loss: Tensor,
    mask: Tensor,
    seq_ids: Tensor,
    mode: str,
    normalizer: LossNormalizer,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss of one micro-batch: agg(l) - entropy_coef * agg(H) + kl_coef * agg(kl) (spec 3).

    All three terms use the same aggregation ``mode`` and step-global ``normalizer``, so every term and
    metric is the micro-batch's share of the step value (sum them over micro-batches and ranks).

    Args:
        policy_loss: float [N] per-token policy loss from kernels.clipped_policy_loss / gspo_policy_loss.
        entropy: float [N] token entropy (nats, differentiable) or None; needed when entropy_coef != 0.
        kl: float [N] per-token KL to the reference (see :func:`kl_penalty`) or None; needed when kl_coef != 0.
    Returns:
        (loss 0-dim with grad, metrics: detached 0-dim tensors "loss/policy", "loss/total" and, when given,
        "loss/entropy_bonus", "actor/entropy", "loss/kl", "actor/kl_ref").
    """
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy tensor")
    if kl_coef != 0.0 and kl is None:
        raise ValueError("kl_coef != 0 needs the per-token kl tensor")
    pg = aggregate(policy_loss, mask, seq_ids, mode, normalizer)
    total = pg
    metrics = {"loss/policy": pg.detach()}
    if entropy is not None:
        ent = aggregate(entropy, mask, seq_ids, mode, normalizer)
        metrics["actor/entropy"] = ent.detach()
        if entropy_coef != 0.0:
            total = total - entropy_coef * ent
        metrics["loss/entropy_bonus"] = (-entropy_coef * ent).detach()
    if kl is not None:
        kl_agg = aggregate(kl, mask, seq_ids, mode, normalizer)
        metrics["actor/kl_ref"] = kl_agg.detach()
        if kl_coef != 0.0:
            total = total + kl_coef * kl_agg
        metrics["loss/kl"] = (kl_coef * kl_agg).detach()
    metrics["loss/total"] = total.detach()
    return total, metrics


def tis_weights(
    trainer_old_logprob: Tensor,
    rollout_logprob: Tensor,
    mask: Tensor,
    seq_ids: Tensor,
    level: str = "token",
    clip: float = 2.0,
) -> Tensor:
    """Truncated importance-sampling weights for the rollout-engine vs trainer mismatch (detached).

    Rollouts are sampled from the inference engine's policy mu (``rollout_logprob``) while the loss
    assumes the trainer's pi_old (``trainer_old_logprob``); weighting the per-token loss by
    w = min(pi_old / mu, C) corrects the mismatch with bounded variance (truncated IS, Ionides 2008; used
    for RL on LLMs by Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL").
    - ``token``: w_t = min(exp(old_t - rollout_t), C).
    - ``sequence``: w_i = min(exp(sum_t M (old_t - rollout_t)), C), broadcast to the sequence's tokens.
    Computed as exp(min(x, ln C)) so a large log-ratio never overflows.

    Args: float [N] log-probs, bool [N] mask, long [N] seq_ids. Returns: float [N]; 1.0 where mask is False.
    """
    n = trainer_old_logprob.numel()
    _check_tokens(n, trainer_old_logprob=trainer_old_logprob, rollout_logprob=rollout_logprob, mask=mask,
                  seq_ids=seq_ids)
    _check_mask(mask)
    if clip <= 0:
        raise ValueError(f"TIS clip C must be > 0, got {clip}")
    with torch.no_grad():
        work = torch.float64 if trainer_old_logprob.dtype == torch.float64 else torch.float32
        diff = trainer_old_logprob.detach().to(work) - rollout_logprob.detach().to(work)
        diff = torch.where(mask, diff, torch.zeros_like(diff))
        if level == "token":
            log_w = diff
        elif level == "sequence":
            seq_sum, index = _per_seq_sum(diff, seq_ids)
            log_w = seq_sum[index]
        else:
            raise ValueError(f"TIS level must be 'token' or 'sequence', got {level!r}")
        w = log_w.clamp(max=math.log(clip)).exp()
        w = torch.where(mask, w, torch.ones_like(w))
    return w.to(trainer_old_logprob.dtype)


def logprob_mismatch_stats(
    trainer_logprob: Tensor, rollout_logprob: Tensor, mask: Tensor, seq_ids: Tensor
) -> dict[str, Tensor]:
    """Rollout-engine vs trainer log-prob mismatch of one micro-batch (spec 6); detached 0-dim tensors.

    - "mismatch/mean_abs_diff", "mismatch/max_abs_diff": |trainer - rollout| over valid tokens.
    - "mismatch/kl_k3": per-sequence mean of the k3 estimate of KL(mu || pi), samples drawn from the
      rollout policy mu: exp(d) - d - 1 with d = trainer - rollout; then the mean over sequences.
    - "mismatch/kl_k1": the same with the k1 estimate rollout - trainer (unbiased, can be negative).
    - "mismatch/num_tokens", "mismatch/num_seqs": the counts, to weight means across micro-batches.
    Means over an empty micro-batch are 0.
    """
    n = trainer_logprob.numel()
    _check_tokens(n, trainer_logprob=trainer_logprob, rollout_logprob=rollout_logprob, mask=mask, seq_ids=seq_ids)
    _check_mask(mask)
    with torch.no_grad():
        d = trainer_logprob.detach().double() - rollout_logprob.detach().double()
        d = torch.where(mask, d, torch.zeros_like(d))
        valid = mask.double()
        num_tokens = valid.sum()
        abs_d = d.abs()
        k3 = d.exp() - d - 1.0
        lengths, index = _per_seq_sum(valid, seq_ids)
        has = lengths > 0
        num_seqs = has.sum().double()
        seq_k3 = torch.zeros_like(lengths).index_add(0, index, torch.where(mask, k3, torch.zeros_like(k3)))
        seq_k1 = torch.zeros_like(lengths).index_add(0, index, -d)
        denom = lengths.clamp_min(1.0)
        out = {
            "mismatch/mean_abs_diff": abs_d.sum() / num_tokens.clamp_min(1.0),
            "mismatch/max_abs_diff": abs_d.max() if n else d.new_zeros(()),
            "mismatch/kl_k3": (seq_k3 / denom)[has].sum() / num_seqs.clamp_min(1.0),
            "mismatch/kl_k1": (seq_k1 / denom)[has].sum() / num_seqs.clamp_min(1.0),
            "mismatch/num_tokens": num_tokens,
            "mismatch/num_seqs": num_seqs,
        }
    return {k: v.float() for k, v in out.items()}
