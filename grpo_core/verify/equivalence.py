"""Deciding whether two parsed answers are equal, and a canonical string for clustering.

Rules (the documented contract of :func:`grpo_core.verify.verify`):

* numbers: every literal is exact (``0.5`` is 1/2, ``2.50`` is 5/2, ``1.2e3`` is 1200). Two constant values
  are equal when they are exactly equal (rationals, including 10^5-digit integers and towers whose value
  has at most MAX_RESULT_DIGITS digits), or, for exact irrational forms (``\\sqrt2/2`` vs ``1/\\sqrt2``,
  ``\\log_2 8`` vs ``3``), when they agree to 40 significant digits;
* decimal rules. (1) Two decimals: a gold decimal with d >= 2 places (it is the rounded one) matches a
  response decimal with more than d places that rounds (half up or half down) to it: gold ``2.72`` accepts
  ``2.718`` and ``2.72``, refuses ``2.7`` and ``2.73``. A gold with 0 or 1 decimal places is taken as exact
  (``0.5`` is 1/2, so ``0.46`` is wrong). (2) A decimal against an exact value (integer written without a
  point, fraction, radical, constant; either side may be the gold): equal only when the decimal has at least
  MIN_EXACT_SIG_DIGITS (6) significant digits (leading zeros not counted, trailing zeros counted) and is the
  exact value rounded to the decimal's own number of places (a tie either way): ``0.142857`` is 1/7,
  ``2.7182818`` is e, ``0.1666666667`` is 1/6; ``0.1666666666`` (truncated), ``0.14``, ``2.72`` and
  ``3.1416`` (short roundings) are not. Both rules apply entry by entry inside tuples, intervals and
  matrices; a decimal inside an expression with symbols (``0.5x``) is exact. No relative tolerance is used
  on numbers;
* percent: ``50%`` equals ``50`` and ``0.5`` (the % is dropped, or the value divided by 100);
* angle units (api.py): when exactly one side carries a degree mark or unit (``45^\\circ``, ``45°``, ``45
  degrees``) and the other is a constant multiple of pi (or a list of such), the degree value times pi/180 is
  compared with it (``45^\\circ`` is ``\\frac{\\pi}{4}`` either way round); a bare number is never taken as
  degrees (``45`` is not ``\\frac{\\pi}{4}``, ``\\frac{\\pi}{4}`` is not a gold ``45``);
* ``\\pm``: ``1 \\pm \\sqrt2`` is the set {1+sqrt2, 1-sqrt2};
* expressions with symbols: equal if they agree at 6 seeded random rational points in [0.5, 2.5] --
  exactly when both sides evaluate to rationals there (so ``(x+2)^{500}`` differs from
  ``(x+2)^{500}+1``), else to relative 1e-8 -- falling back to ``simplify(a-b) == 0`` under the time guard
  when too few points evaluate;
* equations: an equation whose one side is a name states the other side's value (``x = 3``, ``|CD| = 2``,
  ``\\frac{PQ}{QR} = \\frac35``, ``S_1:S_2 = 5:9``, ``(a,b) = (4,1)``, ``f(3) = 10``, ``a+b = 11``: a name is a
  symbol, a product/ratio of symbols, ``|name|``, a tuple of names or ``f(...)``, and on the response side also a
  sum of names; a gold ``x + y = 1`` is a line, not the value 1); a chain ``x = 4+4+2 = 10`` states its last side;
  a chain of constants ``4+4+2 = 10`` states its last side; an ``\\approx`` ends the chain (``x = 1/3 \\approx
  0.33`` and ``1/3 \\approx 0.33`` state 1/3). ``a+3z = 0`` states nothing (not a name). Two equations are equal
  if their sides match or ``lhs-rhs`` are proportional;
* inequalities over one variable equal the interval / union they describe (``x>2`` == ``(2,\\infty)``,
  ``-x > -4`` == ``x < 4``: a linear inequality is solved first; ``-3 \\le y \\le 5`` == ``y \\in [-3, 5]``
  == ``[-3, 5]``: the variable may be named on one side only; ``|x - 1| > 2`` == ``(-\\infty, -1) \\cup
  (3, \\infty)`` and ``|2x+1| \\le 5`` == ``[-3, 2]``: an absolute value of a linear expression against a
  positive constant is solved); an infinite interval end is always open;
* unordered-set rule: a gold written as a set ``\\{..\\}``, with "and"/"or", as ``x = 1, x = 2`` (one unknown),
  as a ``;``-separated list of solutions, or as a list of tuples is a solution set and compares unordered; a gold
  comma list of numbers compares unordered only when it is sorted (ascending or descending), i.e. when its order
  carries no information; an unsorted gold list (``1, 5, -3``) is ordered and no answer permutes it, a set ``\\{5,
  1, -3\\}`` included. ``(x, y) = (4, 1)`` states values by name. ``a=3, b=1`` (distinct unknowns) states values
  by name: against another such list with the same names it compares name by name in any written order (``b_{10} =
  31, b_2 = 7`` is ``b_2 = 7, b_{10} = 31``; swapped values are not), with indexed names of one letter against a
  gold comma list or set it is that list of values (``x_1 = 2, x_2 = -4`` for the roots ``-4, 2``), else the tuple
  (3, 1). Labelled parts ``(a) 12, (b) 5`` (see api.py) match by label, or in label order against an unlabelled
  list; against one gold value the last part is the answer. Brackets ``(..)`` / ``[..]`` compare ordered with the
  same bracket shapes (a 1-row or 1-column matrix equals a tuple of its entries);
* matrices: any of pmatrix/bmatrix/matrix/array (``\\left[ .. \\right]``), scalar times matrix, sums and
  products of matrices are evaluated, then compared entry by entry under the number rules;
* letters: ``e`` is Euler's number and ``i`` the imaginary unit (``x_i`` stays a symbol); a prose answer
  ("yes", "Monday": a word of >= 3 letters, no function names) compares as case-insensitive text;
  ``nan`` never matches;
* multiple choice: a gold that is a single letter A-J matches ``B``, ``(B)``, ``( B )``, ``B)``, ``\\text{(B)}``,
  ``\\textbf{(B)}``, ``\\textbf{B.}``, ``(B) 42``; against a gold that is not a letter, an answer ``(B) 42``
  (option letter, then its value) answers 42.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import mpmath
import sympy

from grpo_core.verify.values import (
    PM,
    AnswerList,
    Bracketed,
    Labelled,
    MatrixOf,
    Relation,
    SetOf,
    SolutionGroups,
    UnionOf,
)
from grpo_core.verify.limits import Deadline
from grpo_core.verify.normalize import NormalizedAnswer

_CHOICE_RE = re.compile(r"\(?([A-J])\)?(?:[.:]?|[.:)]?\s.*)")
_RNG_POINTS = 6
_EXACT_DIGITS = 50
_REL_EXACT = mpmath.mpf(10) ** -40
_REL_SYMBOLIC = 1e-8
MIN_EXACT_SIG_DIGITS = 6
"""A decimal written to at least this many significant digits may equal an exact value (see the rounding rule)."""
MAX_EXACT_SIG_DIGITS = 1000
"""Longer decimals are not compared with irrational values (evaluation cost grows with the digits); against an
exact rational any length compares exactly."""


@dataclass(frozen=True)
class Side:
    """What the comparator knows about one side besides its parsed value."""

    norm: NormalizedAnswer | None = None
    places: dict = field(default_factory=dict)
    """|value| -> decimal places, for every decimal literal written on this side."""

    @property
    def percent(self) -> bool:
        return bool(self.norm and self.norm.percent)

    @property
    def joined(self) -> bool:
        return bool(self.norm and self.norm.joined_by_words)


_PLAIN = Side()


def _side(x) -> Side:
    if isinstance(x, Side):
        return x
    if isinstance(x, NormalizedAnswer):
        return Side(x, {})
    return _PLAIN


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter of a normalized answer, if it is one (``B``, ``(B)``, ``(B) 42``)."""
    m = _CHOICE_RE.fullmatch(re.sub(r"\(\s*([A-J])\s*\)", r"(\1)", text.strip()))
    return m.group(1) if m else None


