"""Rollout experience: the G responses to each prompt of a step (a GRPO group) with their rewards,
verdicts and advantages. grpo_core.packing turns them into token-budgeted micro-batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Response:
    """One response of one prompt (a member of a GRPO group); data.schema's Sample is the prompt."""

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
    samples: list[Response] = field(default_factory=list)

    @property
    def informative(self) -> bool:
        rewards = [s.reward for s in self.samples]
        return len(rewards) > 1 and max(rewards) != min(rewards)

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.samples)
