"""Every metric the project reports, in one place (docs/algorithms.md §6; names and units in the README):
evaluation (pass@k, avg@k, maj@k, EAS), the rollout's (:func:`rollout_metrics`) and the update's
(:class:`UpdateMetrics`).

Training-side functions return detached 0-dim tensors (no host sync); :class:`MetricAccumulator` turns
them into floats once per step, with one cross-rank reduction.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# pass@k / avg@k / maj@k ---------------------------------------------------------------------------------


def _check_nck(n: int, c: int, k: int) -> None:
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@k needs k <= n (samples per prompt), got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021, Codex paper): 1 - C(n - c, k) / C(n, k).

    Computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
    n samples for the prompt, c of them correct, k <= n.
    """
    _check_nck(n, c, k)
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_batch(n: Tensor | Sequence[int], c: Tensor | Sequence[int], k: int) -> Tensor:
    """Per-prompt unbiased pass@k for many prompts at once: float64 [P] (mean it for the benchmark score).

    Vectorised product form: log prod_{i=n-c+1}^{n} (1 - k/i) = G(n) - G(n - c), with G a cumulative sum of
    log(1 - k/i) over i > k (only i > n - c >= k is ever used).
    """
    n_t = torch.as_tensor(n, dtype=torch.long).flatten()
    c_t = torch.as_tensor(c, dtype=torch.long).flatten()
    if n_t.shape != c_t.shape:
        raise ValueError(f"n and c must have the same length, got {n_t.numel()} and {c_t.numel()}")
    if n_t.numel() == 0:
        return torch.zeros(0, dtype=torch.float64, device=n_t.device)
    if k < 1 or bool((n_t < k).any()):
        raise ValueError(f"pass@k needs 1 <= k <= n for every prompt, got k={k}, min n={int(n_t.min())}")
    if bool((c_t < 0).any() | (c_t > n_t).any()):
        raise ValueError("pass@k needs 0 <= c <= n for every prompt")
    i = torch.arange(int(n_t.max()) + 1, dtype=torch.float64, device=n_t.device)
    terms = torch.where(i > k, torch.log1p(-k / i.clamp_min(1.0)), torch.zeros_like(i))
    cum = torch.cumsum(terms, 0)
    fail_all = (cum[n_t] - cum[n_t - c_t]).exp()  # C(n-c, k) / C(n, k)
    return torch.where(n_t - c_t < k, torch.ones_like(fail_all), 1.0 - fail_all)


def _as_rows(flags: Tensor | Sequence[Sequence[bool]], k: int, what: str) -> list[list[bool]]:
    rows = flags.tolist() if isinstance(flags, Tensor) else [list(r) for r in flags]
    for p, row in enumerate(rows):
        if len(row) < k:
            raise ValueError(f"{what}: prompt {p} has {len(row)} samples, fewer than k={k}")
    return rows


def avg_at_k(correct: Tensor | Sequence[Sequence[bool]], k: int) -> float:
    """avg@k: mean accuracy of the first k samples of each prompt, averaged over prompts.

    ``correct``: bool [P, n] (tensor or nested lists), n >= k.
    """
    if k < 1:
        raise ValueError(f"avg@k needs k >= 1, got {k}")
    if isinstance(correct, Tensor):
        if correct.dim() != 2 or correct.shape[1] < k:
            raise ValueError(f"avg@k: correct must be [P, n >= {k}], got {tuple(correct.shape)}")
        return float(correct[:, :k].double().mean()) if correct.shape[0] else 0.0
    rows = _as_rows(correct, k, "avg@k")
    if not rows:
        return 0.0
    return sum(sum(bool(x) for x in row[:k]) / k for row in rows) / len(rows)


