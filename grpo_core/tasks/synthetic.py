"""Registry of synthetic verifiable tasks and deterministic dataset generation.

Rows are in the plain format: {"prompt", "answer", "data_source", "solution"}; for the math kinds the solution
is a short worked answer ending in "\\boxed{<answer>}" (supervised warm start) and the answer is the gold for
the verifier; for the code kind (pyfunc) the solution is a fenced program and the answer holds its tests.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from grpo_core.tasks.algebra import FRAC_LEVELS, LINEAR_LEVELS, make_frac_row, make_linear_eq_row
from grpo_core.tasks.arithmetic import LEVELS as ARITH_LEVELS
from grpo_core.tasks.arithmetic import make_arith_row
from grpo_core.tasks.pyfunc import LEVELS as PYFUNC_LEVELS
from grpo_core.tasks.pyfunc import make_pyfunc_row

Row = dict[str, str]


@dataclass(frozen=True)
class TaskKind:
    """A synthetic task: a row maker `make(rng, level) -> row`, the levels it knows, and the scorer its gold is
    for (reward.default / reward.by_source: "math" answers, "code" tests)."""

    name: str
    make: Callable[[random.Random, int], Row]
    levels: tuple[int, ...]
    scorer: str = "math"


TASKS: dict[str, TaskKind] = {
    "arith": TaskKind("arith", make_arith_row, ARITH_LEVELS),
    "linear_eq": TaskKind("linear_eq", make_linear_eq_row, LINEAR_LEVELS),
    "frac": TaskKind("frac", make_frac_row, FRAC_LEVELS),
    "pyfunc": TaskKind("pyfunc", make_pyfunc_row, PYFUNC_LEVELS, scorer="code"),
}


def _task(kind: str, level: int | None) -> TaskKind:
    if kind not in TASKS:
        raise ValueError(f"unknown synthetic task kind {kind!r}; known kinds: {', '.join(TASKS)}")
    task = TASKS[kind]
    if level is not None and level not in task.levels:
        raise ValueError(f"task {kind!r} has levels {task.levels}, got level={level}")
    return task


def make_synthetic(
    kind: str,
    n: int,
    seed: int,
    level: int | None = None,
    *,
    unique: bool = False,
    exclude: Iterable[str] = (),
) -> list[Row]:
    """Generate n rows of one task kind; the same arguments always give the same rows.

    Args:
        kind: "arith", "linear_eq", "frac" or "pyfunc" (see TASKS).
        n: number of rows (>= 0).
        seed: generation seed.
        level: difficulty level of the kind, or None to draw a level uniformly per row.
        unique: no two rows share a prompt.
        exclude: prompts that must not appear (e.g. the test split, when making the train split).
    Raises ValueError when the task has too few distinct prompts to meet `unique` / `exclude`.
    """
    task = _task(kind, level)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"grpo_core.tasks:{kind}:{level}:{seed}")
    excluded = set(exclude)
    seen: set[str] = set()
    rows: list[Row] = []
    # Small problem spaces (arith level 1 has 100 prompts) can run out of fresh prompts: bound the search.
    max_attempts = 50 * n + 1000
    attempts = 0
    from grpo_core.progress import progress_bar

    bar = progress_bar(n, f"synthetic {kind}", unit="row", delay=2.0)  # draws only if this takes > 2 s
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"task {kind!r} (level {level}) gave only {len(rows)} of {n} rows with fresh prompts after "
                f"{max_attempts} draws: its problem space is too small; lower n or pick a harder level"
            )
        row = task.make(rng, level if level is not None else rng.choice(task.levels))
        prompt = row["prompt"]
        if prompt in excluded or (unique and prompt in seen):
            continue
        seen.add(prompt)
        rows.append(row)
        bar.update(1)
    bar.close()
    return rows


def _split_counts(n: int, parts: int) -> list[int]:
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def make_train_test(
    kinds: Sequence[str],
    n_train: int,
    n_test: int,
    seed: int,
    level: int | None = None,
) -> tuple[list[Row], list[Row]]:
    """Train and test splits over several task kinds, with disjoint prompts.

    The counts are split evenly over the kinds (the first kinds take the remainder). The test split is
    drawn first with unique prompts; the train split then excludes every test prompt. Each split is
    shuffled deterministically so the kinds are interleaved.
    """
    if not kinds:
        raise ValueError("need at least one task kind")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"task kinds repeat: {list(kinds)}")
    for kind in kinds:
        _task(kind, level)
    train: list[Row] = []
    test: list[Row] = []
    for kind, k_train, k_test in zip(kinds, _split_counts(n_train, len(kinds)), _split_counts(n_test, len(kinds))):
        kind_test = make_synthetic(kind, k_test, seed=2 * seed + 1, level=level, unique=True)
        test.extend(kind_test)
        train.extend(make_synthetic(kind, k_train, seed=2 * seed, level=level,
                                    exclude={row["prompt"] for row in kind_test}))
    random.Random(f"grpo_core.tasks.shuffle:train:{seed}").shuffle(train)
    random.Random(f"grpo_core.tasks.shuffle:test:{seed}").shuffle(test)
    return train, test
