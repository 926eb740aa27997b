"""sympy-made algebra problems with LaTeX gold answers (sympy's `latex()` of the exact answer).

linear_eq (data_source "linear_eq"):
  level 1: ax+b=c, integer solution            "Solve for x: 3x+5=17."      -> "4"
  level 2: ax+b=c, often a fraction            "Solve for x: 6x+4=7."       -> "\\frac{1}{2}"
  level 3: ax+b=cx+d, x on both sides          "Solve for x: 5x+3=2x-9."    -> "-4"
frac (data_source "frac_add" / "frac_sub" / "frac_mul"):
  level 1: sum of two proper fractions         "Compute \\frac{1}{2}+\\frac{1}{3}."  -> "\\frac{5}{6}"
  level 2: sum or difference
  level 3: product

Worked solutions use the slash form (3/6+2/6=5/6) to stay short (at most 44 characters), then "\\boxed{<LaTeX answer>}".
"""
from __future__ import annotations

import math
import random

import sympy as sp

LINEAR_LEVELS = (1, 2, 3)
FRAC_LEVELS = (1, 2, 3)

_X = sp.Symbol("x")


def _linear_term(coefficient: int) -> str:
    """`3x`, `x`, `-x`, `-3x`."""
    if coefficient == 1:
        return "x"
    if coefficient == -1:
        return "-x"
    return f"{coefficient}x"


def _signed(value: int) -> str:
    """`+5` / `-5` for a constant after a term."""
    return f"+{value}" if value >= 0 else str(value)


def _slash(numerator: int, denominator: int) -> str:
    return str(numerator) if denominator == 1 else f"{numerator}/{denominator}"


def _nonzero(rng: random.Random, low: int, high: int) -> int:
    while True:
        value = rng.randint(low, high)
        if value != 0:
            return value


def make_linear_eq_row(rng: random.Random, level: int) -> dict[str, str]:
    """One linear equation row {prompt, answer, data_source, solution}; the answer is solved by sympy."""
    # The equation is a x + b = c x + d (c = 0 below level 3).
    if level == 1:
        a, x, c = rng.randint(2, 9), rng.randint(-10, 10), 0
        b = _nonzero(rng, -20, 20)
        d = a * x + b
    elif level == 2:
        a, b, c, d = rng.randint(2, 12), _nonzero(rng, -20, 20), 0, rng.randint(-30, 30)
    elif level == 3:
        a, c = rng.randint(-9, 9), rng.randint(-9, 9)
        while a == c or a == 0 or c == 0:
            a, c = rng.randint(-9, 9), rng.randint(-9, 9)
        b, d = _nonzero(rng, -20, 20), _nonzero(rng, -20, 20)
    else:
        raise ValueError(f"linear_eq level must be one of {LINEAR_LEVELS}, got {level}")
    lhs = f"{_linear_term(a)}{_signed(b)}"
    rhs = str(d) if c == 0 else f"{_linear_term(c)}{_signed(d)}"
    (value,) = sp.solve(sp.Eq(a * _X + b, c * _X + d), _X)
    k, free = a - c, d - b  # k x = free, the worked step
    answer = sp.latex(value)
    step = f"{_linear_term(k)}={free}"
    # Straight to the reduced value: the unreduced quotient would push solutions past ~40 characters.
    worked = "" if k == 1 else f"x={_slash(value.p, value.q)}"
    steps = step if not worked else f"{step}, {worked}"
    return {
        "prompt": f"Solve for x: {lhs}={rhs}.",
        "answer": answer,
        "data_source": "linear_eq",
        "solution": f"{steps}. \\boxed{{{answer}}}",
    }


def _proper_fraction(rng: random.Random) -> tuple[int, int]:
    denominator = rng.randint(2, 9)
    return rng.randint(1, denominator - 1), denominator


def make_frac_row(rng: random.Random, level: int) -> dict[str, str]:
    """One fraction-arithmetic row {prompt, answer, data_source, solution}; the answer is sympy's."""
    if level not in FRAC_LEVELS:
        raise ValueError(f"frac level must be one of {FRAC_LEVELS}, got {level}")
    (a, b), (c, d) = _proper_fraction(rng), _proper_fraction(rng)
    op = {1: "+", 2: rng.choice("+-"), 3: "*"}[level]
    left, right = sp.Rational(a, b), sp.Rational(c, d)
    if op == "+":
        value, name, latex_op = left + right, "add", "+"
    elif op == "-":
        value, name, latex_op = left - right, "sub", "-"
    else:
        value, name, latex_op = left * right, "mul", "\\times"
    answer = sp.latex(value)

    # One worked step, then the reduced value (an unreduced middle step would make solutions too long).
    if op == "*":
        worked = f"{a}*{c}/({b}*{d})={_slash(value.p, value.q)}"
    else:
        common = math.lcm(b, d)
        worked = f"{a * (common // b)}/{common}{op}{c * (common // d)}/{common}={_slash(value.p, value.q)}"
    return {
        "prompt": f"Compute \\frac{{{a}}}{{{b}}}{latex_op}\\frac{{{c}}}{{{d}}}.",
        "answer": answer,
        "data_source": f"frac_{name}",
        "solution": f"{worked}. \\boxed{{{answer}}}",
    }
