"""The public single-item API: :func:`verify`, :func:`judge`, :func:`extract_answer`, :func:`canonical_answer`.

``verify(response, gold)`` never raises and is bounded for any ``str``: the response is scanned with
linear-time string operations only, the answer span is capped at MAX_ANSWER_CHARS (a plain number literal at
MAX_LITERAL_CHARS: long literals compare as digit strings or exact integers), the parser bounds
depth and number sizes (what is expensive, not what is long: ``2^{65536}`` is evaluated, ``9^{9^9}`` is not), and on the main thread a SIGALRM guard (``VerifyConfig.timeout_s``) interrupts a
slow symbolic step (reported as reason ``"timeout"``, scored incorrect). For a hard bound in any thread use
:class:`grpo_core.verify.pool.VerifierPool`, which kills a worker that overruns.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import sympy

from grpo_core.verify.equivalence import Side, as_intervals, choice_letter, structures_equal
from grpo_core.verify.extract import ExtractConfig, extract_span, gold_span
from grpo_core.verify.values import (
    PM,
    AnswerList,
    Bracketed,
    MatrixOf,
    Relation,
    SetOf,
    UnionOf,
)
from grpo_core.verify.latex_parser import parse_with_decimals
from grpo_core.verify.limits import Deadline, ParseError, TooBig, time_guard
from grpo_core.verify.normalize import (
    MATH_NAMES,
    NormalizedAnswer,
    decimal_comma_reading,
    labelled_parts,
    normalize_span,
    split_top_level,
)

_GOLD_CHOICE = re.compile(r"\(?([A-J])\)?")
_GOLD_CHOICE_WITH_VALUE = re.compile(r"\(([A-J])\)\s+\S.*")  # gold "(B) 7": the letter decides
_OPTION_PREFIX = re.compile(r"\(\s*[A-J]\s*\)\s*(?=[^\s,;])")
_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


def _is_word_answer(text: str) -> bool:
    """Prose answers such as "yes", "Monday", "odd": some word of >= 3 letters, no math function names.
    ("xy" stays a product of symbols.)"""
    if not _WORDS.fullmatch(text):
        return False
    words = text.lower().split()
    return (any(len(w) >= 3 for w in words) or words == ["no"]) and not any(w in MATH_NAMES for w in words)


def _is_prose(text: str) -> bool:
    """Three or more plain words of >= 3 letters (not \\commands, not math names): a sentence."""
    text = re.sub(r"\\(?:begin|end)\s*\{[^{}]*\}", " ", text)
    words = [w for w in re.findall(r"(?<![\\A-Za-z])[A-Za-z]{3,}", text) if w.lower() not in MATH_NAMES]
    return len(words) >= 3


@dataclass(frozen=True)
class VerifyConfig:
    """Options of the verifier."""

    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """Which answer forms are extracted from the response (see ExtractConfig)."""
    timeout_s: float = 1.0
    """In-process wall-clock budget per call in seconds (SIGALRM, main thread only); <= 0 disables it."""

    def __post_init__(self):
        if not isinstance(self.extract, ExtractConfig):
            raise TypeError(f"VerifyConfig.extract must be an ExtractConfig, got {type(self.extract).__name__}")
        if self.timeout_s is None or self.timeout_s < 0:
            raise ValueError(f"VerifyConfig.timeout_s must be >= 0, got {self.timeout_s}")


DEFAULT_CONFIG = VerifyConfig()


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one response.

    reason is one of: "correct", "wrong", "no_answer" (nothing extracted), "no_gold" (gold empty/too long),
    "unparsable" (answer outside the grammar), "gold_unparsable", "unjudgeable" (sympy raised while comparing), "too_big" (size bound hit), "timeout"
    (in-process guard or pool kill), "worker_died" (pool only), "error:<ExceptionType>" (bug; scored 0).
    """

    correct: bool
    answer: str | None
    """The extracted final-answer span (raw), or None."""
    canonical: str | None
    """canonical_answer() of the response (None when not requested or no answer)."""
    reason: str


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str):
    # Parsed values are immutable (sympy objects, frozen dataclasses); golds repeat across a group.
    return parse_with_decimals(text)


def _parse(norm: NormalizedAnswer):
    return _parse_cached(norm.text)[0]


def _parse_side(norm: NormalizedAnswer):
    value, places = _parse_cached(norm.text)
    return value, Side(norm, places)


