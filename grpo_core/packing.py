"""Varlen packing: (prompt, response) token sequences -> one flat stream [1, T] with `cu_seqlens`, positions
restarting per sequence, and the stream positions whose hidden state predicts each response token.

One packer for every forward over packed sequences: the trainer's micro-batches (`build_micro_batch`, with the
per-response-token tensors the loss needs), the supervised warm start and the EAS pass of `grpo eval`
(`pack_sequences`). The planners decide which sequences share a stream under a token budget: `plan_sequences`
(in order, greedy) and `plan_micro_batches` (whole GRPO groups, Hidden-Align samples kept together).

Global ids (docs/algorithms.md §3, NSR randomness): response j of the group with index g in a step's batch is
global sequence `g * group_size + j`, and its token t is global token `seq * max_response_len + t`. Both are
unique and independent of how the batch is split into micro-batches and ranks, so the NSR draws are too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from grpo_core.experience import Group, Response


@dataclass
class PackedSequences:
    """A flat stream of whole sequences. R = number of response tokens, S = number of sequences."""

    input_ids: torch.Tensor  # [1, T] long, the sequences one after another
    position_ids: torch.Tensor  # [1, T] long, restart at 0 per sequence
    cu_seqlens: torch.Tensor  # [S + 1] int32, sequence starts in the stream
    response_positions: torch.Tensor  # [R] long, stream positions whose hidden state predicts a response token
    targets: torch.Tensor  # [R] long, the response tokens
    response_cu: torch.Tensor  # [S + 1] long, sequence starts among the R response tokens
    seq_ids: torch.Tensor  # [R] long, index (0..S-1) of each response token's sequence in this stream

    def to(self, device) -> "PackedSequences":
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device, non_blocking=True))
        return self


def pack_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   device: Optional[torch.device] = None) -> PackedSequences:
    """Pack prompt i + response i, in order, into one stream (built on the host, then moved once).

    The hidden state at stream position start_i + len(prompt_i) - 1 + t predicts response token t, so every
    prompt must hold at least one token."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every packed sequence needs a prompt of at least one token")
    total = sum(lengths)
    # Vectorised: one host list -> one tensor, then index arithmetic (no per-sequence tensor ops).
    flat: list[int] = []
    for p, r in zip(prompts, responses):
        flat.extend(p)
        flat.extend(r)
    ids = torch.tensor(flat, dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    resp_lens = torch.tensor([len(r) for r in responses], dtype=torch.long)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    resp_cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    torch.cumsum(lens, 0, out=cu[1:])
    torch.cumsum(resp_lens, 0, out=resp_cu[1:])
    n_resp = int(resp_cu[-1])
    pos = torch.arange(total) - torch.repeat_interleave(cu[:-1], lens, output_size=total)
    # Response token t of sequence i sits at stream position cu[i] + len(prompt_i) + t and is predicted from the
    # position before it.
    offsets = torch.arange(n_resp) - torch.repeat_interleave(resp_cu[:-1], resp_lens, output_size=n_resp)
    resp_pos = torch.repeat_interleave(cu[:-1] + prompt_lens - 1, resp_lens, output_size=n_resp) + offsets
    targets = ids[resp_pos + 1]
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), resp_lens, output_size=n_resp)
    packed = PackedSequences(input_ids=ids.unsqueeze(0), position_ids=pos.unsqueeze(0),
                             cu_seqlens=cu.to(torch.int32), response_positions=resp_pos, targets=targets,
                             response_cu=resp_cu, seq_ids=seq_ids)
    return packed.to(device) if device is not None else packed


