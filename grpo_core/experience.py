"""Rollout experience and its packing into token-budgeted micro-batches (flat token streams, no padding).

A micro-batch is one packed stream [1, T] of whole (prompt + response) sequences with `cu_seqlens`, plus the
per-response-token tensors the loss needs, aligned to `response_positions` (the stream positions whose next
token is a response token). Groups are kept whole inside a micro-batch whenever they fit the budget, so the
Hidden-Align term sees every correct rollout of a group together.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Sample:
    """One response of one prompt (a member of a GRPO group)."""

    group_index: int  # global index of its prompt group in this step's train batch
    sample_index: int  # 0..G-1 inside the group
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]  # the engine's sampling logprobs, one per response token
    finish_reason: str = "stop"
    text: str = ""
    reward: float = 0.0
    correct: bool = False
    answer_key: Optional[str] = None  # canonical answer (EDAS classes, majority vote)
    advantage: float = 0.0
    anchor: Optional[int] = None  # Hidden-Align anchor: index into response_ids (-1 = last prompt token)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Group:
    """The G responses to one prompt."""

    prompt_uid: str
    answer: Optional[str]
    samples: list[Sample] = field(default_factory=list)

    @property
    def informative(self) -> bool:
        rewards = [s.reward for s in self.samples]
        return len(rewards) > 1 and max(rewards) != min(rewards)

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.samples)


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [1, T] long, packed stream
    position_ids: torch.Tensor  # [1, T] long, restart at 0 per sequence
    cu_seqlens: torch.Tensor  # [S + 1] int32
    response_positions: torch.Tensor  # [R] long, stream positions predicting a response token
    targets: torch.Tensor  # [R] long, the response tokens
    old_logprob: torch.Tensor  # [R] fp32 (filled by the trainer before the update)
    rollout_logprob: torch.Tensor  # [R] fp32, from the engine
    advantages: torch.Tensor  # [R] fp32, each token carries its sequence's advantage
    mask: torch.Tensor  # [R] bool
    seq_ids: torch.Tensor  # [R] long, sequence index inside this micro-batch
    token_index: torch.Tensor  # [R] long, global token id for the NSR random stream
    anchor_positions: torch.Tensor  # [A] long, stream positions of Hidden-Align anchors
    anchor_groups: torch.Tensor  # [A] long, global group index of each anchor
    num_sequences: int
    samples: list[Sample]
    is_padding: bool = False  # a dummy micro-batch that keeps ranks in lockstep under ZeRO-3
    ref_logprob: Optional[torch.Tensor] = None  # [R] fp32 under the frozen reference (only when kl_coef > 0)

    def to(self, device: torch.device) -> "MicroBatch":
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device, non_blocking=True))
        return self


def plan_micro_batches(groups: list[Group], max_tokens: int) -> list[list[Sample]]:
    """First-fit in order: whole groups while they fit the token budget. A group larger than the budget is
    split by sample, its Hidden-Align samples (correct, with an anchor) first and, when they fit one
    micro-batch together, in the same one: Hidden-Align pairs form only within a micro-batch (the spec's
    "same forward, no extra pass"), so this keeps the group's pairs whole whenever possible. A single
    sequence longer than the budget gets a micro-batch of its own."""
    plans: list[list[Sample]] = []
    current: list[Sample] = []
    used = 0

    def flush():
        nonlocal current, used
        if current:
            plans.append(current)
        current, used = [], 0

    for group in groups:
        if group.num_tokens <= max_tokens:
            if used + group.num_tokens > max_tokens:
                flush()
            current.extend(group.samples)
            used += group.num_tokens
            continue
        anchored = [s for s in group.samples if s.correct and s.anchor is not None]
        others = [s for s in group.samples if not (s.correct and s.anchor is not None)]
        anchored_tokens = sum(s.length for s in anchored)
        if len(anchored) >= 2 and used + anchored_tokens > max_tokens >= anchored_tokens:
            flush()  # start the group in a fresh micro-batch so its anchored samples stay together
        for s in anchored + others:
            if used + s.length > max_tokens:
                flush()
            current.append(s)
            used += s.length
    flush()
    return plans


def build_micro_batch(samples: list[Sample], token_stride: int, with_anchors: bool) -> MicroBatch:
    """Pack `samples` into one stream. token_stride bounds the response length, so the NSR token id
    `(group, sample, t) -> (group * G + sample) * stride + t` is unique and independent of packing."""
    ids, pos, cu = [], [], [0]
    resp_pos, targets, rollout_lp, adv, seq_ids, tok_idx = [], [], [], [], [], []
    anchor_pos, anchor_groups = [], []
    for si, s in enumerate(samples):
        start = cu[-1]
        seq = s.prompt_ids + s.response_ids
        ids.extend(seq)
        pos.extend(range(len(seq)))
        cu.append(start + len(seq))
        p = len(s.prompt_ids)
        n = len(s.response_ids)
        # hidden state at stream position start+p-1+t predicts response token t
        resp_pos.extend(range(start + p - 1, start + p - 1 + n))
        targets.extend(s.response_ids)
        rollout_lp.extend(s.rollout_logprobs[:n])
        adv.extend([s.advantage] * n)
        seq_ids.extend([si] * n)
        global_seq = s.group_index * 100_000 + s.sample_index
        tok_idx.extend(global_seq * token_stride + t for t in range(n))
        if with_anchors and s.correct and s.anchor is not None:
            anchor_pos.append(start + p + s.anchor)
            anchor_groups.append(s.group_index)
    r = len(targets)
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        response_positions=torch.tensor(resp_pos, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        old_logprob=torch.zeros(r, dtype=torch.float32),
        rollout_logprob=torch.tensor(rollout_lp, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        mask=torch.ones(r, dtype=torch.bool),
        seq_ids=torch.tensor(seq_ids, dtype=torch.long),
        token_index=torch.tensor(tok_idx, dtype=torch.long),
        anchor_positions=torch.tensor(anchor_pos, dtype=torch.long),
        anchor_groups=torch.tensor(anchor_groups, dtype=torch.long),
        num_sequences=len(samples),
        samples=samples,
    )


def padding_micro_batch(pad_token_id: int) -> MicroBatch:
    """A two-token stream whose one (masked-out) response token gives an exact-zero loss that still reaches
    every parameter, so a rank with fewer micro-batches joins ZeRO-3's gradient collectives in lockstep."""
    pad = Sample(group_index=0, sample_index=0, prompt_ids=[pad_token_id], response_ids=[pad_token_id],
                 rollout_logprobs=[0.0])
    mb = build_micro_batch([pad], token_stride=1, with_anchors=False)
    mb.mask = torch.zeros_like(mb.mask)
    mb.samples = []
    mb.num_sequences = 0
    mb.is_padding = True
    return mb
