"""PromptDataset: load verl/plain rows from parquet or JSONL files, render and tokenize the prompts.

Rendering goes either through the tokenizer's chat template
(`tokenizer.apply_chat_template(messages, add_generation_prompt=True) -> str`) or through a format string
such as "Question: {prompt}\\nAnswer:"; the rendered text is tokenized with `tokenizer.encode(str)`.
Prompts longer than `max_prompt_tokens` are dropped, counted and logged.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from grpo_core.data.io import DataError, read_records
from grpo_core.data.schema import Sample, rows_to_samples

logger = logging.getLogger(__name__)

PROMPT_PLACEHOLDER = "{prompt}"


def render_prompt(messages: list[dict[str, str]], tokenizer: Any, prompt_template: str | None = None) -> str:
    """Turn a chat into the prompt text the policy continues.

    With `prompt_template`, the chat must hold exactly one user message (optionally after one system
    message, which is then put in front of the template text); its content replaces "{prompt}".
    The template is filled with str.replace, not str.format, so LaTeX braces in it stay literal.
    Without a template, the tokenizer's chat template renders the whole chat.
    """
    if not prompt_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    roles = [m["role"] for m in messages]
    if roles == ["user"]:
        return prompt_template.replace(PROMPT_PLACEHOLDER, messages[0]["content"])
    if roles == ["system", "user"]:
        return messages[0]["content"] + "\n" + prompt_template.replace(PROMPT_PLACEHOLDER, messages[1]["content"])
    raise DataError(
        f"prompt_template needs a single user message (optionally after a system message), got roles {roles}; "
        "use the tokenizer's chat template (prompt_template=None) for multi-turn prompts"
    )


def _uid_prefixes(paths: Sequence[Path]) -> list[str]:
    """File stems, widened with the parent folder's name where two files share a stem."""
    counts = Counter(p.stem for p in paths)
    prefixes = [p.stem if counts[p.stem] == 1 else f"{p.parent.name}/{p.stem}" for p in paths]
    if len(set(prefixes)) != len(prefixes):
        raise DataError(f"data files give clashing sample ids {prefixes}; rename the files so their stems differ")
    return prefixes


class PromptDataset:
    """Validated, rendered and tokenized prompts from one or more files.

    Args:
        files: parquet / JSONL paths (a single path is accepted too). Formats are detected per file.
        tokenizer: object with apply_chat_template(messages, add_generation_prompt=True) -> str and
            encode(str) -> list[int].
        prompt_template: format string with "{prompt}", or None / "" to use the tokenizer's chat template.
        max_prompt_tokens: rows whose rendered prompt has more tokens are dropped (None: keep all).
        allow_unlabeled: accept rows without a gold answer (TTRL); their `answer` is None.

    Attributes: `samples` (list[Sample]), `num_dropped_too_long`, `formats` ({path: "verl"|"plain"}).
    """

    def __init__(
        self,
        files: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Any,
        *,
        prompt_template: str | None = None,
        max_prompt_tokens: int | None = 1024,
        allow_unlabeled: bool = False,
    ):
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        paths = [Path(f) for f in files]
        prompt_template = prompt_template or None  # DataConfig uses "" for "the chat template"
        if not paths:
            raise DataError("PromptDataset needs at least one data file")
        if prompt_template is not None and PROMPT_PLACEHOLDER not in prompt_template:
            raise DataError(f"prompt_template must contain {PROMPT_PLACEHOLDER!r}, got {prompt_template!r}")
        if max_prompt_tokens is not None and max_prompt_tokens <= 0:
            raise DataError(f"max_prompt_tokens must be positive or None, got {max_prompt_tokens}")
        self.tokenizer = tokenizer
        self.prompt_template = prompt_template
        self.max_prompt_tokens = max_prompt_tokens
        self.allow_unlabeled = allow_unlabeled
        self.formats: dict[str, str] = {}
        self.samples: list[Sample] = []
        self.num_dropped_too_long = 0

        for path, prefix in zip(paths, _uid_prefixes(paths)):
            rows, columns = read_records(path)
            fmt, samples = rows_to_samples(rows, columns, path, uid_prefix=prefix, allow_unlabeled=allow_unlabeled)
            self.formats[str(path)] = fmt
            kept, dropped = self._render(samples, path)
            self.samples.extend(kept)
            self.num_dropped_too_long += dropped
            logger.info("%s: %d rows (%s format), %d dropped as longer than %s prompt tokens",
                        path, len(samples), fmt, dropped, max_prompt_tokens)
        if self.num_dropped_too_long:
            logger.warning("dropped %d of %d prompts longer than max_prompt_tokens=%d",
                           self.num_dropped_too_long, self.num_dropped_too_long + len(self.samples),
                           max_prompt_tokens)
        if not self.samples:
            raise DataError(f"no usable rows in {[str(p) for p in paths]} "
                            f"({self.num_dropped_too_long} dropped as too long)")

    def _render(self, samples: list[Sample], path: Path) -> tuple[list[Sample], int]:
        kept, dropped = [], 0
        for sample in samples:
            try:
                text = render_prompt(sample.messages, self.tokenizer, self.prompt_template)
            except DataError as exc:
                raise DataError(f"{path} sample {sample.uid}: {exc}") from exc
            ids = list(self.tokenizer.encode(text))
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                dropped += 1
                continue
            sample.prompt_ids = ids
            kept.append(sample)
        return kept, dropped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def get_batch(self, indices: Sequence[int]) -> list[Sample]:
        """Samples at the given indices (e.g. from PromptSampler.next_batch)."""
        return [self.samples[i] for i in indices]

    @property
    def has_labels(self) -> bool:
        """True when every kept sample has a gold answer."""
        return all(s.answer is not None for s in self.samples)
