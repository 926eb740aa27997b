"""Row formats and their validation: the verl format and the plain format, detected per file.

verl:  prompt = [{"role": str, "content": str}, ...], reward_model = {"ground_truth": str, ...},
       data_source: str, extra_info: dict (optional).
plain: prompt: str, answer: str, data_source: str (optional), solution: str (optional), extra_info: dict (optional).
mapped: any other field names, set by data.prompt_key / data.answer_key (dotted paths into nested dicts).

A bad row raises one `DataError` naming file, row index and field, e.g.
"train.parquet row 17: field 'answer' must be a string, got int".
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from grpo_core.data.io import DataError

VERL = "verl"
PLAIN = "plain"
MAPPED = "mapped"  # fields read through data.prompt_key / data.answer_key


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
    ground_truth: Any = None  # the gold as stored in the row (a custom reward gets it unchanged); None = answer
    extra_info_present: bool = False  # the row had an extra_info field (else a custom reward gets None, as in verl)

    @property
    def gold(self) -> Any:
        """What a reward function receives as ground_truth: the row's raw gold, else the answer string."""
        return self.answer if self.ground_truth is None else self.ground_truth


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


def _messages(prompt: Any, ctx: _RowContext, label: str) -> list[dict[str, str]]:
    """A chat prompt checked to be a non-empty list of {role, content} string dicts."""
    if prompt is None:
        raise ctx.error(label, "is missing")
    if not isinstance(prompt, (list, tuple)):
        raise ctx.error(label, f"must be a list of {{role, content}} messages, got {_type_name(prompt)}")
    if not prompt:
        raise ctx.error(label, "is an empty message list")
    messages = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict):
            raise ctx.error(f"{label}[{i}]", f"must be a {{role, content}} dict, got {_type_name(message)}")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"must be a string, got {_type_name(value)}"
                raise ctx.error(f"{label}[{i}].{key}", problem)
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


_MISSING = object()


def _extra_info(row: dict[str, Any], ctx: _RowContext) -> dict[str, Any] | None:
    """The row's extra_info dict (a copy), or None when the row has none."""
    extra_info = row.get("extra_info")
    if extra_info is not None and not isinstance(extra_info, dict):
        raise ctx.error("extra_info", f"must be a dict, got {_type_name(extra_info)}")
    return None if extra_info is None else dict(extra_info)


def get_path(row: dict[str, Any], dotted: str) -> Any:
    """row["a"]["b"] for "a.b" (a key holding the whole dotted name wins); _MISSING when absent."""
    if dotted in row:
        return row[dotted]
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def parse_mapped_row(row: dict[str, Any], ctx: _RowContext, *, allow_unlabeled: bool, prompt_key: str,
                     answer_key: str):
    """A row read through data.prompt_key / data.answer_key (dotted paths). The prompt is a string (one user
    message) or a {role, content} list; the gold may be any JSON value (a string for the math scorer; numbers
    become strings; a custom reward gets the raw value). Other fields as in the verl/plain formats."""
    prompt = get_path(row, prompt_key)
    if prompt is _MISSING or prompt is None:
        raise ctx.error(prompt_key, "is missing (data.prompt_key)")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ctx.error(prompt_key, "is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _messages(prompt, ctx, prompt_key)
    gold = get_path(row, answer_key)
    if (gold is _MISSING or gold is None) and not allow_unlabeled:
        raise ctx.error(answer_key, "is missing (data.answer_key; rows without a gold answer need "
                                    "allow_unlabeled=True)")
    answer, raw = _read_gold(gold, ctx, answer_key)
    data_source = ctx.string(row, "data_source", optional=True)
    solution = ctx.string(row, "solution", optional=True)
    return messages, answer, data_source, solution, _extra_info(row, ctx), raw


def _read_gold(gold: Any, ctx: _RowContext, key: str) -> tuple[Optional[str], Any]:
    """(answer string for the verifier, raw value for a custom reward or None when it is that string) of a
    gold of any format: a string, number, list or dict (numbers become strings, others JSON)."""
    if gold is _MISSING or gold is None:
        return None, None
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float, list, dict)):
        raise ctx.error(key, f"must be a string, number, list or dict, got {_type_name(gold)}")
    answer = gold if isinstance(gold, str) else (str(gold) if isinstance(gold, (int, float))
                                                  else json.dumps(gold, ensure_ascii=False))
    if not answer.strip():
        raise ctx.error(key, "is empty")
    return answer, None if isinstance(gold, str) else gold


