"""Synthetic tasks: determinism, sympy-checked gold answers, worked solutions, splits and the data CLI."""
import argparse
import re

import pytest
import sympy as sp
from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

from grpo_core.data import PromptDataset, read_records
from grpo_core.data.cli import add_data_subcommands, run_data_command
from grpo_core.tasks import TASKS, make_synthetic, make_train_test

X = sp.Symbol("x")
_TRANSFORMS = standard_transformations + (implicit_multiplication_application,)
_FRAC = re.compile(r"^Compute \\frac\{(\d+)\}\{(\d+)\}(\+|-|\\times)\\frac\{(\d+)\}\{(\d+)\}\.$")


def _gold_by_sympy(row):
    """Recompute the exact answer from the prompt text alone."""
    prompt = row["prompt"]
    if row["data_source"].startswith("arith"):
        expression = re.fullmatch(r"What is (.+)\?", prompt).group(1)
        return sp.sympify(expression)
    if row["data_source"] == "linear_eq":
        lhs, rhs = re.fullmatch(r"Solve for x: (.+)=(.+)\.", prompt).groups()
        (value,) = sp.solve(sp.Eq(parse_expr(lhs, transformations=_TRANSFORMS, local_dict={"x": X}),
                                  parse_expr(rhs, transformations=_TRANSFORMS, local_dict={"x": X})), X)
        return value
    a, b, op, c, d = _FRAC.fullmatch(prompt).groups()
    left, right = sp.Rational(int(a), int(b)), sp.Rational(int(c), int(d))
    return {"+": left + right, "-": left - right, "\\times": left * right}[op]


def _all_rows():
    rows = []
    for kind, task in TASKS.items():
        if task.scorer != "math":  # the code kind has tests, not answers (tests/test_code_task.py)
            continue
        for level in task.levels:
            rows += make_synthetic(kind, 150, seed=level, level=level)
    return rows


ROWS = _all_rows()


@pytest.fixture(scope="module")
def sympy_golds():
    """Exact answers recomputed by sympy from the prompts, once for the module."""
    return [_gold_by_sympy(row) for row in ROWS]


def test_gold_answers_match_sympy(sympy_golds):
    for row, value in zip(ROWS, sympy_golds):
        assert sp.latex(value) == row["answer"], row
        assert set(row) == {"prompt", "answer", "data_source", "solution"}


def test_solutions_end_in_boxed_answer_and_their_last_step_is_right(sympy_golds):
    for row, value in zip(ROWS, sympy_golds):
        solution, answer = row["solution"], row["answer"]
        assert solution.endswith(f". \\boxed{{{answer}}}"), row
        assert solution.count("\\boxed{") == 1
        worked = solution[: -len(f". \\boxed{{{answer}}}")]
        if row["data_source"] == "arith_l2":  # digit-wise: "7+5=12, 2+4+1=7" -> tens sum, then last ones digit
            ones, tens = (int(step.rsplit("=", 1)[1]) for step in worked.split(", "))
            assert tens * 10 + ones % 10 == value, row
            continue
        last = worked.rsplit("=", 1)[1]  # the worked computation's final value, slash form
        assert sp.Rational(last) == value, row


def test_rows_are_short_for_the_char_level_demo():
    assert max(len(r["prompt"]) for r in ROWS) <= 40
    assert max(len(r["solution"]) for r in ROWS) <= 44  # \boxed{ is one token: <= 38 tokens
    assert all(r["prompt"].isascii() and r["solution"].isascii() for r in ROWS)


def test_data_sources_and_levels():
    sources = {r["data_source"] for r in ROWS}
    assert sources == {"arith_l1", "arith_l2", "arith_l3", "arith_l4", "arith_l5", "linear_eq",
                       "frac_add", "frac_sub", "frac_mul"}
    # level None mixes every level of the kind.
    mixed = make_synthetic("arith", 200, seed=0)
    assert {r["data_source"] for r in mixed} == {f"arith_l{k}" for k in range(1, 6)}
    fractions = [r for r in make_synthetic("linear_eq", 100, seed=0, level=2) if "frac" in r["answer"]]
    assert len(fractions) > 30  # level 2 really exercises fraction answers
    with pytest.raises(ValueError, match="levels"):
        make_synthetic("linear_eq", 5, seed=0, level=4)
    with pytest.raises(ValueError, match="unknown synthetic task kind 'geometry'"):
        make_synthetic("geometry", 5, seed=0)