# ---- scalars ------------------------------------------------------------------------------------------
def _numeric(value, digits: int = 30):
    """A finite complex mpmath number for a constant expression, or None if it does not evaluate to one."""
    try:
        v = sympy.N(value, digits)
        parts = []
        for part in v.as_real_imag():
            part = sympy.N(part, digits)
            if part.is_Float:
                parts.append(mpmath.mpf(part._mpf_))
            elif part.is_Rational:
                parts.append(mpmath.mpf(int(part.p)) / int(part.q))
            else:
                return None
        with mpmath.workdps(digits):
            c = mpmath.mpc(*parts)
    except (Deadline, KeyboardInterrupt):
        raise
    except Exception:
        return None
    return c if mpmath.isfinite(c) else None


def _close(x, y, rel) -> bool:
    return abs(x - y) <= rel * max(abs(x), abs(y)) or abs(x - y) <= rel * 1e-3


def _places(side: Side, value) -> int | None:
    if isinstance(value, sympy.Rational):
        return side.places.get(abs(value))
    return None


def scalar_equal(a, b, na=None, nb=None) -> bool:
    """Value equality of two sympy scalars under the exactness / rounding / percent rules."""
    sa, sb = _side(na), _side(nb)
    if a == b:
        return True
    candidates = [(a, b, sa, sb)]
    if sa.percent != sb.percent:  # the percent side's decimals keep their digits: 14.285714% is 0.14285714
        if sa.percent:
            candidates.append((a / 100, b, _percent_side(sa), sb))
        else:
            candidates.append((a, b / 100, sa, _percent_side(sb)))
    return any(_scalar_equal_once(x, y, sx, sy) for x, y, sx, sy in candidates)


