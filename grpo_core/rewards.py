"""Reward shaping (docs/algorithms.md §2): correctness, optional format reward, DAPO overlong shaping, and
TTRL majority-vote pseudo-labels for unlabeled prompts.

The verifier (grpo_core.verify) is not imported here: callers pass its results (correct flags,
extracted answers) in, so this module stays cheap to import and easy to test.
"""
from __future__ import annotations

import ast
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch


@dataclass
class RewardSettings:
    """How the scalar reward of a response is built (docs/algorithms.md §2).

    reward = (correct_value if correct else incorrect_value)
             + (format_value if an answer could be extracted else 0)
             + overlong_penalty(length)            (only when overlong_enabled)
    """

    correct_value: float = 1.0  # reward of a verified-correct response
    incorrect_value: float = 0.0  # reward of any other response (e.g. -1.0)
    format_value: float = 0.0  # added when the response has a parsable final answer; 0 = off
    overlong_enabled: bool = False  # DAPO soft overlong punishment
    overlong_max_len: int = 256  # L_max in tokens (the rollout's max_new_tokens)
    overlong_cache_len: int = 64  # L_cache in tokens: the penalty ramps from 0 to -1 over the last L_cache

    def __post_init__(self):
        if self.overlong_enabled:
            _check_overlong_args(self.overlong_max_len, self.overlong_cache_len, prefix="RewardSettings.")

    @classmethod
    def from_config(cls, reward_config: Any, max_new_tokens: int) -> "RewardSettings":
        """Build from grpo_core.config.RewardConfig; L_max is the rollout's max_new_tokens."""
        return cls(
            correct_value=reward_config.correct,
            incorrect_value=reward_config.incorrect,
            format_value=reward_config.format_reward,
            overlong_enabled=reward_config.overlong_shaping,
            overlong_max_len=max_new_tokens,
            overlong_cache_len=reward_config.overlong_cache_len,
        )


def _check_overlong_args(max_len: int, cache_len: int, prefix: str = "") -> None:
    if max_len <= 0:
        raise ValueError(f"{prefix}overlong_max_len must be positive, got {max_len}")
    if not 0 < cache_len < max_len:
        raise ValueError(f"{prefix}overlong_cache_len must be in (0, max_len={max_len}), got {cache_len}")


def _as_bool_tensor(values: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"expected a 1-D tensor of flags, got shape {tuple(values.shape)}")
        return values.to(torch.bool)
    return torch.tensor([bool(v) for v in values], dtype=torch.bool)


def correctness_reward(correct: bool, correct_value: float = 1.0, incorrect_value: float = 0.0) -> float:
    """Reward of one response from the verifier's verdict."""
    return float(correct_value if correct else incorrect_value)


def correctness_rewards(
    correct: Sequence[bool] | torch.Tensor, correct_value: float = 1.0, incorrect_value: float = 0.0
) -> torch.Tensor:
    """Vectorised correctness_reward: flags [N] (list or bool tensor) -> float32 [N] (on the flags' device)."""
    flags = _as_bool_tensor(correct)
    return torch.where(flags, torch.tensor(float(correct_value)), torch.tensor(float(incorrect_value))).to(
        torch.float32
    )


