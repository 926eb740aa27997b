"""Deciding whether two parsed answers are equal, and a canonical string for clustering.

Rules (the documented contract of :func:`grpo_core.verify.verify`):

* numbers: two exact rationals (integers, fractions, and decimals written in full) compare exactly;
  otherwise values compare with relative tolerance 1e-6 when either side was written with a decimal
  point / float, and 1e-12 for exact irrational forms (``\\sqrt{2}/2`` vs ``1/\\sqrt{2}``);
* rounding: a decimal gold with d places matches an exact answer (fraction, radical, pi...) that rounds to it
  (gold ``0.33`` vs ``\\frac{1}{3}``: equal). A decimal answer with d >= 2 places matches an exact gold that
  rounds to it (gold ``\\frac13`` vs ``0.33``). Two decimals with different places match if the more precise
  one rounds to the less precise one and that one has >= 2 places (``0.33`` vs ``0.333``);
* percent: ``50%`` equals ``50`` and ``0.5`` (the % is dropped, or the value divided by 100);
* ``\\pm``: ``1 \\pm \\sqrt2`` is the set {1+sqrt2, 1-sqrt2};
* expressions with symbols: equal if they agree numerically at 6 seeded random points in [0.5, 2.5]
  (rel. 1e-8) -- falling back to ``simplify(a-b) == 0`` under the time guard when too few points evaluate;
* equations: ``x=3`` equals ``3`` (a lone symbol / symbol product on one side is dropped); two equations are
  equal if their sides match or ``lhs-rhs`` are proportional;
* inequalities over one variable equal the interval / union they describe (``x>2`` == ``(2,\\infty)``);
  an infinite interval end is always open;
* sets ``\\{..\\}`` and bare lists ``a, b`` compare unordered; brackets ``(..)`` / ``[..]`` compare ordered
  with the same bracket shapes (a 1-row or 1-column matrix equals a tuple of its entries);
* letters: ``e`` is Euler's number and ``i`` the imaginary unit (``x_i`` stays a symbol); a prose answer
  ("yes", "Monday": a word of >= 3 letters, no function names) compares as case-insensitive text;
* multiple choice: a gold that is a single letter A-J matches ``B``, ``(B)``, ``B)``, ``\\text{(B)}``,
  ``(B) 42``.
"""

from __future__ import annotations

import random
import re

import mpmath
import sympy

from grpo_core.verify.values import (
    PM,
    AnswerList,
    Bracketed,
    MatrixOf,
    Relation,
    SetOf,
    UnionOf,
)
from grpo_core.verify.limits import Deadline
from grpo_core.verify.normalize import NormalizedAnswer

_CHOICE_RE = re.compile(r"\(?([A-J])\)?(?:[.:]?|[.:)]?\s.*)")
_RNG_POINTS = 6
_REL_FLOAT = 1e-6
_REL_EXACT = 1e-12
_REL_SYMBOLIC = 1e-8


def choice_letter(text: str) -> str | None:
    """The multiple-choice letter of a normalized answer, if it is one (``B``, ``(B)``, ``(B) 42``)."""
    m = _CHOICE_RE.fullmatch(text.strip())
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
        c = mpmath.mpc(*parts)
    except (Deadline, KeyboardInterrupt):
        raise
    except Exception:
        return None
    return c if mpmath.isfinite(c) else None


def _close(x, y, rel: float) -> bool:
    return abs(x - y) <= rel * max(abs(x), abs(y)) or abs(x - y) <= rel * 1e-3


def scalar_equal(a, b, na: NormalizedAnswer | None = None, nb: NormalizedAnswer | None = None) -> bool:
    """Value equality of two sympy scalars under the rounding / tolerance / percent rules."""
    if a == b:
        return True
    candidates = [(a, b)]
    if na is not None and nb is not None and na.percent != nb.percent:
        candidates.append((a / 100, b) if na.percent else (a, b / 100))
    return any(_scalar_equal_once(x, y, na, nb) for x, y in candidates)


