"""Row formats and their validation: the verl format and the plain format, detected per file.

verl:  prompt = [{"role": str, "content": str}, ...], reward_model = {"ground_truth": str, ...},
       data_source: str, extra_info: dict (optional).
plain: prompt: str, answer: str, data_source: str (optional), solution: str (optional).

A bad row raises one `DataError` naming file, row index and field, e.g.
"train.parquet row 17: field 'answer' must be a string, got int".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpo_core.data.io import DataError

VERL = "verl"
PLAIN = "plain"


@dataclass
class Sample:
    """One prompt with its gold answer.

    uid: stable id, "<file stem>-<row index>" (row index in the source file, before filtering).
    messages: the chat, a list of {"role", "content"} dicts.
    answer: gold final answer, None for unlabeled (TTRL) rows.
    data_source: task name, used to group metrics.
    solution: worked solution (supervised warm start), or None.
    prompt_ids: token ids of the rendered prompt; empty until rendered.
    extra_info: the verl `extra_info` dict (empty for plain rows).
    """

    uid: str
    messages: list[dict[str, str]]
    answer: str | None
    data_source: str
    solution: str | None = None
    prompt_ids: list[int] = field(default_factory=list)
    extra_info: dict[str, Any] = field(default_factory=dict)


def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def detect_format(rows: list[dict[str, Any]], columns: list[str], path: str | Path) -> str:
    """Return VERL or PLAIN for a file from its columns (and the first prompt's type)."""
    if "reward_model" in columns:
        return VERL
    if "answer" in columns:
        return PLAIN
    if "prompt" not in columns:
        raise DataError(
            f"{path}: cannot detect the row format: no 'prompt' column (columns: {columns}); expected "
            "verl (prompt, reward_model, data_source) or plain (prompt, answer)"
        )
    # Unlabeled files have neither reward_model nor answer: the prompt's type tells them apart.
    first = next((row.get("prompt") for row in rows if row.get("prompt") is not None), None)
    return VERL if isinstance(first, list) else PLAIN


class _RowContext:
    """Builds errors that name the file, the row and the field."""

    def __init__(self, path: str | Path, row_index: int):
        self.where = f"{path} row {row_index}"

    def error(self, field_name: str, problem: str) -> DataError:
        return DataError(f"{self.where}: field '{field_name}' {problem}")

    def string(self, row: dict[str, Any], field_name: str, *, optional: bool = False, label: str | None = None):
        """Return row[field_name] checked to be a non-empty string (or None when optional)."""
        label = label or field_name
        value = row.get(field_name)
        if value is None:
            if optional:
                return None
            raise self.error(label, "is missing")
        if not isinstance(value, str):
            raise self.error(label, f"must be a string, got {_type_name(value)}")
        if not value.strip():
            raise self.error(label, "is empty")
        return value


def _gold_missing(ctx: _RowContext, label: str) -> DataError:
    return ctx.error(label, "is missing (rows without a gold answer need allow_unlabeled=True)")


def parse_verl_row(row: dict[str, Any], ctx: _RowContext, *, allow_unlabeled: bool):
    """Validate one verl row; return (messages, answer, data_source, solution, extra_info)."""
    prompt = row.get("prompt")
    if prompt is None:
        raise ctx.error("prompt", "is missing")
    if not isinstance(prompt, (list, tuple)):
        raise ctx.error("prompt", f"must be a list of {{role, content}} messages, got {_type_name(prompt)}")
    if not prompt:
        raise ctx.error("prompt", "is an empty message list")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise ctx.error(f"prompt[{i}]", f"must be a {{role, content}} dict, got {_type_name(message)}")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"must be a string, got {_type_name(value)}"
                raise ctx.error(f"prompt[{i}].{key}", problem)
        messages.append({"role": message["role"], "content": message["content"]})

    reward_model = row.get("reward_model")
    answer = None
    if reward_model is None:
        if not allow_unlabeled:
            raise _gold_missing(ctx, "reward_model")
    elif not isinstance(reward_model, dict):
        raise ctx.error("reward_model", f"must be a dict with 'ground_truth', got {_type_name(reward_model)}")
    else:
        gold = reward_model.get("ground_truth")
        if gold is None and not allow_unlabeled:
            raise _gold_missing(ctx, "reward_model.ground_truth")
        if gold is not None:
            answer = ctx.string(reward_model, "ground_truth", label="reward_model.ground_truth")

    data_source = ctx.string(row, "data_source", optional=True)
    extra_info = row.get("extra_info")
    if extra_info is None:
        extra_info = {}
    elif not isinstance(extra_info, dict):
        raise ctx.error("extra_info", f"must be a dict, got {_type_name(extra_info)}")
    return messages, answer, data_source, None, dict(extra_info)


def parse_plain_row(row: dict[str, Any], ctx: _RowContext, *, allow_unlabeled: bool):
    """Validate one plain row; return (messages, answer, data_source, solution, extra_info)."""
    prompt = ctx.string(row, "prompt")
    if row.get("answer") is None and allow_unlabeled:
        answer = None
    elif row.get("answer") is None:
        raise _gold_missing(ctx, "answer")
    else:
        answer = ctx.string(row, "answer")
    data_source = ctx.string(row, "data_source", optional=True)
    solution = ctx.string(row, "solution", optional=True)
    return [{"role": "user", "content": prompt}], answer, data_source, solution, {}


def rows_to_samples(
    rows: list[dict[str, Any]],
    columns: list[str],
    path: str | Path,
    *,
    uid_prefix: str,
    allow_unlabeled: bool = False,
) -> tuple[str, list[Sample]]:
    """Validate every row of one file and turn it into Samples (prompt_ids still empty).

    Returns (format, samples). Raises DataError at the first bad row.
    """
    fmt = detect_format(rows, columns, path)
    parse = parse_verl_row if fmt == VERL else parse_plain_row
    default_source = Path(path).stem
    samples = []
    for index, row in enumerate(rows):
        ctx = _RowContext(path, index)
        messages, answer, data_source, solution, extra_info = parse(row, ctx, allow_unlabeled=allow_unlabeled)
        samples.append(
            Sample(
                uid=f"{uid_prefix}-{index}",
                messages=messages,
                answer=answer,
                data_source=data_source or default_source,
                solution=solution,
                extra_info=extra_info,
            )
        )
    return fmt, samples