def extract_answer(response: str, config: VerifyConfig | None = None) -> str | None:
    """The final answer span that :func:`verify` would judge, or None. Never raises."""
    try:
        return extract_span(response, (config or DEFAULT_CONFIG).extract)
    except Exception:  # pragma: no cover - extract_span only does bounded string work
        return None


def judge(response: str, gold: str, config: VerifyConfig | None = None, with_canonical: bool = False) -> VerifyResult:
    """Verify one response against one gold answer and say why. Never raises (for str inputs or otherwise)."""
    config = config or DEFAULT_CONFIG
    answer = None
    try:
        with time_guard(config.timeout_s):
            answer = extract_span(response, config.extract) if isinstance(response, str) else None
            correct, reason = _judge_span(answer, gold)
            canonical = _canonical_span(answer) if (with_canonical and answer is not None) else None
        return VerifyResult(correct, answer, canonical, reason)
    except Deadline:
        return VerifyResult(False, answer, None, "timeout")
    except (TooBig, RecursionError, MemoryError):
        return VerifyResult(False, answer, None, "too_big")
    except Exception as exc:  # the contract is "never raises": a bug scores 0 and says so
        return VerifyResult(False, answer, None, f"error:{type(exc).__name__}")


def _judge_span(answer: str | None, gold: str) -> tuple[bool, str]:
    if answer is None:
        return False, "no_answer"
    gspan = gold_span(gold) if isinstance(gold, str) else None
    if gspan is None:
        return False, "no_gold"
    na, ng = normalize_span(answer), normalize_span(gspan)
    if not na.text:
        return False, "no_answer"
    if not ng.text:
        return False, "no_gold"
    if na.rejected or ng.rejected:
        return False, "wrong"
    if na.text.replace(" ", "") == ng.text.replace(" ", "") and na.percent == ng.percent:
        return True, "correct"
    parts_a = labelled_parts(na.text) if ")" in na.text else None
    parts_g = labelled_parts(ng.text) if ")" in ng.text else None
    if parts_a or parts_g:
        ok = _parts_equal(parts_a, parts_g, na.text, ng.text)
        return ok, ("correct" if ok else "wrong")
    if max(len(na.text), len(ng.text)) > 300 and na.percent == ng.percent:
        fast = _long_literals_equal(na.text, ng.text)
        if fast is not None:
            return fast, ("correct" if fast else "wrong")
    if _is_word_answer(na.text) and _is_word_answer(ng.text):
        # Word answers ("yes", "Monday", "odd") compare as case-insensitive text, not as symbol products.
        ok = " ".join(na.text.lower().split()) == " ".join(ng.text.lower().split())
        return ok, ("correct" if ok else "wrong")
    if _is_prose(ng.text):
        return False, "gold_unparsable"
    if _is_prose(na.text):  # "Let me think. First, 12 apples...": words, not a formula
        return False, "unparsable"
    gold_letter = _GOLD_CHOICE.fullmatch(ng.text) or _GOLD_CHOICE_WITH_VALUE.fullmatch(ng.text)
    if gold_letter:
        ok = choice_letter(na.text) == gold_letter.group(1)
        return ok, ("correct" if ok else "wrong")
    option = _OPTION_PREFIX.match(na.text)
    if option:  # "\textbf{(C) } 1008" for the gold 1008: the option's value is the answer
        na = NormalizedAnswer(na.text[option.end() :], na.percent, None, na.joined_by_words, na.rejected, na.degrees)
    try:
        parsed_gold, gold_side = _parse_side(ng)
    except (ParseError, TooBig, RecursionError):
        return False, "gold_unparsable"
    try:
        parsed_answer, answer_side = _parse_side(na)
    except TooBig:
        return False, "too_big"
    except (ParseError, RecursionError):
        last_side = _last_side(na.text)
        if last_side is None:
            return False, "unparsable"
        # "\\int_0^1 x^2\\,dx = \\frac13": a chain whose earlier sides are outside the grammar states its last side
        na = NormalizedAnswer(last_side, na.percent, None, na.joined_by_words, na.rejected, na.degrees)
        try:
            parsed_answer, answer_side = _parse_side(na)
        except (ParseError, TooBig, RecursionError):
            return False, "unparsable"
    try:
        ok = structures_equal(parsed_answer, parsed_gold, answer_side, gold_side)
        if not ok and isinstance(parsed_gold, sympy.Basic) and not parsed_gold.is_Integer:
            # "3,4" for a gold 3.4: a decimal comma, read so only when the gold is one non-integer number
            alt = decimal_comma_reading(na.text)
            if alt is not None:
                alt_norm = NormalizedAnswer(alt, na.percent, None)
                parsed_alt, alt_side = _parse_side(alt_norm)
                ok = structures_equal(parsed_alt, parsed_gold, alt_side, gold_side)
        if not ok and na.degrees != ng.degrees:
            ok = _angle_units_equal(parsed_answer, parsed_gold, na.degrees, answer_side, gold_side)
    except (ValueError, TypeError, ArithmeticError, AttributeError, NotImplementedError):
        # sympy itself gave up on the comparison (e.g. complex AccumulationBounds): cannot judge.
        return False, "unjudgeable"
    return ok, ("correct" if ok else "wrong")


