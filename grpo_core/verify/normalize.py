"""String-level normalization of an answer span before parsing.

Rules (documented contract; the same function is applied to the response's answer and to the gold):

* math delimiters ``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\displaystyle``, ``\\left``/``\\right`` and
  spacing commands are removed; ``\\dfrac``/``\\tfrac``/``\\cfrac`` become ``\\frac``;
* ``\\text{...}`` / ``\\mbox{...}`` / ``\\textrm{...}``: a word-only content (a unit such as ``cm``,
  ``dollars``, ``degrees``) is dropped, ``or``/``and`` become a comma, anything else is unwrapped;
  ``\\mathrm``/``\\mathbf``/``\\operatorname`` are unwrapped;
* degrees (``^\\circ``, ``^{\\circ}``, ``°``, ``\\degree``) are dropped: ``30^\\circ`` equals ``30``;
* a percent sign is dropped and remembered (see :mod:`grpo_core.verify.equivalence` for the rule);
* ``1{,}000`` / ``1,000,000`` become ``1000`` / ``1000000`` when the whole answer is one number;
  ``2 1/3`` (whole answer) is the mixed number 7/3;
* trailing unit words after a number (``5 apples``) and a trailing ``.`` are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from grpo_core.verify.extract import match_brace

# Function and constant names that make a word "math", not prose (shared with api.py).
MATH_NAMES = frozenset({
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
    "log", "ln", "exp", "sqrt", "abs", "pi", "inf", "infty", "infinity",
})
_MATH_WORDS = MATH_NAMES | {"or", "and", "i", "e"}
_UNICODE = {
    "\u2212": "-",
    "\u2013": "-",
    "\u00d7": r"\times ",
    "\u00b7": r"\cdot ",
    "\u22c5": r"\cdot ",
    "\u00f7": r"\div ",
    "\u221a": r"\sqrt ",
    "\u03c0": r"\pi ",
    "\u221e": r"\infty ",
    "\u2264": r"\le ",
    "\u2265": r"\ge ",
    "\u2260": r"\ne ",
    "\u00b1": r"\pm ",
    "\u222a": r"\cup ",
    "\u00b0": "",
}
_DROP_CMDS = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg|displaystyle|textstyle|"
    r"scriptstyle|quad|qquad|limits|nolimits)(?![A-Za-z])|(?<!\\)\\[,;:! ]|~"
)
_TEXT_CMDS = ("text", "textrm", "textnormal", "mbox", "textup", "textit", "textbf", "hbox")
_UNWRAP_CMDS = ("mathrm", "mathbf", "mathit", "mathsf", "boldsymbol", "bm", "operatorname", "mathbb", "mathnormal")
_WRAP_RE = re.compile(r"\\(" + "|".join(_TEXT_CMDS + _UNWRAP_CMDS) + r")\s*\{")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree(?![A-Za-z])|\^\s*\{\s*o\s*\}")
_PERCENT_RE = re.compile(r"\\?%")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MIXED_RE = re.compile(r"(-?)(\d+)\s+(\d+)\s*/\s*(\d+)")
_TRAILING_WORDS_RE = re.compile(r"(?:\s+[A-Za-z]{2,}\.?(?:\^\{?\d\}?)?)+\s*$")
_DECIMAL_RE = re.compile(r"-?(\d*)\.(\d+)")


@dataclass(frozen=True)
class NormalizedAnswer:
    """An answer span after string normalization, plus what the dropped decorations said."""

    text: str
    """The normalized text handed to the parser."""
    percent: bool
    """A percent sign was present."""
    decimals: int | None
    """If the answer is a plain decimal literal (``0.33``, ``-2.50``): its number of decimal places."""


def _unwrap_text_commands(s: str) -> str:
    # Repeatedly replace the first \text{...}-like command; bounded by the span length.
    for _ in range(200):
        m = _WRAP_RE.search(s)
        if m is None:
            return s
        close = match_brace(s, m.end() - 1, limit=len(s))
        if close < 0:
            return s[: m.start()] + s[m.end() :]
        content = s[m.end() : close]
        if m.group(1) in _TEXT_CMDS:
            words = content.strip()
            if re.fullmatch(r"(?:or|and)", words, re.IGNORECASE):
                content = ","
            elif (
                re.fullmatch(r"[A-Za-z][A-Za-z .]*", words)
                and not re.fullmatch(r"[A-J]|[a-z]", words)
                and re.search(r"[\w\\]", s[: m.start()] + s[close + 1 :])
            ):
                content = " "  # a unit next to a value; a text-only answer ("\text{yes}") is kept
                unit_power = re.match(r"\s*\^\s*(?:\{\s*\d\s*\}|\d)", s[close + 1 :])
                if unit_power:  # cm^2: the power belongs to the dropped unit
                    close += unit_power.end()
        s = s[: m.start()] + " " + content + " " + s[close + 1 :]
    return s


def normalize_span(span: str) -> NormalizedAnswer:
    """Normalize an extracted answer span (see module docstring). Linear in len(span)."""
    s = span.strip()
    for ch, rep in _UNICODE.items():
        if ch in s:
            s = s.replace(ch, rep)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[\[\]()]", " ", s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
    s = _DROP_CMDS.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = _unwrap_text_commands(s)
    s = s.replace("{,}", ",")
    s = re.sub(r"\s*\bper\s*cent\b", "%", s, flags=re.IGNORECASE)
    percent = bool(_PERCENT_RE.search(s))
    if percent:
        s = _PERCENT_RE.sub("", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\b(?:or|and)\b", ",", s) if re.search(r"\d|\\|=|<|>", s) else s
    s = s.rstrip(".").strip()
    # "5 apples", "12 square units": drop trailing words after something numeric.
    m = _TRAILING_WORDS_RE.search(s)
    if m and m.start() > 0 and re.search(r"[\d}]", s[: m.start()]):
        words = re.findall(r"[A-Za-z]+", m.group(0))
        if not any(w.lower() in _MATH_WORDS for w in words):
            s = s[: m.start()].strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    mixed = _MIXED_RE.fullmatch(s)
    if mixed:
        sign, whole, num, den = mixed.groups()
        s = f"{sign}({whole}+{num}/{den})"
    dec = _DECIMAL_RE.fullmatch(s)
    decimals = len(dec.group(2)) if dec else None
    return NormalizedAnswer(text=s, percent=percent, decimals=decimals)