def _scalar_equal_once(a, b, na, nb) -> bool:
    if a == b:
        return True
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
    if not free:
        va, vb = _numeric(a), _numeric(b)
        if va is None or vb is None:
            return False
        da = na.decimals if na is not None else None
        db = nb.decimals if nb is not None else None
        if a.is_Rational and b.is_Rational and da is None and db is None:
            return False  # exact rationals: already compared exactly
        floaty = da is not None or db is not None or a.has(sympy.Float) or b.has(sympy.Float)
        if _close(va, vb, _REL_FLOAT if floaty else _REL_EXACT):
            return True
        return _rounding_match(va, vb, da, db)
    return _symbolic_equal(a, b, free)


def _rounding_match(va, vb, da: int | None, db: int | None) -> bool:
    if va.imag != 0 or vb.imag != 0:
        return False
    if da is not None and db is not None:
        if da == db or min(da, db) < 2:
            return False
        places = min(da, db)
    elif db is not None:  # decimal gold, exact answer
        places = db
    elif da is not None:  # decimal answer, exact gold
        if da < 2:
            return False
        places = da
    else:
        return False
    return abs(va.real - vb.real) <= 0.5 * mpmath.mpf(10) ** (-places) * (1 + 1e-9)


def _symbolic_equal(a, b, free) -> bool:
    rng = random.Random(1234)
    symbols = sorted(free, key=lambda s: s.name)
    agree = 0
    for _ in range(_RNG_POINTS):
        point = {s: sympy.Rational(rng.randint(500, 2500), 1000) for s in symbols}
        va, vb = _numeric(a.subs(point)), _numeric(b.subs(point))
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


def _eq_value(rel: Relation):
    """The value an answer equation states: ``x = 3`` -> 3, ``3 = x`` -> 3, ``x = 1+2 = 3`` -> 3."""
    if any(op != "=" for op in rel.ops):
        return None
    first, last = rel.terms[0], rel.terms[-1]
    if _is_name(first):
        return last
    if _is_name(last):
        return first
    return None


def _is_name(x) -> bool:
    if isinstance(x, sympy.Symbol) and x != PM:
        return True
    return isinstance(x, sympy.Mul) and all(isinstance(f, sympy.Symbol) for f in x.args)


_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<="}


def as_intervals(x):
    """x as a tuple of (lo, hi, lo_open, hi_open) intervals, or None if it is not interval-like."""
    if isinstance(x, Bracketed) and len(x.items) == 2 and all(isinstance(i, sympy.Basic) for i in x.items):
        lo, hi = x.items
        return ((lo, hi, x.left == "(" or lo == -sympy.oo, x.right == ")" or hi == sympy.oo),)
    if isinstance(x, Relation):
        if x.ops == ("in",) and _is_name(x.terms[0]):
            return as_intervals(x.terms[1])
        names = [t for t in x.terms if _is_name(t)]
        if len(names) != 1 or any(op in ("=", "in") for op in x.ops):
            return None
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


def _interval_sets_equal(p, q) -> bool:
    if len(p) != len(q):
        return False
    used = [False] * len(q)
    for lo, hi, lo_open, hi_open in p:
        for j, (lo2, hi2, lo_open2, hi_open2) in enumerate(q):
            if (
                not used[j]
                and lo_open == lo_open2
                and hi_open == hi_open2
                and scalar_equal(lo, lo2)
                and scalar_equal(hi, hi2)
            ):
                used[j] = True
                break
        else:
            return False
    return True


def _unordered_equal(xs, ys, na, nb) -> bool:
    if len(xs) != len(ys):
        # Duplicates do not change a set: dedupe exact duplicates and retry once.
        xs, ys = tuple(dict.fromkeys(xs)), tuple(dict.fromkeys(ys))
        if len(xs) != len(ys):
            return False
    used = [False] * len(ys)
    for x in xs:
        for j, y in enumerate(ys):
            if not used[j] and structures_equal(x, y, na, nb):
                used[j] = True
                break
        else:
            return False
    return True


def _flat_items(x):
    if isinstance(x, MatrixOf) and (len(x.rows) == 1 or len(x.rows[0]) == 1):
        return tuple(v for row in x.rows for v in row)
    if isinstance(x, Bracketed) and x.left == "(" and x.right == ")":
        return x.items
    return None


