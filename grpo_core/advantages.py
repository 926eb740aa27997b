"""Advantage estimators, EDAS shaping, DAPO dynamic sampling and FIPO token weights (docs/algorithms.md §1 and §5).

Every function takes a flat batch of responses with a ``group_ids`` tensor naming each response's prompt
group. Ids may be contiguous (0, 0, 1, 1, ...) or arbitrary (e.g. dataset indices, in any order); groups
are found with ``torch.unique`` and every reduction is a scatter over groups, so nothing loops over
responses or tokens in Python (EDAS loops over responses only to turn answer strings into class ids).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

ESTIMATORS = ("grpo", "drgrpo", "rloo")


def _check_flat(name: str, t: Tensor, n: int | None = None) -> None:
    if not isinstance(t, Tensor) or t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got {type(t).__name__} of shape {getattr(t, 'shape', None)}")
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids to 0..G-1 (sorted order of the ids); return (index [N] long, G)."""
    if group_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def _group_sum(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def _constant_groups(rewards: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Bool [G]: every reward of the group is exactly equal (max == min)."""
    hi = torch.full((num_groups,), -math.inf, dtype=rewards.dtype, device=rewards.device)
    lo = torch.full((num_groups,), math.inf, dtype=rewards.dtype, device=rewards.device)
    hi = hi.scatter_reduce(0, index, rewards, reduce="amax")
    lo = lo.scatter_reduce(0, index, rewards, reduce="amin")
    return hi == lo


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    estimator: str = "grpo",
    eps: float = 1e-6,
    std_unbiased: bool = True,
) -> Tensor:
    """Per-response advantages from scalar rewards, normalised within each prompt group (docs/algorithms.md §1).

    - ``"grpo"`` (Shao et al. 2024, DeepSeekMath): A_i = (R_i - mean(R)) / (std(R) + eps).
      **[choice]** ``std_unbiased=True`` (default, as verl and TRL): the sample std, dividing by G - 1;
      ``False``: the population std (divide by G). The two differ by sqrt(G / (G - 1)).
    - ``"drgrpo"`` (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean(R).
    - ``"rloo"`` (Ahmadian et al. 2024, REINFORCE leave-one-out): A_i = R_i - mean_{j != i} R_j
      = G / (G - 1) * (R_i - mean(R)); a group of one response gets 0.

    A group whose rewards are all equal gets A = 0 exactly (no round-off residue from the mean).

    Args:
        rewards: float [num_responses].
        group_ids: integer [num_responses], contiguous or arbitrary ids.
    Returns:
        float [num_responses], dtype of ``rewards``; broadcast to tokens by the caller.
    """
    _check_flat("rewards", rewards)
    _check_flat("group_ids", group_ids, rewards.numel())
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if rewards.numel() == 0:
        return rewards.clone()
    index, num_groups = _group_index(group_ids)
    # float64 for the group statistics: rewards are few, and exact zeros for balanced groups matter.
    r = rewards.detach().to(torch.float64)
    count = _group_sum(torch.ones_like(r), index, num_groups)
    mean = _group_sum(r, index, num_groups) / count
    centered = r - mean[index]
    if estimator == "grpo":
        sq = _group_sum(centered * centered, index, num_groups)
        denom = (count - 1).clamp_min(1) if std_unbiased else count
        std = (sq / denom).sqrt()
        adv = centered / (std[index] + eps)
    elif estimator == "drgrpo":
        adv = centered
    else:  # rloo: R_i - (sum - R_i) / (G - 1) == G / (G - 1) * (R_i - mean)
        g = count[index]
        adv = torch.where(g > 1, centered * g / (g - 1).clamp_min(1), torch.zeros_like(centered))
    constant = _constant_groups(r, index, num_groups)
    adv = adv.masked_fill(constant[index], 0.0)
    return adv.to(rewards.dtype)


# Aggregation each estimator's paper pairs it with (docs/algorithms.md §1 and 3): Dr. GRPO's unbiasedness argument
# needs the constant normaliser as well as the std-free advantage.
PAPER_AGGREGATION = {"drgrpo": "seq-sum-constant"}


def aggregation_notice(estimator: str, loss_agg: str) -> str | None:
    """One line to print when the advantage estimator runs with an aggregation its paper does not use
    (e.g. ``advantage=drgrpo`` with ``token-mean``), so the pairing is a visible choice; None when paired."""
    paired = PAPER_AGGREGATION.get(estimator)
    if paired is None or paired == loss_agg:
        return None
    return (f"note: algorithm.advantage={estimator} runs with algorithm.loss_agg={loss_agg}; the paper pairs it "
            f"with loss_agg={paired} (set it for the paper's objective)")


_NO_ANSWER = object()  # the "none" class; a sentinel so that a real answer string "none" never collides


def edas_shape(
    advantages: Tensor,
    group_ids: Tensor,
    correct: Tensor,
    wrong_answer_keys: Sequence[str | None],
    alpha: float = 0.4,
    beta: float = 0.2,
    kappa: float = 2.0,
) -> Tensor:
    """Error-diversity advantage shaping (EDAS, docs/algorithms.md §1), applied after the estimator, to incorrect
    rollouts.

    Per group, W = incorrect rollouts (N_w = |W|), partitioned into K classes C_k by canonical wrong answer;
    every response whose key is ``None`` (no extractable answer) falls in one shared class "none".
    p_k = |C_k| / N_w, I_i = -ln p_k(i), H = -sum_k p_k ln p_k, S = mean_{i in W} |A_i|.
    D_i = 0 if N_w <= 1; D_i = -beta * S if K = 1; D_i = alpha * S * (I_i - H) / ln(N_w) if K > 1.
    Update, taken literally from docs/algorithms.md: A_i <- A_i + sign(D_i) * min(|D_i|, |A_i| / kappa).

    The direction of the step is sign(D_i) alone (a rare wrong answer, I_i > H, moves A_i up; a common one
    or a single shared wrong answer moves it down), whatever the sign of A_i. Sign preservation comes from
    the step size: |step| <= |A_i| / kappa < |A_i| for kappa > 1, so A_i never crosses zero, and an A_i of 0
    (e.g. an all-wrong group) is left at 0. kappa == 1 may bring A_i to exactly 0; kappa < 1 is rejected.
    Correct rollouts are returned unchanged.

    Args:
        advantages: float [num_responses] (per response, before broadcasting to tokens).
        group_ids: integer [num_responses].
        correct: bool [num_responses], the verifier's verdict.
        wrong_answer_keys: num_responses entries, the verifier's normalised final answer or None; entries of
            correct responses are ignored.
    Returns:
        float [num_responses], a new tensor (input untouched), dtype of ``advantages``.
    """
    _check_flat("advantages", advantages)
    n = advantages.numel()
    _check_flat("group_ids", group_ids, n)
    _check_flat("correct", correct, n)
    if correct.dtype != torch.bool:
        raise ValueError(f"correct must be a bool tensor, got {correct.dtype}")
    if len(wrong_answer_keys) != n:
        raise ValueError(f"wrong_answer_keys has {len(wrong_answer_keys)} entries, expected {n}")
    if kappa < 1:
        raise ValueError(f"kappa must be >= 1 so that the update preserves the sign of A, got {kappa}")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if n == 0:
        return advantages.clone()
    device = advantages.device
    index, num_groups = _group_index(group_ids)

    # Class ids over (group, answer) pairs of incorrect responses; strings need a host-side dict.
    correct_host = correct.tolist()
    index_host = index.tolist()
    class_of: dict[tuple[int, Any], int] = {}
    class_ids = [-1] * n
    for i in range(n):
        if correct_host[i]:
            continue
        key = wrong_answer_keys[i]
        if key is not None and not isinstance(key, str):
            raise ValueError(f"wrong_answer_keys[{i}] must be a str or None, got {type(key).__name__}")
        pair = (index_host[i], _NO_ANSWER if key is None else key)
        class_ids[i] = class_of.setdefault(pair, len(class_of))
    if not class_of:
        return advantages.clone()
    num_classes = len(class_of)
    class_group = torch.tensor([g for g, _ in class_of], dtype=torch.long, device=device)
    cls = torch.tensor(class_ids, dtype=torch.long, device=device)
    wrong = cls >= 0
    cls_w = cls[wrong]

    a = advantages.detach().to(torch.float64)
    a_w = a[wrong]
    grp_w = index[wrong]
    ones = torch.ones_like(a_w)
    class_size = torch.zeros(num_classes, dtype=torch.float64, device=device).index_add_(0, cls_w, ones)
    n_wrong = _group_sum(ones, grp_w, num_groups)  # N_w per group
    num_cls = _group_sum(torch.ones(num_classes, dtype=torch.float64, device=device), class_group, num_groups)
    p = class_size / n_wrong[class_group]  # p_k per class
    entropy = _group_sum(-p * p.log(), class_group, num_groups)  # H per group
    mean_abs = _group_sum(a_w.abs(), grp_w, num_groups) / n_wrong.clamp_min(1)  # S per group

    info = -p[cls_w].log()  # I_i
    s_i, h_i, nw_i, k_i = mean_abs[grp_w], entropy[grp_w], n_wrong[grp_w], num_cls[grp_w]
    diverse = alpha * s_i * (info - h_i) / nw_i.clamp_min(2).log()
    d = torch.where(k_i > 1, diverse, -beta * s_i)
    d = torch.where(nw_i <= 1, torch.zeros_like(d), d)
    shaped_w = a_w + d.sign() * torch.minimum(d.abs(), a_w.abs() / kappa)

    out = a.clone()
    out[wrong] = shaped_w
    return out.to(advantages.dtype)


def informative_groups(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Bool [num_groups]: the group's rewards are not all equal (DAPO dynamic sampling keeps these,
    docs/algorithms.md §1).

    Entry g refers to ``torch.unique(group_ids)[g]`` (groups in sorted id order).
    """
    _check_flat("rewards", rewards)
    _check_flat("group_ids", group_ids, rewards.numel())
    index, num_groups = _group_index(group_ids)
    return ~_constant_groups(rewards.detach().to(torch.float64), index, num_groups)


@dataclass
class DynamicSamplingStats:
    """What one optimizer step's dynamic sampling did (logged by the trainer)."""

    rounds: int = 0  # generation rounds used this step (a carried-over batch counts as no round)
    groups_generated: int = 0  # groups generated this step
    groups_kept: int = 0  # informative groups handed to training
    groups_uninformative: int = 0  # groups dropped because all rewards were equal
    groups_overflow: int = 0  # informative groups beyond train_batch_prompts (dropped or carried)
    groups_carried_in: int = 0  # groups that came from the previous step's overflow
    bound_hit: bool = False  # max_gen_batches reached before train_batch_prompts groups were held

    @property
    def filtered_fraction(self) -> float:
        return self.groups_uninformative / self.groups_generated if self.groups_generated else 0.0


class DynamicSamplingBuffer:
    """DAPO dynamic sampling (Yu et al. 2025, docs/algorithms.md §1): gather informative groups across generation
    rounds.

    Usage per optimizer step::

        buf.begin_step()
        while buf.needs_more():
            groups = generate_round(); buf.add_round(groups, informative_flags)
        batch, stats = buf.take()

    Groups are opaque objects (whatever the trainer uses for a prompt's rollouts). ``needs_more`` is False
    once ``train_batch_prompts`` informative groups are held or ``max_gen_batches`` rounds were run; in
    the latter case ``take`` returns the smaller batch and ``stats.bound_hit`` is True.

    **[choice]** overflow (informative groups beyond ``train_batch_prompts`` from the last round):
    ``carry_overflow=False`` (default, as in DAPO) drops them, so every trained group was generated by the
    current policy; ``True`` keeps them for the next step (one step stale, then corrected like any other
    rollout-vs-trainer mismatch). The carried groups are part of ``state_dict`` for exact resume; the
    groups must then be picklable (torch.save).
    """

    def __init__(self, train_batch_prompts: int, max_gen_batches: int, carry_overflow: bool = False):
        if train_batch_prompts < 1:
            raise ValueError(f"train_batch_prompts must be >= 1, got {train_batch_prompts}")
        if max_gen_batches < 1:
            raise ValueError(f"max_gen_batches must be >= 1, got {max_gen_batches}")
        self.train_batch_prompts = train_batch_prompts
        self.max_gen_batches = max_gen_batches
        self.carry_overflow = carry_overflow
        self._held: list[Any] = []
        self._carried: list[Any] = []
        self._stats = DynamicSamplingStats()
        self._in_step = False
        self.total = DynamicSamplingStats()  # cumulative over the run (bound_hit: ever hit)
        self.steps_bound_hit = 0

    def begin_step(self) -> None:
        if self._in_step:
            raise RuntimeError("begin_step called twice without take()")
        self._in_step = True
        self._stats = DynamicSamplingStats(groups_carried_in=len(self._carried))
        self._held, self._carried = self._carried, []

    def needs_more(self) -> bool:
        self._require_step("needs_more")
        return len(self._held) < self.train_batch_prompts and self._stats.rounds < self.max_gen_batches

    def add_round(self, groups: Sequence[Any], informative: Sequence[bool] | Tensor) -> None:
        """Add one generation round: ``groups[g]`` is kept iff ``informative[g]``."""
        self._require_step("add_round")
        if self._stats.rounds >= self.max_gen_batches:
            raise RuntimeError(f"max_gen_batches={self.max_gen_batches} rounds already used this step")
        flags = informative.tolist() if isinstance(informative, Tensor) else list(informative)
        if len(flags) != len(groups):
            raise ValueError(f"informative has {len(flags)} entries for {len(groups)} groups")
        st = self._stats
        st.rounds += 1
        st.groups_generated += len(groups)
        for group, keep in zip(groups, flags):
            if keep:
                self._held.append(group)
            else:
                st.groups_uninformative += 1

    def take(self) -> tuple[list[Any], DynamicSamplingStats]:
        """End the step: the training groups (at most train_batch_prompts) and this step's stats."""
        self._require_step("take")
        st = self._stats
        batch, overflow = self._held[: self.train_batch_prompts], self._held[self.train_batch_prompts :]
        st.groups_kept = len(batch)
        st.groups_overflow = len(overflow)
        st.bound_hit = len(batch) < self.train_batch_prompts
        self._carried = list(overflow) if self.carry_overflow else []
        self._held = []
        self._in_step = False
        t = self.total
        for name in ("rounds", "groups_generated", "groups_kept", "groups_uninformative", "groups_overflow",
                     "groups_carried_in"):
            setattr(t, name, getattr(t, name) + getattr(st, name))
        t.bound_hit = t.bound_hit or st.bound_hit
        self.steps_bound_hit += int(st.bound_hit)
        return batch, st

    def state_dict(self) -> dict[str, Any]:
        if self._in_step:
            raise RuntimeError("state_dict must be taken between steps (after take())")
        return {
            "train_batch_prompts": self.train_batch_prompts,
            "max_gen_batches": self.max_gen_batches,
            "carry_overflow": self.carry_overflow,
            "carried": list(self._carried),
            "total": asdict(self.total),
            "steps_bound_hit": self.steps_bound_hit,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("train_batch_prompts", "max_gen_batches", "carry_overflow"):
            if state[name] != getattr(self, name):
                raise ValueError(f"DynamicSamplingBuffer.{name}: checkpoint has {state[name]!r}, "
                                 f"this run has {getattr(self, name)!r}")
        self._carried = list(state["carried"])
        self.total = DynamicSamplingStats(**state["total"])
        self.steps_bound_hit = int(state["steps_bound_hit"])
        self._held, self._in_step, self._stats = [], False, DynamicSamplingStats()

    def _require_step(self, what: str) -> None:
        if not self._in_step:
            raise RuntimeError(f"{what} called outside a step: call begin_step() first")


# FIPO ---------------------------------------------------------------------------------------------------

def seq_layout(seq_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Packed layout of a flat token stream whose sequences are contiguous runs of equal ``seq_ids``.

    Returns (row [N] long: which run each token is in, pos [N] long: position inside its run,
    lengths [num_seqs] long). Raises if an id appears in two separate runs.
    """
    _check_flat("seq_ids", seq_ids)
    uniq, lengths = torch.unique_consecutive(seq_ids, return_counts=True)
    if uniq.numel() != torch.unique(seq_ids).numel():
        raise ValueError("seq_ids must be contiguous: every sequence's tokens in one run, in time order")
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=seq_ids.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(seq_ids.numel(), device=seq_ids.device) - starts[row]
    return row, pos, lengths


def _seq_ids_from_cu(cu_seqlens: Tensor, n: int) -> Tensor:
    _check_flat("cu_seqlens", cu_seqlens)
    if cu_seqlens.numel() < 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens ({n})")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def discounted_future_sum(values: Tensor, seq_ids: Tensor, gamma: float, chunk: int = 128) -> Tensor:
    """F_t = sum_{k >= t, same sequence} gamma^(k - t) * values_k over a packed stream ([N] -> [N]).

    Chunked scan: inside each chunk of ``chunk`` positions one matmul with the triangular matrix
    gamma^(k - t); across chunks a reverse loop over (max_len / chunk) carries, so powers of gamma never go
    below gamma^chunk (no underflow on 30k-token sequences) and no Python loop runs per token.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    n = values.numel()
    if n == 0:
        return values.clone()
    row, pos, lengths = seq_layout(seq_ids)
    num_seqs, max_len = lengths.numel(), int(lengths.max())
    chunk = max(1, min(chunk, max_len))
    num_chunks = -(-max_len // chunk)
    padded = values.new_zeros(num_seqs, num_chunks * chunk)
    padded[row, pos] = values
    padded = padded.view(num_seqs, num_chunks, chunk)
    offs = torch.arange(chunk, device=values.device, dtype=values.dtype)
    diff = offs[:, None] - offs[None, :]  # k - t, indexed [k, t]
    tri = torch.where(diff >= 0, torch.full_like(diff, gamma).pow(diff.clamp_min(0)), torch.zeros_like(diff))
    local = padded @ tri  # [S, C, chunk]: within-chunk discounted suffix sums
    # value carried into position t of a chunk from the next chunk's start: gamma^(chunk - t) * F(next start)
    carry_pow = torch.full_like(offs, gamma).pow(chunk - offs)
    out = torch.empty_like(local)
    carry = values.new_zeros(num_seqs)
    for c in range(num_chunks - 1, -1, -1):
        out[:, c] = local[:, c] + carry[:, None] * carry_pow
        carry = out[:, c, 0]
    return out.view(num_seqs, -1)[row, pos]


def fipo_weights(
    logprob: Tensor,
    old_logprob: Tensor,
    mask: Tensor,
    advantages_per_token: Tensor,
    seq_ids: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    tau: float = 32.0,
    eps_f: float = 0.2,
    c: float = 10.0,
    high_only: bool = False,
    neg_ratio_threshold: float = 4.0,
    neg_clamp: tuple[float, float] = (0.8, 1.0),
) -> Tensor:
    """FIPO future-KL token weights f_t (Ma et al. 2026, "FIPO: Eliciting Deep Reasoning with Future-KL
    Influenced Policy Optimization"; docs/algorithms.md §5). The shaped advantage is A~_{i,t} = A_i * f_t.

    D_t = clamp(logp_t - old_logp_t, -20, 20); m_t = 0 where D_t > ln c (else 1);
    F_t = sum_{k >= t} gamma^(k - t) M_k m_k D_k within the sequence, gamma = 2^(-1/tau);
    f_t = clip(exp F_t, 1 - eps_f, 1 + eps_f), or clip to [1, 1 + eps_f] with ``high_only``;
    where A < 0 and r_t = exp(logp_t - old_logp_t) > ``neg_ratio_threshold`` (4): f_t clamped to
    ``neg_clamp`` ([0.8, 1.0]).
    **[choice]** c = 10.0 (docs/algorithms.md leaves it open; 10 matches the FIPO authors' 32B recipe, where the same
    constant is the dual-clip bound; it must exceed 1 + eps_high).

    Args:
        logprob, old_logprob: float [N] packed tokens (current and rollout-time policy); read detached.
        mask: bool [N] response mask M.
        advantages_per_token: float [N], A broadcast to tokens (only its sign is read).
        seq_ids: long [N], each sequence a contiguous run in time order; or ``cu_seqlens`` long [S + 1].
    Returns:
        float [N] weights, detached, dtype of ``logprob``; 1.0 where ``mask`` is False.
    """
    _check_flat("logprob", logprob)
    n = logprob.numel()
    for name, t in (("old_logprob", old_logprob), ("mask", mask), ("advantages_per_token", advantages_per_token)):
        _check_flat(name, t, n)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if (seq_ids is None) == (cu_seqlens is None):
        raise ValueError("give exactly one of seq_ids and cu_seqlens")
    if seq_ids is None:
        seq_ids = _seq_ids_from_cu(cu_seqlens, n)
    _check_flat("seq_ids", seq_ids, n)
    if tau <= 0 or eps_f < 0 or c <= 1:
        raise ValueError(f"need tau > 0, eps_f >= 0, c > 1; got tau={tau}, eps_f={eps_f}, c={c}")
    lo_neg, hi_neg = neg_clamp
    if not lo_neg <= hi_neg:
        raise ValueError(f"neg_clamp must be (low, high) with low <= high, got {neg_clamp}")
    work = torch.float64 if logprob.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        log_ratio = logprob.detach().to(work) - old_logprob.detach().to(work)
        d = log_ratio.clamp(-20.0, 20.0)
        keep = mask & (d <= math.log(c))
        future = discounted_future_sum(torch.where(keep, d, torch.zeros_like(d)), seq_ids, 2.0 ** (-1.0 / tau))
        low = 1.0 if high_only else 1.0 - eps_f
        f = future.exp().clamp(low, 1.0 + eps_f)
        risky = (advantages_per_token < 0) & (log_ratio > math.log(neg_ratio_threshold))
        f = torch.where(risky, f.clamp(lo_neg, hi_neg), f)
        f = torch.where(mask, f, torch.ones_like(f))
    return f.to(logprob.dtype)