def overlong_penalty(lengths: Sequence[int] | torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment per response.

    lengths: int [N] response lengths in tokens. Returns float32 [N]:
      0                                  if L <= L_max - L_cache
      ((L_max - L_cache) - L) / L_cache  if L_max - L_cache < L <= L_max   (falls linearly to -1)
      -1                                 if L > L_max
    """
    _check_overlong_args(max_len, cache_len)
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be integer token counts, got dtype {lengths.dtype}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("lengths must be >= 0")
    threshold = max_len - cache_len
    lengths_f = lengths.to(torch.float64)  # exact for any realistic length, then one rounding to float32
    ramp = (threshold - lengths_f) / cache_len
    penalty = torch.where(lengths <= threshold, torch.zeros_like(lengths_f), ramp)
    penalty = torch.where(lengths > max_len, torch.full_like(lengths_f, -1.0), penalty)
    return penalty.to(torch.float32)


def format_reward(extracted_answer: str | None, value: float = 0.0) -> float:
    """`value` when the response had a parsable final answer (extracted_answer is not None), else 0."""
    return float(value) if extracted_answer is not None else 0.0


def format_rewards(extracted_answers: Sequence[str | None], value: float = 0.0) -> torch.Tensor:
    """Vectorised format_reward: float32 [N]."""
    return torch.tensor([format_reward(a, value) for a in extracted_answers], dtype=torch.float32)


def _group_members(group_ids: Sequence[Hashable], n: int) -> dict[Hashable, list[int]]:
    if len(group_ids) != n:
        raise ValueError(f"got {n} answers but {len(group_ids)} group ids")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for index, group in enumerate(group_ids):
        members[group].append(index)
    return members


def _group_majority(answers: list[str | None]) -> tuple[str | None, int]:
    """Most common non-None answer (ties: the one seen first) and its count; (None, 0) if all None."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    # Counter keeps first-insertion order, so the first answer reaching `best` is the earliest seen.
    label = next(a for a, c in counts.items() if c == best)
    return label, best


def majority_vote_labels(
    canonical_answers: Sequence[str | None], group_ids: Sequence[Hashable]
) -> list[str | None]:
    """TTRL pseudo-gold: for each response, the most common canonical answer of its group.

    canonical_answers: per response, the verifier's canonical answer or None (no answer extracted).
    group_ids: per response, the id of its prompt's group (responses of a group need not be adjacent).
    Ties go to the answer that occurs first in the group; None never wins; an all-None group gets None.
    """
    labels: list[str | None] = [None] * len(canonical_answers)
    for members in _group_members(group_ids, len(canonical_answers)).values():
        label, _ = _group_majority([canonical_answers[i] for i in members])
        for i in members:
            labels[i] = label
    return labels


def majority_fraction(canonical_answers: Sequence[str | None], group_ids: Sequence[Hashable]) -> list[float]:
    """For each response, the share of its group that agrees with the group's majority answer
    (denominator: the whole group, None answers included; 0.0 for an all-None group)."""
    fractions = [0.0] * len(canonical_answers)
    for members in _group_members(group_ids, len(canonical_answers)).values():
        _, count = _group_majority([canonical_answers[i] for i in members])
        for i in members:
            fractions[i] = count / len(members)
    return fractions


def compute_reward_components(
    correct: Sequence[bool] | torch.Tensor,
    extracted_answers: Sequence[str | None],
    lengths: Sequence[int] | torch.Tensor,
    settings: RewardSettings,
) -> dict[str, torch.Tensor]:
    """The reward terms for N responses, each float32 [N] on CPU: correctness, format, overlong, total."""
    n = len(correct)
    if len(extracted_answers) != n or len(lengths) != n:
        raise ValueError(f"need one entry per response: {n} correct flags, "
                         f"{len(extracted_answers)} extracted answers, {len(lengths)} lengths")
    correctness = correctness_rewards(correct, settings.correct_value, settings.incorrect_value).cpu()
    fmt = format_rewards(extracted_answers, settings.format_value)
    if settings.overlong_enabled:
        lengths_cpu = lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths
        overlong = overlong_penalty(lengths_cpu, settings.overlong_max_len, settings.overlong_cache_len)
    else:
        overlong = torch.zeros(n, dtype=torch.float32)
    return {"correctness": correctness, "format": fmt, "overlong": overlong, "total": correctness + fmt + overlong}


def compute_rewards(
    correct: Sequence[bool] | torch.Tensor,
    extracted_answers: Sequence[str | None],
    lengths: Sequence[int] | torch.Tensor,
    settings: RewardSettings,
) -> torch.Tensor:
    """Scalar reward per response, float32 [N] on CPU (see RewardSettings for the sum)."""
    return compute_reward_components(correct, extracted_answers, lengths, settings)["total"]


# ----------------------------------------------------------------------------------------------- code reward

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(response: str) -> str:
    """The program in a response: the last fenced ```python block (an unterminated last block runs to the end),
    else the last untagged ``` block, else the whole response."""
    blocks = _FENCE.findall(response)
    for wanted in (lambda tag: tag.lower() in _PYTHON_TAGS, lambda tag: tag == ""):
        picked = [body for tag, body in blocks if wanted(tag)]
        if picked:
            return picked[-1]
    return response


def parse_code_tests(tests: str) -> tuple[str, Any]:
    """("io", [(stdin, expected_stdout), ...]) for a JSON list of {"input", "output"} pairs, else
    ("asserts", source) for Python statements. Raises ValueError naming what is wrong."""
    if not isinstance(tests, str) or not tests.strip():
        raise ValueError("code tests must be a non-empty string (Python asserts or a JSON list of "
                         "{\"input\", \"output\"} pairs)")
    text = tests.strip()
    if text.startswith("["):
        try:
            cases = json.loads(text)
        except json.JSONDecodeError:
            cases = None
        if isinstance(cases, list):
            if not cases or not all(isinstance(c, dict) and isinstance(c.get("input"), str)
                                    and isinstance(c.get("output"), str) for c in cases):
                raise ValueError("code tests as JSON must be a non-empty list of {\"input\": str, \"output\": str}")
            return "io", [(c["input"], c["output"]) for c in cases]
    try:
        ast.parse(tests)
    except SyntaxError as exc:
        raise ValueError(f"code tests are neither a JSON list of {{input, output}} pairs nor valid Python "
                         f"({exc.msg}, line {exc.lineno})") from None
    return "asserts", tests


def _same_output(got: str, want: str) -> bool:
    """Outputs match up to trailing whitespace on each line and trailing blank lines."""
    norm = lambda s: "\n".join(line.rstrip() for line in s.replace("\r\n", "\n").rstrip().split("\n"))  # noqa: E731
    return norm(got) == norm(want)


def code_reward(response: str, tests: str, timeout_s: float = 5.0) -> float:
    """Fraction of `tests` the program in `response` passes, run in the sandbox (grpo_core.sandbox).

    The program is the last fenced ```python block of the response (or the whole response if none).
    `tests` holds Python statements (each top-level `assert` is one test; with none, the whole block is one
    test) run after the program by a judge process that reaches the program's module-level names as proxies
    and compares built-in values itself (grpo_core.sandbox; a program that defines nothing scores 0), or a JSON list of {"input", "output"} pairs, each run as a
    fresh process reading `input` on stdin whose stdout must equal `output`. `timeout_s` bounds the whole call
    (all cases together); a timeout, a crash of the program's top level, or no code scores 0.0.
    """
    import time

    from grpo_core.sandbox import SandboxLimits, run_python

    if not timeout_s > 0:
        raise ValueError(f"code_reward timeout_s must be > 0, got {timeout_s}")
    kind, parsed = parse_code_tests(tests)
    code = extract_code(response) if isinstance(response, str) else ""
    if not code.strip():
        return 0.0
    if kind == "asserts":
        result = run_python(code, tests=parsed, limits=SandboxLimits(timeout_s=timeout_s))
        if result.timed_out or result.verdict is None:
            return 0.0
        status, passed, total = result.verdict.split()
        return 0.0 if status != "done" else int(passed) / int(total)
    deadline = time.monotonic() + timeout_s
    passed = 0
    for stdin, expected in parsed:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return 0.0
        result = run_python(code, stdin=stdin, limits=SandboxLimits(timeout_s=remaining))
        if result.timed_out:
            return 0.0
        passed += result.returncode == 0 and not result.stdout_truncated and _same_output(result.stdout, expected)
    return passed / len(parsed)