def _percent_side(side: Side) -> Side:
    return Side(side.norm, {value / 100: places + 2 for value, places in side.places.items()})


def _scalar_equal_once(a, b, sa: Side, sb: Side) -> bool:
    if a == b:
        return True
    if a.has(sympy.nan) or b.has(sympy.nan):
        return False
    if a.has(sympy.oo, -sympy.oo, sympy.zoo) or b.has(sympy.oo, -sympy.oo, sympy.zoo):
        if a.is_infinite or b.is_infinite:
            return a == b
        try:
            return sympy.simplify(a - b) == 0
        except (Deadline, KeyboardInterrupt):
            raise
        except Exception:  # sympy cannot decide expressions mixing oo with symbols
            return False
    free = a.free_symbols | b.free_symbols
    if free:
        return _symbolic_equal(a, b, free)
    da, db = _places(sa, a), _places(sb, b)
    if a.is_Rational and b.is_Rational and da is not None and db is not None:
        return _rounding_match(a, b, da, db)
    if da is not None and db is None:
        return _long_decimal_match(a, da, b)
    if db is not None and da is None:
        return _long_decimal_match(b, db, a)
    if a.is_Rational and b.is_Rational:
        return False
    va, vb = _numeric(a, _EXACT_DIGITS), _numeric(b, _EXACT_DIGITS)
    if va is None or vb is None:
        return False
    with mpmath.workdps(_EXACT_DIGITS):
        return _close(va, vb, _REL_EXACT)


def _rounding_match(a, b, da: int | None, db: int | None) -> bool:
    """Response decimal ``a`` (da places) rounds to gold decimal ``b`` (db >= 2 places, db < da)."""
    if da is None or db is None or db < 2 or da <= db:
        return False
    scaled = a * 10**db
    lo, hi = sympy.floor(scaled), sympy.ceiling(scaled)
    target = b * 10**db
    if not target.is_Integer:
        return False
    if lo == hi:
        return lo == target
    frac = scaled - lo
    if frac == sympy.Rational(1, 2):  # a tie rounds either way
        return target in (lo, hi)
    return target == (hi if frac > sympy.Rational(1, 2) else lo)