def parse_verl_row(row: dict[str, Any], ctx: _RowContext, *, allow_unlabeled: bool):
    """Validate one verl row; return (messages, answer, data_source, solution, extra_info, raw gold)."""
    messages = _messages(row.get("prompt"), ctx, "prompt")

    reward_model = row.get("reward_model")
    answer, raw = None, None
    if reward_model is None:
        if not allow_unlabeled:
            raise _gold_missing(ctx, "reward_model")
    elif not isinstance(reward_model, dict):
        raise ctx.error("reward_model", f"must be a dict with 'ground_truth', got {_type_name(reward_model)}")
    else:
        gold = reward_model.get("ground_truth")
        if gold is None and not allow_unlabeled:
            raise _gold_missing(ctx, "reward_model.ground_truth")
        answer, raw = _read_gold(gold, ctx, "reward_model.ground_truth")

    data_source = ctx.string(row, "data_source", optional=True)
    return messages, answer, data_source, None, _extra_info(row, ctx), raw


def parse_plain_row(row: dict[str, Any], ctx: _RowContext, *, allow_unlabeled: bool):
    """Validate one plain row; return (messages, answer, data_source, solution, extra_info, raw gold)."""
    prompt = ctx.string(row, "prompt")
    answer, raw = None, None  # the plain format's answer is a string (use data.answer_key for others)
    if row.get("answer") is None and allow_unlabeled:
        pass
    elif row.get("answer") is None:
        raise _gold_missing(ctx, "answer")
    else:
        answer = ctx.string(row, "answer")
    data_source = ctx.string(row, "data_source", optional=True)
    solution = ctx.string(row, "solution", optional=True)
    return [{"role": "user", "content": prompt}], answer, data_source, solution, _extra_info(row, ctx), raw


def _check_unicode(ctx: _RowContext, fields: list[tuple[str, Any]]) -> None:
    """Text must be encodable as UTF-8 (the tokenizer's input): a lone surrogate, which JSON and Python strings
    can carry, is refused here, naming the row and field, rather than crash the tokenizer mid-run."""
    for label, text in fields:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ctx.error(label, f"holds {text[e.start:e.end]!r} at character {e.start}, a lone surrogate "
                                       f"that is not valid Unicode text; fix or drop the row") from None


def rows_to_samples(
    rows: list[dict[str, Any]],
    columns: list[str],
    path: str | Path,
    *,
    uid_prefix: str,
    allow_unlabeled: bool = False,
    prompt_key: str = "prompt",
    answer_key: str = "",
    system_prompt: str = "",
) -> tuple[str, list[Sample]]:
    """Validate every row of one file and turn it into Samples (prompt_ids still empty).

    With the default keys (prompt_key "prompt", answer_key "") the format is detected (verl or plain);
    other keys read every row through parse_mapped_row (format "mapped"). A non-empty `system_prompt` is put
    before the user message of every row whose prompt is a plain string. Returns (format, samples).
    Raises DataError at the first bad row.
    """
    mapped = prompt_key != "prompt" or bool(answer_key)
    if mapped:
        fmt = MAPPED
        if not any(get_path(r, prompt_key) is not _MISSING for r in rows[:1]):
            raise DataError(f"{path}: no field '{prompt_key}' (data.prompt_key) in the first row; "
                            f"columns: {columns}")
        if not answer_key:  # verl's gold when the file has one, else "answer"
            answer_key = "reward_model.ground_truth" if "reward_model" in columns else "answer"
    else:
        fmt = detect_format(rows, columns, path)
    parse = parse_verl_row if fmt == VERL else parse_plain_row
    default_source = Path(path).stem
    samples = []
    for index, row in enumerate(rows):
        ctx = _RowContext(path, index)
        if mapped:
            messages, answer, data_source, solution, extra_info, raw = parse_mapped_row(
                row, ctx, allow_unlabeled=allow_unlabeled, prompt_key=prompt_key, answer_key=answer_key)
        else:
            messages, answer, data_source, solution, extra_info, raw = parse(row, ctx,
                                                                             allow_unlabeled=allow_unlabeled)
        _check_unicode(ctx, [(f"prompt[{i}].content" if not mapped else prompt_key, m.get("content"))
                             for i, m in enumerate(messages)]
                       + [("answer", answer), ("solution", solution), ("data_source", data_source)])
        from_string = fmt == PLAIN or (mapped and isinstance(get_path(row, prompt_key), str))
        if system_prompt and from_string:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        samples.append(
            Sample(
                uid=f"{uid_prefix}-{index}",
                messages=messages,
                answer=answer,
                data_source=data_source or default_source,
                solution=solution,
                extra_info=extra_info if extra_info is not None else {},
                extra_info_present=extra_info is not None,
                ground_truth=raw,
            )
        )
    return fmt, samples
