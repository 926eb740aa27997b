"""Integer arithmetic problems with difficulty levels, for tests and the CPU demo.

Levels (data_source "arith_l<level>"):
  1: single-digit a+b                  "What is 3+5?"
  2: two-digit a+b, worked digit by digit (ones first, with the carry)   "What is 27+45?"
  3: two-digit times one-digit         "What is 23*7?"
  4: three operands, mixed + - *       "What is 12+7*3?"   (usual precedence)
  5: three operands with parentheses   "What is (12+7)*3?"

Prompts stay under 25 characters and solutions under 45, so a tiny char-level model can learn them.
Every solution is a short worked computation ending in "\\boxed{<answer>}".
"""
from __future__ import annotations

import random

LEVELS = (1, 2, 3, 4, 5)


def _row(expression: str, value: int, steps: str, level: int) -> dict[str, str]:
    answer = str(value)
    return {
        "prompt": f"What is {expression}?",
        "answer": answer,
        "data_source": f"arith_l{level}",
        "solution": f"{steps}. \\boxed{{{answer}}}",
    }


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    return a * b


def _level1(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return _row(f"{a}+{b}", a + b, f"{a}+{b}={a + b}", 1)


def _level2(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ones = a % 10 + b % 10
    carry = ones // 10
    tens = a // 10 + b // 10 + carry
    # "7+5=12, 2+4+1=7": every step is a one-digit fact a small model can learn; the answer is the tens
    # sum followed by the last digit of the ones sum.
    steps = f"{a % 10}+{b % 10}={ones}, {a // 10}+{b // 10}+{carry}={tens}"
    return _row(f"{a}+{b}", a + b, steps, 2)


def _level3(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    tens, ones = a - a % 10, a % 10
    if ones == 0:
        steps = f"{a}*{b}={a * b}"
    else:  # split the two-digit factor: the worked form a small model can imitate
        steps = f"{tens}*{b}+{ones}*{b}={tens * b}+{ones * b}={a * b}"
    return _row(f"{a}*{b}", a * b, steps, 3)


def _level4(rng: random.Random) -> dict[str, str]:
    a, b, c = rng.randint(2, 50), rng.randint(2, 20), rng.randint(2, 9)
    op1, op2 = rng.choice("+-*"), rng.choice("+-*")
    if op2 == "*" and op1 != "*":
        inner = b * c  # multiplication first
        value = _apply(a, op1, inner)
        steps = f"{b}*{c}={inner}, {a}{op1}{inner}={value}"
    else:
        inner = _apply(a, op1, b)
        value = _apply(inner, op2, c)
        steps = f"{a}{op1}{b}={inner}, {inner}{op2}{c}={value}"
    return _row(f"{a}{op1}{b}{op2}{c}", value, steps, 4)


def _level5(rng: random.Random) -> dict[str, str]:
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
    op = rng.choice("+-")
    inner = _apply(a, op, b)
    value = inner * c
    if rng.random() < 0.5:
        expression = f"({a}{op}{b})*{c}"
    else:
        expression = f"{c}*({a}{op}{b})"
    inner_text = f"({inner})" if inner < 0 else str(inner)
    steps = f"{a}{op}{b}={inner}, {inner_text}*{c}={value}"
    return _row(expression, value, steps, 5)


_BY_LEVEL = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}


def make_arith_row(rng: random.Random, level: int) -> dict[str, str]:
    """One arithmetic row {prompt, answer, data_source, solution} at the given level (1-5)."""
    return _BY_LEVEL[level](rng)