def _long_decimal_match(decimal, places: int, exact) -> bool:
    """A decimal literal with ``places`` places written to >= MIN_EXACT_SIG_DIGITS significant digits equals a
    constant exact value when it is that value rounded to ``places`` places (a tie rounds either way):
    ``0.142857`` is 1/7, ``2.7182818`` is e; ``0.14`` (2 digits) and ``0.142858`` are not."""
    scaled = int(decimal * 10**places)  # the written digits as an integer
    if abs(scaled) < 10 ** (MIN_EXACT_SIG_DIGITS - 1):
        return False
    if exact.is_Rational:
        return abs(exact * 10**places - scaled) <= sympy.Rational(1, 2)
    if exact.free_symbols or not exact.is_number or abs(scaled) >= 10**MAX_EXACT_SIG_DIGITS:
        return False
    significant = len(str(abs(scaled)))
    digits = max(_EXACT_DIGITS, significant + abs(significant - places) + 20)  # |digits before the point| too
    value = _numeric(exact, digits)
    if value is None:
        return False
    with mpmath.workdps(digits):
        if abs(value.imag) > mpmath.mpf(10) ** (-places - 5):
            return False
        return abs(value.real * mpmath.mpf(10) ** places - scaled) < mpmath.mpf(1) / 2


def _symbolic_equal(a, b, free) -> bool:
    rng = random.Random(1234)
    symbols = sorted(free, key=lambda s: s.name)
    agree = 0
    for _ in range(_RNG_POINTS):
        point = {s: sympy.Rational(rng.randint(500, 2500), 1000) for s in symbols}
        xa, xb = a.xreplace(point), b.xreplace(point)  # xreplace: plain substitution, much cheaper than subs
        if xa.is_Rational and xb.is_Rational:  # exact: no tolerance can hide a +1 under (x+2)^500
            if xa != xb:
                return False
            agree += 1
            continue
        va, vb = _numeric(xa), _numeric(xb)
        if va is None or vb is None:
            continue
        if not _close(va, vb, _REL_SYMBOLIC):
            return False
        agree += 1
    if agree >= 3:
        return True
    try:
        return sympy.simplify(a - b) == 0
    except (Deadline, KeyboardInterrupt):
        raise
    except Exception:
        return False


# ---- structures ----------------------------------------------------------------------------------------
def _expand_pm(x):
    if isinstance(x, sympy.Basic) and PM in x.free_symbols:
        return SetOf((x.subs(PM, 1), x.subs(PM, -1)))
    return x


def _is_name(x, sums: bool = True) -> bool:
    """A symbol, a product / ratio of symbols, |name|, a sum of names (when ``sums``), a tuple of names, f(...)."""
    if isinstance(x, sympy.Symbol):
        return x != PM
    if isinstance(x, sympy.Mul):
        return all(
            isinstance(f, sympy.Symbol) or (isinstance(f, sympy.Pow) and isinstance(f.base, sympy.Symbol) and f.exp in (-1, 1))
            for f in x.args
        ) and PM not in x.free_symbols
    if isinstance(x, sympy.Abs):
        return _is_name(x.args[0])
    if isinstance(x, sympy.Add):
        return sums and all(_is_name(t) for t in x.args)
    if isinstance(x, Bracketed) and x.left == "(":
        return all(isinstance(t, sympy.Basic) and _is_name(t) for t in x.items)
    return False


def _is_constant(x) -> bool:
    return isinstance(x, sympy.Basic) and not x.free_symbols


def _eq_value(rel: Relation, gold: bool = False):
    """The value an answer equation states (see the module docstring), or None. A gold ``x + y = 1`` is an
    equation answer (a line), so sums of names label a value only on the response side."""
    terms, ops = list(rel.terms), list(rel.ops)
    if "~" in ops:  # x = 1/3 \approx 0.33: the exact part before the approximation
        k = ops.index("~")
        if k == 0:
            if len(terms) >= 2 and _is_name(terms[0]):
                terms, ops = [terms[0], terms[1]], ["="]
            elif _is_constant(terms[0]):  # \frac17 \approx 0.142857: the exact value is stated
                return terms[0]
            else:
                return None
        else:
            terms, ops = terms[: k + 1], ops[:k]
    if not ops or any(op != "=" for op in ops):
        return None
    first, last = terms[0], terms[-1]
    sums = not gold
    if _is_name(first, sums) and not _is_name(last, sums):
        return last
    if _is_name(last, sums) and not _is_name(first, sums):
        return first
    if all(_is_constant(t) for t in terms):
        return last
    if _is_name(first) and len(terms) > 2:
        return last
    return None


_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}


