"""Value types the parser produces and the size-checked arithmetic it builds them with.

Scalars are plain sympy expressions. Containers are small frozen dataclasses so the comparator can tell a
tuple from an interval from a set (sympy's own Interval/FiniteSet would evaluate and merge eagerly).
``a \\pm b`` is built as ``a + PM*b`` with the private symbol :data:`PM`; the comparator expands it into
{a+b, a-b}. Every numeric power / product / tower goes through :func:`safe_pow` / :func:`safe_mul`, which
refuse results beyond MAX_RESULT_DIGITS digits *before* sympy computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy

from grpo_core.verify.limits import MAX_RESULT_DIGITS, MAX_SYMBOLIC_EXPONENT, ParseError, TooBig

PM = sympy.Dummy("pm")
"""Private sign symbol standing for the +/- of ``\\pm``; model text cannot produce it."""


@dataclass(frozen=True)
class Bracketed:
    """``(a, b)``, ``[a, b)``, ``(a, b, c)``: a tuple or an interval, decided by the comparator."""

    items: tuple
    left: str
    right: str


@dataclass(frozen=True)
class SetOf:
    """``\\{a, b\\}``: an unordered set."""

    items: tuple


@dataclass(frozen=True)
class AnswerList:
    """A bare comma-separated list ``a, b, c`` (compared as an unordered set)."""

    items: tuple


@dataclass(frozen=True)
class SolutionGroups:
    """``a=3,b=1; a=5,b=1``: ``;``-separated solutions (an unordered set of what each group states)."""

    groups: tuple


@dataclass(frozen=True)
class Labelled:
    """``x = 3, y = 1`` / ``b_2 = 7, b_{10} = 31``: values stated for distinct names, in the written order."""

    names: tuple
    values: tuple


@dataclass(frozen=True)
class UnionOf:
    """``A \\cup B \\cup ...``."""

    items: tuple


@dataclass(frozen=True)
class Relation:
    """A relation chain ``t0 op0 t1 op1 t2 ...`` with ops in {'=', '<', '<=', '>', '>=', '!=', 'in'}."""

    terms: tuple
    ops: tuple


@dataclass(frozen=True)
class MatrixOf:
    """A matrix / vector environment: rows of entries."""

    rows: tuple


def _digits(x: sympy.Rational) -> float:
    """log10 of the size of the numerator/denominator of a rational."""
    return max(math.log10(abs(int(x.p)) + 1), math.log10(abs(int(x.q)) + 1))


MAX_TOWER = 3
"""Deepest allowed nesting of non-constant exponentials (x^{x^{x}} ok, e^{e^{e^{e^x}}} refused): each level
makes numeric evaluation at a random point doubly-exponentially larger."""


def _tower_height(expr) -> int:
    if not isinstance(expr, sympy.Basic) or expr.is_Atom:
        return 0
    if isinstance(expr, sympy.Pow) and not expr.exp.is_Number:
        return 1 + _tower_height(expr.exp)
    if isinstance(expr, sympy.exp):
        return 1 + _tower_height(expr.args[0])
    return max((_tower_height(a) for a in expr.args), default=0)


def check_tower(value):
    if not value.is_number and _tower_height(value) > MAX_TOWER:
        raise TooBig("exponential tower too deep")
    return value


def safe_pow(base, exp):
    """base**exp, refusing results with more than MAX_RESULT_DIGITS digits, 0**negative, and towers of
    more than MAX_TOWER non-constant exponentials."""
    return check_tower(_safe_pow(base, exp))


def _safe_pow(base, exp):
    if exp.is_Number and base.is_Number:
        if base.is_Rational and exp.is_Rational:
            if base == 0 and exp < 0:
                raise ParseError("0 to a negative power")
            if abs(int(exp.p)) > 10 * MAX_RESULT_DIGITS or abs(int(exp.p)) * _digits(base) > MAX_RESULT_DIGITS:
                raise TooBig("power result too large")
        elif abs(float(exp)) > 10 * MAX_RESULT_DIGITS:
            raise TooBig("power exponent too large")
        return sympy.Pow(base, exp)
    if exp.is_Integer and abs(int(exp)) > MAX_SYMBOLIC_EXPONENT:
        raise TooBig("symbolic power exponent too large")
    if exp.is_Number and abs(float(exp)) > MAX_SYMBOLIC_EXPONENT:
        raise TooBig("symbolic power exponent too large")
    if base.is_Number and not exp.is_Number:
        # e.g. 10^{10^x}: keep unevaluated; numeric checks evaluate it in floating point.
        return sympy.Pow(base, exp, evaluate=False)
    return sympy.Pow(base, exp)


def safe_mul(a, b):
    if a.is_Rational and b.is_Rational and _digits(a) + _digits(b) > MAX_RESULT_DIGITS:
        raise TooBig("product too large")
    return sympy.Mul(a, b)
