"""The policy objective: loss aggregation, KL and entropy terms, truncated importance sampling, Hidden-Align
(docs/algorithms.md §3-5).

The per-token policy loss itself (clip-higher PPO/DAPO, dual-clip, GSPO, NSR) comes from ``grpo_kernels``;
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

from grpo_core.advantages import fipo_weights
from grpo_kernels import clipped_policy_loss, gspo_policy_loss, hidden_align_loss

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
    """Step-global counts dividing every aggregated loss (docs/algorithms.md §3), identical on all ranks.

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
    """One micro-batch's share of the step-aggregated loss (0-dim), docs/algorithms.md §3.

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
    # where(), not multiplication, so a non-finite value at a masked position cannot poison the sum.
    # bf16 cannot count lengths past 256 exactly nor sum many tokens well: work in at least float32.
    work = torch.promote_types(per_token_loss.dtype, torch.float32)
    weights = aggregation_weights(mask, seq_ids, mode, normalizer, dtype=work)
    loss = per_token_loss.to(work)
    return (torch.where(mask, loss, torch.zeros_like(loss)) * weights).sum()


def aggregation_weights(mask: Tensor, seq_ids: Tensor, mode: str, normalizer: LossNormalizer,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-token weights w [N] (0 at masked tokens) with aggregate(l, ...) == sum_t w_t l_t (masked l dropped):
    the aggregation as constants, so a loss computed chunk by chunk (grpo_kernels.fused_token_loss) aggregates
    exactly as the whole micro-batch does. The one definition of the three modes (see :func:`aggregate`)."""
    _check_tokens(mask.numel(), mask=mask, seq_ids=seq_ids)
    _check_mask(mask)
    if mode not in AGG_MODES:
        raise ValueError(f"aggregation mode must be one of {AGG_MODES}, got {mode!r}")
    ones = mask.to(dtype)
    if mode == "token-mean":
        return ones / max(normalizer.global_tokens, 1.0)
    if mode == "seq-sum-constant":
        return ones / (normalizer.gen_max_len * max(normalizer.global_seqs, 1.0))
    lengths, index = _per_seq_sum(ones, seq_ids)
    return ones / lengths.clamp_min(1.0)[index] / max(normalizer.global_seqs, 1.0)