def _linear_in_one_symbol(expr):
    """``expr`` = k * sym + rest with k a nonzero real constant and rest constant: (sym, k, rest); else None."""
    if len(expr.free_symbols) != 1:
        return None
    (sym,) = expr.free_symbols
    try:
        k = sympy.diff(expr, sym)
        rest = sympy.expand(expr - k * sym)
    except (Deadline, KeyboardInterrupt):
        raise
    except Exception:
        return None
    if k.free_symbols or rest.free_symbols or not k.is_real or k == 0:
        return None
    return sym, k, rest


def _solve_linear(x: Relation):
    """``-x > -4`` -> ``x < 4``: a two-sided inequality linear in one symbol, solved; else None."""
    if len(x.terms) != 2 or x.ops[0] not in _FLIP or not all(isinstance(t, sympy.Basic) for t in x.terms):
        return None
    linear = _linear_in_one_symbol(x.terms[0] - x.terms[1])
    if linear is None:
        return None
    sym, k, rest = linear
    bound = -rest / k
    op = x.ops[0] if k > 0 else _FLIP[x.ops[0]]
    return Relation((sym, bound), (op,))


def _is_positive_constant(x) -> bool:
    return isinstance(x, sympy.Basic) and not x.free_symbols and bool(x.is_real) and bool(x.is_positive)


def _solve_abs(x: Relation):
    """``|k y + m| < c`` / ``|k y + m| \\ge c`` (c > 0, one symbol, linear inside) as the interval or the union of
    two rays it describes (``|x - 1| > 2`` is (-oo, -1) U (3, oo)); ``a <= |k y + m| <= b`` (0 < a < b) as the
    two intervals between; None for any other relation."""
    if not all(isinstance(t, sympy.Basic) for t in x.terms) or not all(op in _FLIP for op in x.ops):
        return None
    if len(x.terms) == 3 and isinstance(x.terms[1], sympy.Abs):  # 1 <= |z| <= 3/2: the ring between
        terms, ops = list(x.terms), list(x.ops)
        if ops[0] in (">", ">="):
            terms, ops = terms[::-1], [_FLIP[o] for o in ops[::-1]]
        if any(o not in ("<", "<=") for o in ops) or not _is_positive_constant(terms[0]):
            return None
        outer = _solve_abs(Relation((terms[1], terms[2]), (ops[1],)))
        inner = _solve_abs(Relation((terms[1], terms[0]), (_FLIP[ops[0]],)))
        if outer is None or inner is None:
            return None
        (lo, hi, lo_open, hi_open), ((_, left_end, _, left_open), (right_end, _, right_open, _)) = outer[0], inner
        return ((lo, left_end, lo_open, left_open), (right_end, hi, right_open, hi_open))
    if len(x.terms) != 2:
        return None
    (left, right), op = x.terms, x.ops[0]
    if isinstance(right, sympy.Abs) and not isinstance(left, sympy.Abs):
        left, right, op = right, left, _FLIP[op]
    if not isinstance(left, sympy.Abs) or not _is_positive_constant(right):
        return None
    linear = _linear_in_one_symbol(left.args[0])
    if linear is None:
        return None
    _, k, rest = linear
    ends = sorted(((-right - rest) / k, (right - rest) / k), key=lambda v: float(v))
    strict = op in ("<", ">")
    if op in ("<", "<="):
        return ((ends[0], ends[1], strict, strict),)
    return ((-sympy.oo, ends[0], True, strict), (ends[1], sympy.oo, strict, True))