def _last_side(text: str) -> str | None:
    """The text after the last top-level ``=`` (not ``<=``, ``>=``, ``!=``) when a LaTeX command precedes it
    (the part outside the grammar), or None."""
    depth, cut = 0, -1
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "=" and depth == 0 and (i == 0 or text[i - 1] not in "<>!"):
            cut = i
    side = text[cut + 1 :].strip() if cut >= 0 else ""
    return side if side and "\\" in text[:cut] else None


def _angle_units_equal(answer, gold, answer_in_degrees: bool, answer_side, gold_side) -> bool:
    """One side in degrees (a degree mark or unit), the other in radians (a constant multiple of pi): the
    degree value times pi/180 is the radian value (``45^\\circ`` is ``\\frac{\\pi}{4}`` either way round). A bare
    number is not in degrees (``45`` is not ``\\frac{\\pi}{4}``)."""
    if not _in_radians(gold if answer_in_degrees else answer):
        return False
    factor = sympy.pi / 180 if answer_in_degrees else 180 / sympy.pi
    converted = _map_scalars(answer, lambda v: v * factor)
    # the converted answer is no longer the decimal literal it was written as: compared without its places
    return converted is not None and structures_equal(converted, gold, Side(answer_side.norm, {}), gold_side)


def _in_radians(value) -> bool:
    items = value.items if isinstance(value, (AnswerList, SetOf)) else (value,)
    return all(isinstance(v, sympy.Basic) and not v.free_symbols and v.has(sympy.pi) for v in items)


def _map_scalars(value, fn):
    if isinstance(value, sympy.Basic):
        return fn(value) if not value.free_symbols else None
    if isinstance(value, (AnswerList, SetOf)) and all(isinstance(v, sympy.Basic) for v in value.items):
        return type(value)(tuple(fn(v) for v in value.items))
    return None


def _parts_equal(parts_a, parts_g, text_a: str, text_g: str) -> bool:
    """An answer in labelled parts ``(a) .. (b) ..``: parts match by label when both sides are labelled, else
    in order against the other side's top-level comma list (the labels fix the order); against a single gold
    value, the last part is the answer (as the last of several boxes would be)."""
    if parts_a and parts_g:
        if sorted(label for label, _ in parts_a) != sorted(label for label, _ in parts_g):
            return False
        gold = dict(parts_g)
        return all(_judge_span(body, gold[label])[0] for label, body in parts_a)
    bodies = [body for _, body in (parts_a or parts_g)]
    others = split_top_level(text_g if parts_a else text_a)
    if parts_a and len(others) == 1:  # one gold value: the last part states it, as a last box would
        return _judge_span(parts_a[-1][1], text_g)[0]
    if len(others) != len(bodies):
        return False
    pairs = zip(bodies, others) if parts_a else zip(others, bodies)
    return all(_judge_span(answer, gold)[0] for answer, gold in pairs)


_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_POWER_OF_TEN = re.compile(r"10\s*\^\s*\{?\s*(\d{1,6})\s*\}?")