def kl_penalty(logprob: Tensor, ref_logprob: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate to a frozen reference policy (docs/algorithms.md §3; Schulman 2020, "Approximating KL").

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


class PolicyObjective:
    """The loss of one packed micro-batch (docs/algorithms.md §3-5), one definition for both LM-head paths.

        loss = sum_t w_t (l_t - entropy_coef * H_t + kl_coef * kl_t) + hidden_align_coef * share * L_align

    with w = :func:`aggregation_weights` (the aggregation mode as per-token constants over the step-global
    normalizer), l the per-token clipped-ratio (or GSPO) loss with NSR from ``grpo_kernels``, optionally FIPO-shaped
    advantages and TIS weights, H the token entropy and kl the k1/k3 estimate to the frozen reference.

    Two ways to call it, same numbers:
    - :meth:`__call__` with the micro-batch's logprob/entropy (the default, unfused LM head);
    - :meth:`token_loss_fn`: the token-separable part as ``loss_fn(logprob, entropy, start, end)`` for
      ``grpo_kernels.fused_token_loss`` (``model.fused_lm_head_loss``), which calls it chunk by chunk inside the
      LM head's forward; then :meth:`finish` adds Hidden-Align and returns the metrics.
    Metrics (one set of keys for both): detached 0-dim tensors, each the micro-batch's share of the step value
    (``loss/*``) or a count (``count/*``), to be summed over micro-batches and ranks (grpo_core.metrics).

    ``mb`` is a grpo_core.packing.MicroBatch (mask, seq_ids, advantages, old_logprob, rollout_logprob,
    ref_logprob, token_index, seq_index, response_cu, anchor_groups); ``on_policy`` means the old policy is
    the current one (old logprob = the detached current logprob: ratio 1 at the single pass).
    """

    COUNTS = ("n_tokens", "n_clip_low", "n_clip_high", "n_rescued", "n_dual_clip")

    def __init__(self, algo, *, seed: int, step: int, backend: str = "auto", with_kl: bool = False):
        if algo.loss_agg not in AGG_MODES:
            raise ValueError(f"aggregation mode must be one of {AGG_MODES}, got {algo.loss_agg!r}")
        self.algo = algo
        self.backend = backend
        self.with_kl = with_kl
        # NSR draws: Philox keyed by the run seed, counters (global token id, optimizer step): independent of
        # micro-batching and of the number of ranks.
        self.clip = dict(eps_low=algo.eps_low, eps_high=algo.eps_high, nsr=algo.nsr, nsr_prob=algo.nsr_prob,
                         nsr_band=algo.nsr_band, seed=seed, step=step % 2**32)

    @property
    def token_separable(self) -> bool:
        """True when token t's loss depends on token t's logprob/entropy only (what the fused head needs)."""
        a = self.algo
        return a.policy_loss != "gspo" and not a.fipo and a.tis == "off"

    # ------------------------------------------------------------------------------------------ terms
    def _begin(self, mb, normalizer: "LossNormalizer") -> None:
        self._mb = mb
        self._weights = aggregation_weights(mb.mask, mb.seq_ids, self.algo.loss_agg, normalizer)
        zero = torch.zeros((), dtype=torch.float32, device=mb.mask.device)
        self._sums = {k: zero.clone() for k in ("policy", "entropy", "kl")}
        self._counts = torch.zeros(len(self.COUNTS), dtype=torch.int64, device=mb.mask.device)

    def _weighted_sum(self, values: Tensor, s: int, e: int) -> Tensor:
        # where(), not multiplication, as aggregate(): non-finite values at masked tokens are dropped.
        return (torch.where(self._mb.mask[s:e], values.float(), 0.0) * self._weights[s:e]).sum()

    def _terms(self, per_tok: Tensor, stats: dict, logprob: Tensor, entropy: Tensor, s: int, e: int) -> Tensor:
        """sum_t w_t (l_t - c_H H_t + c_KL kl_t) over rows s:e; the metric sums and counts along the way."""
        a, mb = self.algo, self._mb
        policy, ent = self._weighted_sum(per_tok, s, e), self._weighted_sum(entropy, s, e)
        total = policy - a.entropy_coef * ent
        self._sums["policy"] += policy.detach()
        self._sums["entropy"] += ent.detach()
        if self.with_kl:
            kl = self._weighted_sum(kl_penalty(logprob, mb.ref_logprob[s:e], a.kl_type), s, e)
            total = total + a.kl_coef * kl
            self._sums["kl"] += kl.detach()
        self._counts += torch.stack([stats[k].to(torch.int64) for k in self.COUNTS])
        return total

    def _token_chunk(self, logprob: Tensor, entropy: Tensor, s: int, e: int, old: Tensor) -> Tensor:
        mb = self._mb
        per_tok, st = clipped_policy_loss(logprob, old, mb.advantages[s:e], mb.mask[s:e], dual_clip=self.algo.dual_clip,
                                          token_index=mb.token_index[s:e], backend=self.backend, **self.clip)
        return self._terms(per_tok, st, logprob, entropy, s, e)

    # ------------------------------------------------------------------------------------------ entry points
    def __call__(self, mb, normalizer: "LossNormalizer", logprob: Tensor, entropy: Tensor, on_policy: bool,
                 anchor_hidden: Tensor | None = None, n_align_groups: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss 0-dim with grad, metrics) of the micro-batch from its logprob/entropy [R]."""
        a = self.algo
        self._begin(mb, normalizer)
        old = logprob.detach() if on_policy else mb.old_logprob
        n = logprob.numel()
        if self.token_separable:
            total = self._token_chunk(logprob, entropy, 0, n, old)
        else:
            adv = mb.advantages
            if a.fipo:
                adv = adv * fipo_weights(logprob.detach(), old, mb.mask, adv, seq_ids=mb.seq_ids, tau=a.fipo_tau,
                                         eps_f=a.fipo_eps, high_only=a.fipo_high_only)
            if a.policy_loss == "gspo":
                per_tok, st = gspo_policy_loss(logprob, old, adv, mb.mask, mb.response_cu, seq_index=mb.seq_index,
                                               backend=self.backend, **self.clip)
            else:
                per_tok, st = clipped_policy_loss(logprob, old, adv, mb.mask, dual_clip=a.dual_clip,
                                                  token_index=mb.token_index, backend=self.backend, **self.clip)
            if a.tis != "off":
                per_tok = per_tok * tis_weights(old, mb.rollout_logprob, mb.mask, mb.seq_ids, level=a.tis,
                                                clip=a.tis_clip)
            total = self._terms(per_tok, st, logprob, entropy, 0, n)
        return self.finish(total, anchor_hidden, n_align_groups)

    def token_loss_fn(self, mb, normalizer: "LossNormalizer", on_policy: bool):
        """``loss_fn(logprob, entropy, start, end)`` for grpo_kernels.fused_token_loss: the chunk's
        sum_t w_t (l_t - c_H H_t + c_KL kl_t); call :meth:`finish` with the fused op's total afterwards."""
        if not self.token_separable:
            raise ValueError("the fused LM-head loss needs a token-separable objective (no GSPO, FIPO or TIS)")
        self._begin(mb, normalizer)

        def loss_fn(logprob: Tensor, entropy: Tensor, s: int, e: int) -> Tensor:
            old = logprob.detach() if on_policy else mb.old_logprob[s:e]
            return self._token_chunk(logprob, entropy, s, e, old)

        return loss_fn

    def finish(self, total: Tensor, anchor_hidden: Tensor | None, n_align_groups: int) -> tuple[Tensor, dict]:
        """Add this micro-batch's share of the Hidden-Align term (docs/algorithms.md §4) and return
        (loss, metrics). ``n_align_groups``: groups with >= 2 anchors in the whole mini-batch (all ranks)."""
        a, mb = self.algo, self._mb
        device = total.device
        align = cos_sum = torch.zeros((), dtype=torch.float32, device=device)
        n_here = 0
        if n_align_groups > 0 and anchor_hidden is not None and anchor_hidden.shape[0] > 1:
            n_here = groups_with_pairs(mb.anchor_groups)
            if n_here:
                align_mean, cos = hidden_align_loss(anchor_hidden.float(), mb.anchor_groups, backend=self.backend)
                align = align_mean * (n_here / n_align_groups)  # this micro-batch's share of the step's group mean
                total = total + a.hidden_align_coef * align
                cos_sum = cos.detach() * n_here
        s = self._sums
        metrics = {
            "loss/total": total.detach().float(),
            "loss/policy": s["policy"],
            "loss/entropy_agg": s["entropy"],
            "loss/entropy_bonus": -a.entropy_coef * s["entropy"],
            "loss/kl_ref_agg": s["kl"],
            "loss/kl": a.kl_coef * s["kl"],
            "loss/hidden_align": align.detach(),
            "hidden_align/cos_sum": cos_sum,
            "hidden_align/groups": torch.tensor(float(n_here), device=device),
        }
        metrics.update({f"count/{k}": self._counts[i].float() for i, k in enumerate(self.COUNTS)})
        del self._mb, self._weights
        return total, metrics


def groups_with_pairs(group_ids: Tensor) -> int:
    """Number of groups with >= 2 rows (those that carry a Hidden-Align term)."""
    if group_ids.numel() == 0:
        return 0
    _, counts = torch.unique(group_ids, return_counts=True)
    return int((counts >= 2).sum())


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