def majority_answer(answers: Sequence[str | None]) -> int | None:
    """Index of the sample carrying the majority answer, or None if no sample has an answer.

    None answers never vote. Ties: the answer whose first occurrence comes earliest wins (deterministic,
    and independent of string order).
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return None
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return first[best]


def maj_at_k(
    canonical_answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]] | Tensor,
    k: int,
) -> float:
    """maj@k (majority voting, Wang et al. 2023 self-consistency) over the first k samples, mean over prompts.

    A prompt scores 1 if the majority canonical answer among its first k samples is correct (the flag of
    that answer's first occurrence is used); None answers never vote (see :func:`majority_answer` for
    ties); a prompt with no answer at all scores 0.
    """
    if k < 1:
        raise ValueError(f"maj@k needs k >= 1, got {k}")
    flags = _as_rows(correct, k, "maj@k correct")
    answers = [list(r) for r in canonical_answers]
    if len(answers) != len(flags):
        raise ValueError(f"maj@k: {len(answers)} answer rows but {len(flags)} correctness rows")
    if not answers:
        return 0.0
    score = 0
    for p, (row, ok) in enumerate(zip(answers, flags)):
        if len(row) < k:
            raise ValueError(f"maj@k: prompt {p} has {len(row)} answers, fewer than k={k}")
        idx = majority_answer(row[:k])
        score += int(idx is not None and bool(ok[idx]))
    return score / len(answers)


# Entropy, KL, lengths -----------------------------------------------------------------------------------

_LN2 = math.log(2.0)


def entropy_area_score(
    token_entropies_nats: Tensor, mask: Tensor, seq_ids: Tensor | None = None
) -> Tensor:
    """Entropy Area Score per sequence (docs/algorithms.md §6): EAS_i = sum_{t < T} H_{i,t} in bits over valid tokens.

    The unnormalised sum over the generated sequence (the paper's variant conditioned on a forced answer
    prefix is an evaluation option of the caller, which passes those entropies instead).

    Args:
        token_entropies_nats: float [B, T] padded (mask [B, T]) -> returns [B]; or float [N] packed with
            ``seq_ids`` long [N] -> returns [num_seqs] in sorted id order.
        mask: bool, same shape as the entropies.
    """
    if token_entropies_nats.shape != mask.shape:
        raise ValueError(f"entropies {tuple(token_entropies_nats.shape)} and mask {tuple(mask.shape)} differ")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    h = torch.where(mask, token_entropies_nats.detach(), torch.zeros_like(token_entropies_nats))
    if h.dim() == 2:
        if seq_ids is not None:
            raise ValueError("seq_ids is only used with packed 1-D entropies")
        return h.sum(dim=-1) / _LN2
    if h.dim() != 1 or seq_ids is None or seq_ids.shape != h.shape:
        raise ValueError("packed 1-D entropies need seq_ids of the same shape")
    uniq, index = torch.unique(seq_ids, return_inverse=True)
    return h.new_zeros(uniq.numel()).index_add(0, index, h) / _LN2


def entropy_stats(entropy: Tensor, mask: Tensor, top_frac: float = 0.2) -> dict[str, Tensor]:
    """Token-entropy mean and mean over the top ``top_frac`` highest-entropy valid tokens (docs/algorithms.md §6).

    The top set holds ceil(top_frac * valid tokens) tokens of this call's tokens (call it on the step's
    concatenated entropies for a step-level number). Keys: "entropy/mean", "entropy/top{100*frac}_mean".
    Detached 0-dim tensors; 0 when there is no valid token.
    """
    if entropy.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError("entropy_stats needs a bool mask of the entropies' shape")
    if not 0.0 < top_frac <= 1.0:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    valid = entropy.detach()[mask].float()
    key = f"entropy/top{round(100 * top_frac)}_mean"
    if valid.numel() == 0:
        zero = entropy.new_zeros((), dtype=torch.float32)
        return {"entropy/mean": zero, key: zero.clone()}
    top = torch.topk(valid, max(1, math.ceil(top_frac * valid.numel()))).values
    return {"entropy/mean": valid.mean(), key: top.mean()}


def approx_kl(logprob: Tensor, old_logprob: Tensor, mask: Tensor) -> Tensor:
    """Approximate KL(pi_old || pi_theta) over valid tokens, k3 estimator (Schulman 2020): mean of
    (r - 1) - log r with r = exp(logprob - old_logprob); non-negative. Detached 0-dim tensor.
    """
    if logprob.shape != old_logprob.shape or logprob.shape != mask.shape or mask.dtype != torch.bool:
        raise ValueError("approx_kl needs logprob, old_logprob and a bool mask of one shape")
    with torch.no_grad():
        log_r = (logprob.double() - old_logprob.double()).clamp(-20.0, 20.0)
        k3 = torch.where(mask, log_r.exp() - 1.0 - log_r, torch.zeros_like(log_r))
        return (k3.sum() / mask.sum().clamp_min(1)).float()


def response_length_stats(lengths: Tensor | Sequence[int],
                          truncated: Sequence[bool] | None = None) -> dict[str, Tensor]:
    """Response length statistics (tokens): mean, std (population), min, max and, with ``truncated`` (one flag
    per response: generation stopped at max_new_tokens), the fraction cut ("response_len/truncated_frac")."""
    t = torch.as_tensor(lengths).detach().double().flatten()
    if t.numel() == 0:
        raise ValueError("response_length_stats needs at least one length")
    out = {
        "response_len/mean": t.mean(),
        "response_len/std": t.std(unbiased=False),
        "response_len/min": t.min(),
        "response_len/max": t.max(),
    }
    if truncated is not None:
        flags = torch.as_tensor(list(truncated), dtype=torch.float64)
        if flags.numel() != t.numel():
            raise ValueError(f"{flags.numel()} truncation flags for {t.numel()} lengths")
        out["response_len/truncated_frac"] = flags.mean()
    return {k: v.float() for k, v in out.items()}


def rollout_metrics(all_groups: Sequence, kept: Sequence) -> dict[str, float]:
    """A step's rollout metrics over every generated group (experience.Group; dynamic sampling may have
    dropped some: `kept` are those trained on)."""
    responses = [r for g in all_groups for r in g.samples]
    if not responses:
        return {"groups/kept": float(len(kept))}
    lengths = response_length_stats([len(r.response_ids) for r in responses],
                                    [r.finish_reason == "length" for r in responses])
    out = {
        "reward/mean": sum(r.reward for r in responses) / len(responses),
        "accuracy": sum(bool(r.correct) for r in responses) / len(responses),
        "groups/kept": float(len(kept)),
        "groups/all_correct_frac": sum(all(r.correct for r in g.samples) for g in all_groups) / len(all_groups),
        "groups/all_wrong_frac": sum(not any(r.correct for r in g.samples) for g in all_groups) / len(all_groups),
    }
    out.update({k: float(lengths[k]) for k in ("response_len/mean", "response_len/max", "response_len/truncated_frac")})
    return out


# Accumulation over micro-batches and ranks ----------------------------------------------------------------

REDUCTIONS = ("sum", "mean", "max", "min")


class MetricAccumulator:
    """Collects 0-dim metric tensors over a step's micro-batches; one cross-rank reduction per step.

    Reductions: ``sum`` (over micro-batches and ranks; for losses already scaled as step shares),
    ``mean`` (weighted: sum(w * v) / sum(w) over micro-batches and ranks; weight 1 by default), ``max`` and
    ``min``. ``compute`` stacks every sum and weight into one tensor for a single SUM all_reduce (plus one
    MAX all_reduce only when max/min metrics exist), then makes one host transfer, and resets.
    """

    def __init__(self, process_group=None):
        self.process_group = process_group
        self._kind: dict[str, str] = {}
        self._value: dict[str, Tensor] = {}
        self._weight: dict[str, Tensor] = {}

    def add(self, name: str, value: Tensor | float, reduce: str = "mean", weight: Tensor | float | None = None):
        if reduce not in REDUCTIONS:
            raise ValueError(f"metric {name!r}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if name in self._kind and self._kind[name] != reduce:
            raise ValueError(f"metric {name!r} added with reduce={reduce!r}, earlier {self._kind[name]!r}")
        v = torch.as_tensor(value).detach().double()
        if v.numel() != 1:
            raise ValueError(f"metric {name!r} must be a scalar, got shape {tuple(v.shape)}")
        v = v.reshape(())
        if weight is not None and reduce != "mean":
            raise ValueError(f"metric {name!r}: weight is only meaningful with reduce='mean'")
        w = torch.as_tensor(1.0 if weight is None else weight, device=v.device).detach().double().reshape(())
        self._kind[name] = reduce
        if name not in self._value:
            self._value[name] = v * w if reduce == "mean" else v
            self._weight[name] = w
        elif reduce == "sum":
            self._value[name] = self._value[name] + v
        elif reduce == "mean":
            self._value[name] = self._value[name] + v * w
            self._weight[name] = self._weight[name] + w
        elif reduce == "max":
            self._value[name] = torch.maximum(self._value[name], v)
        else:
            self._value[name] = torch.minimum(self._value[name], v)

    def add_dict(self, metrics: dict[str, Tensor | float], reduce: str = "mean", weight=None) -> None:
        for name, value in metrics.items():
            self.add(name, value, reduce=reduce, weight=weight)

    def compute(self) -> dict[str, float]:
        """Reduce over ranks (when torch.distributed is initialised), return floats, and reset."""
        names = sorted(self._kind)
        if not names:
            return {}
        device = next(iter(self._value.values())).device
        additive = [n for n in names if self._kind[n] in ("sum", "mean")]
        extreme = [n for n in names if self._kind[n] in ("max", "min")]
        distributed = dist.is_available() and dist.is_initialized()
        parts = [self._value[n].to(device) for n in additive]
        parts += [self._weight[n].to(device) for n in additive if self._kind[n] == "mean"]
        summed = torch.stack(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
        # min is reduced as max of the negation, so one MAX collective serves both.
        signed = [self._value[n].to(device) * (1.0 if self._kind[n] == "max" else -1.0) for n in extreme]
        peaked = torch.stack(signed) if signed else torch.zeros(0, dtype=torch.float64, device=device)
        if distributed:
            if summed.numel():
                dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.process_group)
            if peaked.numel():
                dist.all_reduce(peaked, op=dist.ReduceOp.MAX, group=self.process_group)
        flat = torch.cat([summed, peaked]).tolist()  # the one host sync
        out: dict[str, float] = {}
        weights = iter(flat[len(additive): len(parts)])  # in the order of the "mean" entries of additive
        for n, v in zip(additive, flat[: len(additive)]):
            if self._kind[n] == "sum":
                out[n] = v
            else:
                w = next(weights)
                out[n] = v / w if w != 0 else 0.0
        for n, v in zip(extreme, flat[len(parts):]):
            out[n] = v if self._kind[n] == "max" else -v
        self.reset()
        return out

    def reset(self) -> None:
        self._kind.clear()
        self._value.clear()
        self._weight.clear()


class UpdateMetrics:
    """The update phase's metrics (the trainer's only metric bookkeeping): micro-batch sums stay on the device
    in a MetricAccumulator; :meth:`compute` reduces once over ranks, makes one host transfer, and turns the
    sums into the step's values. Names and units: README "Metrics"."""

    def __init__(self, process_group=None):
        self.acc = MetricAccumulator(process_group)
        self.optimizer_steps = 0

    def add_objective(self, metrics: dict[str, Tensor]) -> None:
        """losses.PolicyObjective's metrics of one micro-batch (step shares and counts); non-finite values
        (a skipped step) count as 0."""
        self.acc.add_dict({k: v.nan_to_num(0.0, 0.0, 0.0) for k, v in metrics.items()}, reduce="sum")

    def add_tokens(self, logprob: Tensor, old_logprob: Tensor, entropy: Tensor, mask: Tensor) -> None:
        """Token sums of one micro-batch: entropy, and k3 KL(pi_old || pi_theta) (as :func:`approx_kl`)."""
        with torch.no_grad():
            valid = mask.double()
            log_r = (logprob.detach().double() - old_logprob.detach().double()).clamp(-20.0, 20.0)
            k3 = torch.where(mask, log_r.exp() - 1.0 - log_r, torch.zeros_like(log_r))
            ent = torch.where(mask, entropy.detach().double(), torch.zeros_like(valid))
            self.acc.add("sum/entropy", ent.sum().nan_to_num(0.0, 0.0, 0.0), reduce="sum")
            self.acc.add("sum/kl_old", k3.sum().nan_to_num(0.0, 0.0, 0.0), reduce="sum")

    def add_mismatch(self, old_logprob: Tensor, rollout_logprob: Tensor, mask: Tensor) -> None:
        """|log pi_old - log mu| of one micro-batch (docs/algorithms.md §6: pre-update trainer logprobs vs the
        rollout engine's, once per rollout batch)."""
        with torch.no_grad():
            diff = torch.where(mask, (old_logprob.detach().double() - rollout_logprob.double()).abs(),
                               torch.zeros((), dtype=torch.float64, device=mask.device)).nan_to_num(0.0, 0.0, 0.0)
            self.acc.add("sum/mismatch_abs", diff.sum(), reduce="sum")
            self.acc.add("sum/mismatch_tokens", mask.sum().double(), reduce="sum")
            self.acc.add("mismatch/max_abs", diff.max() if diff.numel() else diff.new_zeros(()), reduce="max")

    def compute(self) -> dict[str, float]:
        """The step's update metrics: losses averaged over its optimizer steps, fractions over its tokens."""
        raw = self.acc.compute()
        steps = max(self.optimizer_steps, 1)
        out = {k: v / steps for k, v in raw.items() if k.startswith("loss/")}
        tokens = max(raw.get("count/n_tokens", 0.0), 1.0)
        out.update({
            "clip/low_frac": raw.get("count/n_clip_low", 0.0) / tokens,
            "clip/high_frac": raw.get("count/n_clip_high", 0.0) / tokens,
            "clip/dual_frac": raw.get("count/n_dual_clip", 0.0) / tokens,
            "nsr/rescue_frac": raw.get("count/n_rescued", 0.0) / tokens,
            "entropy/mean": raw.get("sum/entropy", 0.0) / tokens,
            "kl_old/approx": raw.get("sum/kl_old", 0.0) / tokens,
            "mismatch/mean_abs": raw.get("sum/mismatch_abs", 0.0) / max(raw.get("sum/mismatch_tokens", 0.0), 1.0),
            "mismatch/max_abs": raw.get("mismatch/max_abs", 0.0),
        })
        groups = raw.get("hidden_align/groups", 0.0)
        out["hidden_align/cos"] = raw.get("hidden_align/cos_sum", 0.0) / groups if groups else float("nan")
        self.optimizer_steps = 0
        return out