def test_generation_is_deterministic():
    for kind in TASKS:
        assert make_synthetic(kind, 50, seed=7) == make_synthetic(kind, 50, seed=7)
        assert make_synthetic(kind, 50, seed=7) != make_synthetic(kind, 50, seed=8)
    assert make_synthetic("frac", 20, seed=1, level=1) != make_synthetic("frac", 20, seed=1, level=2)


def test_unique_exclude_and_small_spaces():
    rows = make_synthetic("arith", 90, seed=0, level=1, unique=True)
    assert len({r["prompt"] for r in rows}) == 90
    excluded = {r["prompt"] for r in rows}
    rest = make_synthetic("arith", 10, seed=0, level=1, unique=True, exclude=excluded)
    assert excluded.isdisjoint(r["prompt"] for r in rest)
    with pytest.raises(ValueError, match="problem space is too small"):
        make_synthetic("arith", 101, seed=0, level=1, unique=True)  # only 10 x 10 prompts exist


def test_train_test_split_disjoint_and_balanced():
    train, test = make_train_test(["arith", "linear_eq", "frac"], n_train=301, n_test=30, seed=3)
    assert len(train) == 301 and len(test) == 30
    test_prompts = [r["prompt"] for r in test]
    assert len(set(test_prompts)) == 30
    assert set(test_prompts).isdisjoint(r["prompt"] for r in train)
    kinds = [r["data_source"].split("_")[0] for r in train]
    assert (kinds.count("arith"), kinds.count("linear"), kinds.count("frac")) == (101, 100, 100)
    assert kinds[:30] != sorted(kinds[:30])  # interleaved, not blocks per kind
    assert (train, test) == make_train_test(["arith", "linear_eq", "frac"], n_train=301, n_test=30, seed=3)
    with pytest.raises(ValueError, match="repeat"):
        make_train_test(["arith", "arith"], 10, 2, seed=0)


def _parser():
    parser = argparse.ArgumentParser(prog="grpo")
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data")
    add_data_subcommands(data.add_subparsers(dest="data_command", required=True))
    return parser


class _CharTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    def encode(self, text):
        return [ord(c) for c in text]


def test_cli_make_synthetic_writes_readable_parquet(tmp_path, capsys):
    out = tmp_path / "synth"
    args = _parser().parse_args(["data", "make-synthetic", "--out", str(out), "--kinds", "arith,linear_eq,frac",
                                 "--n-train", "120", "--n-test", "24", "--seed", "0"])
    assert run_data_command(args) == 0
    assert "train.parquet: 120 rows" in capsys.readouterr().out
    train = PromptDataset(out / "train.parquet", _CharTokenizer(), max_prompt_tokens=40)
    test = PromptDataset(out / "test.parquet", _CharTokenizer(), max_prompt_tokens=40)
    assert (len(train), len(test), train.num_dropped_too_long) == (120, 24, 0)
    assert set(train.formats.values()) == {"plain"} and train.has_labels
    assert {s.messages[0]["content"] for s in train.samples}.isdisjoint(s.messages[0]["content"] for s in test.samples)
    rows, _ = read_records(out / "train.parquet")
    assert rows == make_train_test(["arith", "linear_eq", "frac"], 120, 24, seed=0)[0]

    args = _parser().parse_args(["data", "validate", str(out / "train.parquet"), str(out / "test.parquet")])
    assert run_data_command(args) == 0
    assert "plain format, 24 rows, 24 labeled" in capsys.readouterr().out


def test_cli_reports_bad_requests(tmp_path, capsys):
    args = _parser().parse_args(["data", "make-synthetic", "--out", str(tmp_path), "--kinds", "arith,frac",
                                 "--level", "5", "--n-train", "10", "--n-test", "2"])
    assert run_data_command(args) == 1
    assert "task 'frac' has levels" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing half-written
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": 3}\n')
    assert run_data_command(_parser().parse_args(["data", "validate", str(bad)])) == 1
    assert "bad.jsonl row 0: field 'answer' must be a string, got int" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_data_command(_parser().parse_args(["data", "validate", str(empty)])) == 1
    assert "empty.jsonl: 0 rows" in capsys.readouterr().err


def test_solutions_pass_the_project_verifier():
    verify_mod = pytest.importorskip("grpo_core.verify")
    if not hasattr(verify_mod, "verify"):
        pytest.skip("grpo_core.verify.verify not available")
    rows = ROWS[::3]
    assert all(verify_mod.verify(r["solution"], r["answer"]) for r in rows)
    # A wrong final answer must not pass: the warm-start data can't teach the reward to be fooled.
    assert not any(verify_mod.verify(f"\\boxed{{{r['answer']}+1}}", r["answer"]) for r in rows)