def as_intervals(x):
    """x as a tuple of (lo, hi, lo_open, hi_open) intervals, or None if it is not interval-like."""
    if isinstance(x, Bracketed) and len(x.items) == 2 and all(isinstance(i, sympy.Basic) for i in x.items):
        if x.left not in "([" or x.right not in ")]":
            return None
        lo, hi = x.items
        return ((lo, hi, x.left == "(" or lo == -sympy.oo, x.right == ")" or hi == sympy.oo),)
    if isinstance(x, Relation):
        if x.ops == ("in",) and _is_name(x.terms[0]):
            return as_intervals(x.terms[1])
        if any(isinstance(t, sympy.Abs) for t in x.terms):
            solved = _solve_abs(x)
            if solved is not None:
                return solved
        names = [t for t in x.terms if _is_name(t)]
        if len(names) != 1 or any(op in ("=", "in", "~") for op in x.ops):
            if any(op in ("=", "in", "~", "!=") for op in x.ops):
                return None
            solved = _solve_linear(x)
            return as_intervals(solved) if solved is not None else _solve_abs(x)
        if x.ops == ("!=",):
            v = x.terms[1] if _is_name(x.terms[0]) else x.terms[0]
            return ((-sympy.oo, v, True, True), (v, sympy.oo, True, True))
        terms, ops = list(x.terms), list(x.ops)
        if ops[0] in (">", ">="):  # write the chain left-to-right increasing
            terms, ops = terms[::-1], [_FLIP[o] for o in ops[::-1]]
        if any(o not in ("<", "<=") for o in ops):
            return None
        if len(terms) == 2:
            if _is_name(terms[0]):
                return ((-sympy.oo, terms[1], True, ops[0] == "<"),)
            return ((terms[0], sympy.oo, ops[0] == "<", True),)
        if len(terms) == 3 and _is_name(terms[1]):
            return ((terms[0], terms[2], ops[0] == "<", ops[1] == "<"),)
        return None
    if isinstance(x, (UnionOf, AnswerList)):
        parts = []
        for item in x.items:
            sub = as_intervals(item)
            if sub is None:
                return None
            parts.extend(sub)
        return tuple(parts)
    return None


def _interval_sets_equal(p, q, sa=_PLAIN, sb=_PLAIN) -> bool:
    if len(p) != len(q):
        return False
    used = [False] * len(q)
    for lo, hi, lo_open, hi_open in p:
        for j, (lo2, hi2, lo_open2, hi_open2) in enumerate(q):
            if (
                not used[j]
                and lo_open == lo_open2
                and hi_open == hi_open2
                and _entry_equal(lo, lo2, sa, sb)
                and _entry_equal(hi, hi2, sa, sb)
            ):
                used[j] = True
                break
        else:
            return False
    return True


def _entry_equal(x, y, sa: Side, sb: Side) -> bool:
    """Scalar entries of containers: number rules with the sides' decimal places, without percent."""
    if not (isinstance(x, sympy.Basic) and isinstance(y, sympy.Basic)):
        return structures_equal(x, y, sa, sb)
    return x == y or _scalar_equal_once(x, y, Side(None, sa.places), Side(None, sb.places))


