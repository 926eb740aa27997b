"""The verifier against tests/verifier_corpus/cases.jsonl: hand-written cases, by class, of the forms real
model outputs take (answers in prose or bare math delimiters, several boxes, relations, labelled golds,
matrices, number formats, long literals and deep nesting, the rounding rule; long decimals against exact values,
labelled parts, ordered tuples, answers followed by text, angle units, markup edge cases, intervals and absolute
values), each class both ways:
must-match and must-not-match. The must-not-match cases are the reward-hacking guard: none may pass."""

import collections
import os
import time

import pytest

from benchmarks.bench_verifier import load_cases
from grpo_core.verify import judge

CORPUS = os.path.join(os.path.dirname(__file__), "verifier_corpus", "cases.jsonl")
ROWS = load_cases(CORPUS)  # the benchmark's reader: one format, one expander


def _id(i, row):
    return f"{row['class']}-{i}-{'match' if row['expected'] else 'nomatch'}"


@pytest.mark.parametrize("row", ROWS, ids=[_id(i, r) for i, r in enumerate(ROWS)])
def test_corpus_case(row):
    t0 = time.perf_counter()
    result = judge(row["response"], row["gold"])
    elapsed = time.perf_counter() - t0
    assert result.correct is row["expected"], (row.get("note"), result)
    assert elapsed < 2.0, elapsed


def test_corpus_size_and_classes_both_ways():
    assert len(ROWS) >= 400
    by_class = collections.Counter((r["class"], r["expected"]) for r in ROWS)
    classes = {c for c, _ in by_class}
    expected = {
        "final_sentence", "delimiters", "multi_answer", "inequality", "equation", "matrix",
        "number_format", "precision", "expression", "long_nesting", "long_decimal", "labelled_parts",
        "trailing_text", "angle_units", "markup_edge", "interval_abs",
        "ordered_tuple",
    }
    assert expected <= classes, expected - classes
    for cls in classes:
        assert by_class[(cls, True)] >= 5 and by_class[(cls, False)] >= 5, (cls, by_class)