def structures_equal(a, b, na: NormalizedAnswer | None = None, nb: NormalizedAnswer | None = None) -> bool:
    """Equality of two parsed answers (``a`` from the response, ``b`` from the gold)."""
    a, b = _expand_pm(a), _expand_pm(b)
    if isinstance(a, Relation) and not isinstance(b, Relation):
        value = _eq_value(a)
        if value is not None:
            return structures_equal(value, b, na, nb)
    if isinstance(b, Relation) and not isinstance(a, Relation):
        value = _eq_value(b)
        if value is not None:
            return structures_equal(a, value, na, nb)
    ia, ib = as_intervals(a), as_intervals(b)
    if ia is not None and ib is not None and (isinstance(a, (Relation, UnionOf)) or isinstance(b, (Relation, UnionOf))):
        return _interval_sets_equal(ia, ib)
    if isinstance(a, sympy.Basic) and isinstance(b, sympy.Basic):
        return scalar_equal(a, b, na, nb)
    if isinstance(a, Relation) and isinstance(b, Relation):
        return _relations_equal(a, b)
    if isinstance(a, (SetOf, AnswerList)) and isinstance(b, (SetOf, AnswerList)):
        return _unordered_equal(a.items, b.items, na, nb)
    if isinstance(a, Bracketed) and isinstance(b, Bracketed):
        if (a.left, a.right) != (b.left, b.right) and not (ia is not None and ib is not None):
            return False
        if ia is not None and ib is not None:
            return _interval_sets_equal(ia, ib)
        return _ordered_equal(a.items, b.items, na, nb)
    if isinstance(a, MatrixOf) and isinstance(b, MatrixOf):
        if len(a.rows) != len(b.rows) or len(a.rows[0]) != len(b.rows[0]):
            return False
        return _ordered_equal(sum(a.rows, ()), sum(b.rows, ()), na, nb)
    fa, fb = _flat_items(a), _flat_items(b)
    if fa is not None and fb is not None and (isinstance(a, MatrixOf) or isinstance(b, MatrixOf)):
        return _ordered_equal(fa, fb, na, nb)
    if isinstance(a, AnswerList) and isinstance(b, Bracketed) and b.left == "(":
        return _ordered_equal(a.items, b.items, na, nb)  # "1, 2" for the tuple "(1, 2)"
    if isinstance(a, UnionOf) and isinstance(b, UnionOf):
        return _unordered_equal(a.items, b.items, na, nb)
    return False


def _ordered_equal(xs, ys, na, nb) -> bool:
    return len(xs) == len(ys) and all(structures_equal(x, y, na, nb) for x, y in zip(xs, ys))


def _relations_equal(a: Relation, b: Relation) -> bool:
    if a.ops != b.ops and a.ops != tuple(_FLIP.get(o, o) for o in b.ops[::-1]):
        return False
    if len(a.terms) == 2 and len(b.terms) == 2 and all(isinstance(t, sympy.Basic) for t in a.terms + b.terms):
        if a.ops == b.ops and structures_equal(a.terms[0], b.terms[0]) and structures_equal(a.terms[1], b.terms[1]):
            return True
        if a.ops != ("=",) or b.ops != ("=",):
            return False
        # Same equation up to a nonzero factor: (l1 - r1) / (l2 - r2) is a nonzero constant.
        da, db = a.terms[0] - a.terms[1], b.terms[0] - b.terms[1]
        if db == 0:
            return da == 0
        ratio = da / db
        free = ratio.free_symbols
        if not free:
            return ratio != 0 and ratio.is_finite is not False
        rng = random.Random(99)
        values = []
        for _ in range(_RNG_POINTS):
            v = _numeric(ratio.subs({s: sympy.Rational(rng.randint(500, 2500), 1000) for s in free}))
            if v is not None:
                values.append(v)
        return len(values) >= 3 and abs(values[0]) > 1e-12 and all(_close(v, values[0], _REL_SYMBOLIC) for v in values)
    if len(a.terms) != len(b.terms):
        return False
    same = all(structures_equal(x, y) for x, y in zip(a.terms, b.terms))
    return same or all(structures_equal(x, y) for x, y in zip(a.terms, b.terms[::-1]))