def plan_sequences(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy packing of sequence indices, in order, into streams of at most max_tokens tokens (a longer
    sequence gets a stream of its own)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    plans: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            plans.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        plans.append(current)
    return plans


# ------------------------------------------------------------------------------------------ training micro-batches
@dataclass
class MicroBatch(PackedSequences):
    """A training micro-batch: a packed stream plus the per-response-token tensors of the loss ([R])."""

    old_logprob: Optional[torch.Tensor] = None  # [R] fp32 (filled by the trainer before the update)
    rollout_logprob: Optional[torch.Tensor] = None  # [R] fp32, from the rollout engine
    advantages: Optional[torch.Tensor] = None  # [R] fp32, each token carries its sequence's advantage
    mask: Optional[torch.Tensor] = None  # [R] bool
    token_index: Optional[torch.Tensor] = None  # [R] long, global token id (NSR random stream)
    seq_index: Optional[torch.Tensor] = None  # [S] long, global sequence id (GSPO's NSR stream)
    anchor_positions: Optional[torch.Tensor] = None  # [A] long, stream positions of Hidden-Align anchors
    anchor_groups: Optional[torch.Tensor] = None  # [A] long, group index of each anchor
    ref_logprob: Optional[torch.Tensor] = None  # [R] fp32 under the frozen reference (only when kl_coef > 0)
    responses: Optional[list[Response]] = None
    is_padding: bool = False  # a dummy micro-batch that keeps ranks in lockstep under ZeRO-3

    @property
    def num_sequences(self) -> int:
        return len(self.responses or [])


def global_sequence_id(group_index: int, sample_index: int, group_size: int) -> int:
    """Global id of response `sample_index` of group `group_index` (see the module docstring)."""
    if not 0 <= sample_index < group_size:
        raise ValueError(f"sample_index {sample_index} outside a group of {group_size} responses")
    return group_index * group_size + sample_index


def build_micro_batch(responses: list[Response], group_size: int, max_response_len: int,
                      with_anchors: bool) -> MicroBatch:
    """Pack `responses` into one micro-batch. group_size and max_response_len (the rollout's max_new_tokens)
    bound the indices, so the global token id `global_sequence_id * max_response_len + t` is unique."""
    if any(len(r.response_ids) > max_response_len for r in responses):
        raise ValueError(f"a response is longer than max_response_len={max_response_len}")
    packed = pack_sequences([r.prompt_ids for r in responses], [r.response_ids for r in responses])
    lengths = packed.response_cu[1:] - packed.response_cu[:-1]
    n = packed.targets.numel()
    seq_index = torch.tensor([global_sequence_id(r.group_index, r.sample_index, group_size) for r in responses],
                             dtype=torch.long)
    offsets = torch.arange(n, dtype=torch.long) - torch.repeat_interleave(packed.response_cu[:-1], lengths,
                                                                          output_size=n)
    rollout_lp = torch.tensor([lp for r in responses for lp in r.rollout_logprobs[:len(r.response_ids)]],
                              dtype=torch.float32)
    if rollout_lp.numel() != n:
        raise ValueError("every response needs one rollout logprob per token")
    anchored = [(i, r) for i, r in enumerate(responses) if with_anchors and r.correct and r.anchor is not None]
    starts = packed.cu_seqlens.long()
    return MicroBatch(
        **vars(packed),
        old_logprob=torch.zeros(n, dtype=torch.float32),
        rollout_logprob=rollout_lp,
        advantages=torch.repeat_interleave(torch.tensor([r.advantage for r in responses], dtype=torch.float32),
                                           lengths, output_size=n),
        mask=torch.ones(n, dtype=torch.bool),
        token_index=torch.repeat_interleave(seq_index, lengths, output_size=n) * max_response_len + offsets,
        seq_index=seq_index,
        anchor_positions=torch.tensor([int(starts[i]) + len(r.prompt_ids) + r.anchor for i, r in anchored],
                                      dtype=torch.long),
        anchor_groups=torch.tensor([r.group_index for _, r in anchored], dtype=torch.long),
        responses=responses,
    )


def padding_micro_batch(pad_token_id: int) -> MicroBatch:
    """A two-token stream whose one (masked-out) response token gives an exact-zero loss that still reaches
    every parameter, so a rank with fewer micro-batches joins ZeRO-3's gradient collectives in lockstep."""
    pad = Response(group_index=0, sample_index=0, prompt_ids=[pad_token_id], response_ids=[pad_token_id],
                   rollout_logprobs=[0.0])
    mb = build_micro_batch([pad], group_size=1, max_response_len=1, with_anchors=False)
    mb.mask = torch.zeros_like(mb.mask)
    mb.responses = []
    mb.is_padding = True
    return mb


def plan_micro_batches(groups: list[Group], max_tokens: int) -> list[list[Response]]:
    """First-fit in order: whole groups while they fit the token budget. A group larger than the budget is
    split by response, its Hidden-Align responses (correct, with an anchor) first and, when they fit one
    micro-batch together, in the same one: Hidden-Align pairs form only within a micro-batch (docs/algorithms.md's
    "same forward, no extra pass"), so this keeps the group's pairs whole whenever possible. A single
    sequence longer than the budget gets a micro-batch of its own."""
    plans: list[list[Response]] = []
    current: list[Response] = []
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