def _unordered_equal(xs, ys, sa, sb) -> bool:
    if len(xs) != len(ys):
        # Duplicates do not change a set: dedupe exact duplicates and retry once.
        xs, ys = tuple(dict.fromkeys(xs)), tuple(dict.fromkeys(ys))
        if len(xs) != len(ys):
            return False
    used = [False] * len(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if not used[j] and _item_equal(x, y, sa, sb):
                used[j] = True
                break
        else:
            return False
    return True


def _item_equal(x, y, sa, sb) -> bool:
    if isinstance(x, sympy.Basic) and isinstance(y, sympy.Basic) and PM not in x.free_symbols | y.free_symbols:
        return _entry_equal(x, y, sa, sb)
    return structures_equal(x, y, sa, sb)


def _ordered_equal(xs, ys, sa, sb) -> bool:
    return len(xs) == len(ys) and all(_item_equal(x, y, sa, sb) for x, y in zip(xs, ys))


def _flat_items(x):
    if isinstance(x, MatrixOf) and (len(x.rows) == 1 or len(x.rows[0]) == 1):
        return tuple(v for row in x.rows for v in row)
    if isinstance(x, Bracketed) and x.left == "(" and x.right == ")":
        return x.items
    return None


def _reshape(x):
    """Lists of equations and ;-groups become the tuples / solution sets they state."""
    if isinstance(x, AnswerList):
        items = tuple(_reshape(i) for i in x.items)
        if all(isinstance(i, Relation) for i in items):
            pairs = [(i.terms[0], _eq_value(i)) for i in items]
            if all(v is not None and _is_name(n) for n, v in pairs):
                names = [n for n, _ in pairs]
                if len(set(names)) == len(names):
                    return Labelled(tuple(names), tuple(v for _, v in pairs))
                if len(set(names)) == 1:
                    return SetOf(tuple(v for _, v in pairs))
        return AnswerList(items)
    if isinstance(x, SolutionGroups):
        return SetOf(tuple(_reshape(g) for g in x.groups))
    if isinstance(x, Relation) and x.ops == ("=",):  # (x, y) = (4, 1): values by name
        names, values = x.terms
        if isinstance(values, Bracketed) and _is_name(names) and not _is_name(values):
            if values.left == "(" and len(names.items) == len(values.items) == len(set(names.items)):
                return Labelled(names.items, values.items)
    return x


def _gold_list_ordered(b: AnswerList, sb: Side) -> bool:
    """Whether a gold comma list fixes an order (see the unordered-set rule in the module docstring)."""
    if sb.joined:
        return False
    items = b.items
    if not all(isinstance(i, sympy.Basic) and not i.free_symbols and PM not in i.free_symbols for i in items):
        return not all(isinstance(i, (Bracketed, MatrixOf, SetOf, Relation)) for i in items)
    try:
        values = [float(sympy.re(sympy.N(i, 15))) for i in items]
    except (Deadline, KeyboardInterrupt):
        raise
    except Exception:
        return True
    if any(sympy.im(sympy.N(i, 15)) != 0 for i in items):
        return True
    ascending = all(u <= v for u, v in zip(values, values[1:]))
    descending = all(u >= v for u, v in zip(values, values[1:]))
    return not (ascending or descending)


def structures_equal(a, b, na=None, nb=None) -> bool:
    """Equality of two parsed answers (``a`` from the response, ``b`` from the gold)."""
    sa, sb = _side(na), _side(nb)
    a, b = _reshape(_expand_pm(a)), _reshape(_expand_pm(b))
    if isinstance(a, Labelled) or isinstance(b, Labelled):
        by_label = _labelled_equal(a, b, sa, sb)
        if by_label is not None:
            return by_label
        a, b = _unlabel(a, b), _unlabel(b, a)
    if isinstance(a, Relation) and not isinstance(b, Relation):
        value = _eq_value(a)
        if value is not None:
            return structures_equal(value, b, sa, sb)
    if isinstance(b, Relation) and not isinstance(a, Relation):
        value = _eq_value(b, gold=True)
        if value is not None:
            return structures_equal(a, value, sa, sb)
    ia, ib = as_intervals(a), as_intervals(b)
    if ia is not None and ib is not None and (isinstance(a, (Relation, UnionOf)) or isinstance(b, (Relation, UnionOf))):
        return _interval_sets_equal(ia, ib, sa, sb)
    if isinstance(a, sympy.Basic) and isinstance(b, sympy.Basic):
        return scalar_equal(a, b, sa, sb)
    if isinstance(a, Relation) and isinstance(b, Relation):
        va, vb = _eq_value(a), _eq_value(b, gold=True)
        if _relations_equal(a, b, sa, sb):
            return True
        if va is not None and vb is not None and isinstance(va, sympy.Basic) and isinstance(vb, sympy.Basic):
            # x = 5+5+1 = 11 vs x = 11: same stated value, same name
            return _names_match(a, b) and structures_equal(va, vb, sa, sb)
        return False
    if isinstance(b, AnswerList) and isinstance(a, (SetOf, AnswerList)):
        if _gold_list_ordered(b, sb):  # an ordered gold: a set answer does not get to permute it either
            return _ordered_equal(a.items, b.items, sa, sb)
        return _unordered_equal(a.items, b.items, sa, sb)
    if isinstance(a, (SetOf, AnswerList)) and isinstance(b, SetOf):
        return _unordered_equal(a.items, b.items, sa, sb)
    if isinstance(a, Bracketed) and isinstance(b, Bracketed):
        if ia is not None and ib is not None:
            return _interval_sets_equal(ia, ib, sa, sb)
        if (a.left, a.right) != (b.left, b.right):
            return False
        return _ordered_equal(a.items, b.items, sa, sb)
    if isinstance(a, MatrixOf) and isinstance(b, MatrixOf):
        if len(a.rows) != len(b.rows) or len(a.rows[0]) != len(b.rows[0]):
            return False
        return _ordered_equal(sum(a.rows, ()), sum(b.rows, ()), sa, sb)
    fa, fb = _flat_items(a), _flat_items(b)
    if fa is not None and fb is not None and (isinstance(a, MatrixOf) or isinstance(b, MatrixOf)):
        return _ordered_equal(fa, fb, sa, sb)
    if isinstance(a, AnswerList) and isinstance(b, Bracketed) and b.left == "(":
        return _ordered_equal(a.items, b.items, sa, sb)  # "1, 2" for the tuple "(1, 2)"
    if isinstance(a, UnionOf) and isinstance(b, UnionOf):
        return _unordered_equal(a.items, b.items, sa, sb)
    return False


def _labelled_equal(a, b, sa, sb) -> bool | None:
    """Both sides state values for the same set of names: compare name by name, whatever the written order
    (``b_{10} = 31, b_2 = 7`` is ``b_2 = 7, b_{10} = 31``; ``b_2 = 31, b_{10} = 7`` is not). None otherwise."""
    if not (isinstance(a, Labelled) and isinstance(b, Labelled)) or set(a.names) != set(b.names):
        return None
    gold = dict(zip(b.names, b.values))
    return all(_item_equal(value, gold[name], sa, sb) for name, value in zip(a.names, a.values))


def _unlabel(x, other):
    """Labelled values without their names: the ordered tuple they state, or, for indexed names of one letter
    against a gold comma list or set (``x_1 = 2, x_2 = -4`` for the roots ``-4, 2``), a list of solutions that
    the list rules compare."""
    if not isinstance(x, Labelled):
        return x
    if isinstance(other, (AnswerList, SetOf)) and _indexed_names(x.names):
        return AnswerList(x.values)
    return Bracketed(x.values, "(", ")")


def _indexed_names(names) -> bool:
    """``x_1, x_2, ...``: subscripted symbols sharing one base letter."""
    if not all(isinstance(n, sympy.Symbol) for n in names):
        return False
    bases = {n.name.partition("_")[0] if "_" in n.name else None for n in names}
    return len(bases) == 1 and None not in bases


def _names_match(a: Relation, b: Relation) -> bool:
    return _is_name(a.terms[0]) and _is_name(b.terms[0]) and a.terms[0] == b.terms[0]


def _relations_equal(a: Relation, b: Relation, sa=_PLAIN, sb=_PLAIN) -> bool:
    if a.ops != b.ops and a.ops != tuple(_FLIP.get(o, o) for o in b.ops[::-1]):
        return False
    if len(a.terms) == 2 and len(b.terms) == 2 and all(isinstance(t, sympy.Basic) for t in a.terms + b.terms):
        if a.ops == b.ops and _entry_equal(a.terms[0], b.terms[0], sa, sb) and _entry_equal(a.terms[1], b.terms[1], sa, sb):
            return True
        if a.ops != ("=",) or b.ops != ("=",):
            return False
        # Same equation up to a nonzero factor: (l1 - r1) / (l2 - r2) is a nonzero constant.
        da, db = a.terms[0] - a.terms[1], b.terms[0] - b.terms[1]
        if db == 0:
            return da == 0
        free = da.free_symbols | db.free_symbols
        if not free:
            return da / db != 0
        rng = random.Random(99)
        ratios = []
        for _ in range(_RNG_POINTS):
            point = {sym: sympy.Rational(rng.randint(500, 2500), 1000) for sym in free}
            xa, xb = da.xreplace(point), db.xreplace(point)
            if xa.is_Rational and xb.is_Rational:  # exact for polynomial / rational equations
                if xb == 0:
                    if xa != 0:
                        return False
                    continue
                ratios.append(xa / xb)
                continue
            va, vb = _numeric(xa), _numeric(xb)
            if va is None or vb is None or abs(vb) < 1e-12:
                continue
            ratios.append(va / vb)
        if len(ratios) < 3 or ratios[0] == 0:
            return False
        first = ratios[0]
        return all(r == first if isinstance(r, sympy.Basic) and isinstance(first, sympy.Basic)
                   else _close(complex(r), complex(first), _REL_SYMBOLIC) for r in ratios)
    if len(a.terms) != len(b.terms):
        return False
    same = all(structures_equal(x, y, sa, sb) for x, y in zip(a.terms, b.terms))
    return same or all(structures_equal(x, y, sa, sb) for x, y in zip(a.terms, b.terms[::-1]))
