"""Tiny code tasks: write a one-line Python function from a spec in words, checked by unit tests in the sandbox.

Levels (data_source "pyfunc_l<level>"):
  1: one operation      "Write f(x) = x times 4."        -> def f(x): return x*4
  2: two operations     "Write f(x) = x times 3 plus 2."  -> def f(x): return x*3+2   (left to right)

The gold ("answer") holds the tests: three `assert f(x) == value` lines on fixed inputs, so a function that is
right on some inputs earns partial credit (grpo_core.rewards.code_reward returns the fraction passed). The
solution (supervised warm start) is the fenced program; prompts and solutions stay short for the char-level
tiny model.
"""
from __future__ import annotations

import random

LEVELS = (1, 2)
_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_INPUTS = (-2, 1, 5)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_pyfunc_row(rng: random.Random, level: int) -> dict[str, str]:
    """One code row {prompt, answer (tests), data_source, solution} at the given level (1-2)."""
    steps = [(rng.choice("+-*"), rng.randint(2, 9)) for _ in range(level)]
    words = " ".join(f"{_WORDS[op]} {n}" for op, n in steps)
    expression = "x"
    for i, (op, n) in enumerate(steps):
        # Left to right, as the words read: bracket the running expression before a product.
        expression = f"({expression}){op}{n}" if op == "*" and i > 0 else f"{expression}{op}{n}"
    tests = []
    for x in _INPUTS:
        value = x
        for op, n in steps:
            value = _apply(value, op, n)
        tests.append(f"assert f({x}) == {value}")
    return {
        "prompt": f"Write f(x) = x {words}.",
        "answer": "\n".join(tests) + "\n",
        "data_source": f"pyfunc_l{level}",
        "solution": f"```python\ndef f(x): return {expression}\n```",
    }