def _literal_key(text: str) -> tuple[str, str, str] | None:
    """(sign, integer digits, fraction digits) of a plain number literal with redundant zeros removed."""
    text = text.replace(" ", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("-").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    return ("" if whole == "0" and not frac else sign), whole, frac


def _long_literals_equal(a: str, b: str) -> bool | None:
    """Exact comparison of long plain number literals as digit strings (linear time, no int conversion):
    equal literals, or a literal against ``10^k``. None when the fast path cannot decide."""
    ka, kb = _literal_key(a), _literal_key(b)
    if ka is not None and kb is not None:
        if ka == kb:
            return True
        return False if not ka[2] and not kb[2] else None  # decimals may still match by rounding
    for key, other in ((ka, b), (kb, a)):
        power = _POWER_OF_TEN.fullmatch(other.strip())
        if key is not None and power and not key[2]:
            return not key[0] and key[1] == "1" + "0" * int(power.group(1))
    return None


def verify(response: str, gold: str, config: VerifyConfig | None = None) -> bool:
    """True iff the final answer of ``response`` equals ``gold`` (see equivalence.py for the rules)."""
    return judge(response, gold, config).correct


# ---- canonical form -------------------------------------------------------------------------------------
def canonical_answer(response: str, config: VerifyConfig | None = None) -> str | None:
    """A normalized string of the final answer, so that equal answers cluster ("\\frac{1}{2}", "0.5", "1/2"
    -> "1/2"); None when there is no answer. Falls back to the normalized text when the answer does not
    parse. Never raises."""
    config = config or DEFAULT_CONFIG
    try:
        with time_guard(config.timeout_s):
            span = extract_span(response, config.extract) if isinstance(response, str) else None
            return None if span is None else _canonical_span(span)
    except Deadline:
        return None
    except Exception:
        return None


def _canonical_span(span: str) -> str | None:
    norm = normalize_span(span)
    if not norm.text:
        return None
    letter = _GOLD_CHOICE.fullmatch(norm.text)
    if letter:
        return letter.group(1)
    try:
        return _canon(_parse(norm))
    except (Deadline, KeyboardInterrupt):
        raise
    except Exception:
        return norm.text.replace(" ", "")


def _canon(x) -> str:
    if isinstance(x, sympy.Basic):
        if PM in x.free_symbols:
            return _canon(SetOf((x.subs(PM, 1), x.subs(PM, -1))))
        # Expand small polynomials only: (x+1)^1000 would cost seconds and gigantic strings.
        small_powers = all(not (p.exp.is_Number and abs(p.exp) > 12) for p in x.atoms(sympy.Pow))
        if x.free_symbols and small_powers and sympy.count_ops(x) <= 40:
            x = sympy.expand(x)
        return sympy.sstr(x, order="lex")
    intervals = as_intervals(x) if isinstance(x, (Relation, UnionOf)) else None
    if intervals is not None:  # x>2, (2,oo) and 2<x cluster together
        return "U".join(
            sorted(
                ("(" if lo_open else "[") + _canon(lo) + "," + _canon(hi) + (")" if hi_open else "]")
                for lo, hi, lo_open, hi_open in intervals
            )
        )
    if isinstance(x, Relation):
        if all(op == "=" for op in x.ops) and len(x.terms) >= 2:
            first, last = x.terms[0], x.terms[-1]
            if isinstance(first, sympy.Symbol) or (
                isinstance(first, sympy.Mul) and all(isinstance(f, sympy.Symbol) for f in first.args)
            ):
                return _canon(last)
        parts = [_canon(x.terms[0])]
        for op, t in zip(x.ops, x.terms[1:]):
            parts += [op, _canon(t)]
        return "".join(parts)
    if isinstance(x, (SetOf, AnswerList)):
        return "{" + ",".join(sorted(set(_canon(i) for i in x.items))) + "}"
    if isinstance(x, Bracketed):
        left = "(" if len(x.items) == 2 and x.items[0] == -sympy.oo else x.left
        right = ")" if len(x.items) == 2 and x.items[-1] == sympy.oo else x.right
        return left + ",".join(_canon(i) for i in x.items) + right
    if isinstance(x, UnionOf):
        return "U".join(sorted(_canon(i) for i in x.items))
    if isinstance(x, MatrixOf):
        if len(x.rows) == 1 or len(x.rows[0]) == 1:  # vectors cluster with tuples
            return "(" + ",".join(_canon(v) for row in x.rows for v in row) + ")"
        return "[" + ";".join(",".join(_canon(v) for v in row) for row in x.rows) + "]"
    raise ParseError(f"no canonical form for {type(x).__name__}")
