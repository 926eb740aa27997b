"""String-level normalization of an answer span before parsing.

Rules (documented contract; the same function is applied to the response's answer and to the gold):

* math delimiters ``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\displaystyle``, ``\\left``/``\\right`` and
  spacing commands are removed; ``\\dfrac``/``\\tfrac``/``\\cfrac`` become ``\\frac``;
* ``\\text{...}`` / ``\\mbox{...}`` / ``\\textrm{...}``: a word-only content (a unit such as ``cm``,
  ``dollars``, ``degrees``) is dropped, ``or``/``and`` become a comma, anything else is unwrapped;
  ``\\mathrm``/``\\mathbf``/``\\operatorname`` are unwrapped;
* degrees (``^\\circ``, ``^{\\circ}``, ``°``, ``\\degree``) are dropped: ``30^\\circ`` equals ``30``; that a degree
  mark or unit was there is remembered (``degrees``: a radian gold with pi converts it, see api.py);
* a percent sign is dropped and remembered (see :mod:`grpo_core.verify.equivalence` for the rule);
* ``1{,}000`` / ``1,000,000`` become ``1000`` / ``1000000`` when the whole answer is one number;
  ``2 1/3`` (whole answer) is the mixed number 7/3;
* trailing unit words after a number (``5 apples``, ``60 km/h``, ``12 cm²``), currency signs
  (``\\$``, ``€``, ``£``, ``¥``, ``₹``) and a trailing ``.`` are dropped; a leading label word
  (``Area = 12``, ``\\text{Total}: 12``) is dropped, but a program keyword as label (``def: 2``,
  ``return = 2``) rejects the answer: it is code, not a labelled value;
* number formats: thin-space / space thousands groups (``2\\,000``, ``2 000``), ``22,\\!333``, a decimal
  comma where it cannot be a thousands separator (``2500,75``, ``0,125``, ``1,5``: not exactly three digits
  after the comma, or a leading ``0,``), European ``2.500,75``;
* ``+7 2/3`` / ``7 2/3`` (whole answer) is the mixed number 23/3, but only with spaces on one line
  (``7\n1/4`` is not a number) and never with a percent sign (``7 1/4%`` is ambiguous: rejected);
* a repeating decimal ``0.1\\overline{6}`` is its exact fraction (1/6);
* ordinal suffixes (``5th``, ``5^{\\text{th}}``) are dropped; a single number word (``five``) is its number;
* ``nan`` is never a value (rejected); a set-builder ``\\{y \\mid -3 \\le y \\le 5\\}`` is its condition;
* a bracket pair whose only content is a pair of the same kind is dropped (``((((2))))`` is ``(2)``), so
  benign nesting of redundant pairs parses within the parser's depth bounds.
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
    "\u00b2": "^2",
    "\u00b3": "^3",
    "\u20ac": " ",
    "\u00a3": " ",
    "\u00a5": " ",
    "\u20b9": " ",
    "\u27e8": "(",
    "\u27e9": ")",
    "\u2009": " ",
    "\u202f": " ",
    "\u00a0": " ",
}
_DROP_CMDS = re.compile(
    r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg|displaystyle|textstyle|"
    r"scriptstyle|limits|nolimits|hline|boxed|fbox)(?![A-Za-z])|\\q?quad|(?<!\\)\\[,;: ]|~"
)
_TEXT_CMDS = ("text", "textrm", "textnormal", "mbox", "textup", "textit", "textbf", "hbox")
_UNWRAP_CMDS = ("mathrm", "mathbf", "mathit", "mathsf", "boldsymbol", "bm", "operatorname", "mathbb", "mathnormal")
_WRAP_RE = re.compile(r"\\(" + "|".join(_TEXT_CMDS + _UNWRAP_CMDS) + r")\s*\{")
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree(?![A-Za-z])|\^\s*\{\s*o\s*\}")
_DEGREE_MARK_RE = re.compile(r"\\circ|\\degree(?![A-Za-z])|\u00b0|\^\s*\{\s*o\s*\}|\bdeg(?:ree)?s?\b", re.IGNORECASE)
_SET_BUILDER_RE = re.compile(
    r"\\\{\s*[A-Za-z]\s*(?:\\in\s*(?:\\mathbb\s*\{?\s*R\s*\}?|\\R(?![A-Za-z])))?\s*(?:\\mid|\\vert|\||:|\\colon)"
    r"\s*(.+?)\s*\\\}"
)
_PERCENT_RE = re.compile(r"\\?%")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MIXED_RE = re.compile(r"([-+]?)(\d+) +(\d+) */ *(\d+)")
_TRAILING_WORDS_RE = re.compile(r"(?:\s+(?:[A-Za-z]{2,}(?:/[A-Za-z]+)*|[A-Za-z]/[A-Za-z]+)\.?(?:\^\{?\d\}?)?)+\s*$")
_ATTACHED_UNIT_RE = re.compile(
    r"(?<=\d)\s*(?:(?:cm|mm|km|m|ft|in)(?:\^\{?[23]\}?)"
    r"|(?:cm|mm|km|kg|mg|ml|mL|ft|lbs?|oz|mph|hrs?|min|sec|km/h|m/s))$"
)
_REPEATING_RE = re.compile(r"(?<![\d.])(\d*)\.(\d*)\\overline\s*\{\s*(\d{1,50})\s*\}")


def _repeating_fraction(m: re.Match) -> str:
    """``0.1\\overline{6}`` -> ``(15/90)``: the exact value of a repeating decimal."""
    whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
    if len(whole) + len(fixed) > 50:
        return m.group(0)
    num = int(whole + fixed + rep) - int(whole + fixed)
    den = (10 ** len(rep) - 1) * 10 ** len(fixed)
    return f"({num}/{den})"


_ORDINAL_RE = re.compile(r"(?<=\d)\s*(?:\^\s*\{\s*(?:\\(?:text|mathrm)\s*\{)?\s*(?:st|nd|rd|th)\s*\}?\s*\}|\\(?:text|mathrm)\s*\{\s*(?:st|nd|rd|th)\s*\}|(?:st|nd|rd|th)\b)")
_WORD_NUMBERS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}
_WORD_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                      "ninety": "90", "hundred": "100", "thousand": "1000", "million": "1000000"})
_LONG_LITERAL_RE = re.compile(r"[-+]?(?:\d+|\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+)(?:\.(\d+))?")
_LABEL_RE = re.compile(r"^\s*[A-Za-z][A-Za-z ]{2,}\s*[=:]\s*(?=\S)")
_CODE_WORDS = frozenset({
    "def", "return", "print", "printf", "lambda", "let", "var", "const", "int", "float", "double", "char", "void",
    "class", "import", "from", "assert", "yield", "elif", "else", "if", "for", "while", "true", "false", "null",
    "none", "function", "func", "fn", "echo", "puts", "case", "default", "switch", "goto", "public", "static",
})
"""Words that make a leading ``word:`` / ``word =`` a program keyword, not an answer label."""
_SPACE_GROUPS_RE = re.compile(r"(?<![\d.])(\d{1,3})((?: \d{3})+)(?![\d/])")
_DECIMAL_COMMA_RE = re.compile(r"(-?)(\d+),(\d+)")
_EURO_RE = re.compile(r"(-?\d{1,3}(?:\.\d{3})+),(\d+)")
_UNIT_LETTER_RE = re.compile(r"\\(?:text|mbox|mathrm)\s*\{\s+[A-Za-z]\s*\}(?:\s*\^\s*(?:\{\s*\d\s*\}|\d))?")
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
    joined_by_words: bool = False
    """The answer listed items with "and" / "or" (a solution set, compared unordered)."""
    rejected: bool = False
    """The answer is malformed in a way that must not match anything (``nan``, ``7 1/4%``)."""
    degrees: bool = False
    """A degree mark or unit was dropped (``45^\\circ``, ``45°``, ``45 degrees``)."""


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
                and not re.fullmatch(r"[A-J]\.?|[a-z]", words)
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
    if len(s) > 1000:  # only a plain number literal can be this long (extract._cap): skip the LaTeX passes
        plain = _LONG_LITERAL_RE.fullmatch(s)
        if plain:
            s = s.replace(",", "").replace(" ", "")
            return NormalizedAnswer(text=s, percent=False, decimals=len(plain.group(1)) if plain.group(1) else None)
    degrees = _DEGREE_MARK_RE.search(s) is not None
    builder = _SET_BUILDER_RE.fullmatch(s)
    if builder:  # \{y \mid -3 \le y \le 5\}: the condition is the answer (the set it describes)
        s = builder.group(1)
    for ch, rep in _UNICODE.items():
        if ch in s:
            s = s.replace(ch, rep)
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r",\\!\s*|\s*\{\s*,\s*\}\s*", ",", s).replace("\\!", "")
    joined = re.search(r"\b(?:or|and)\b", s) is not None and re.search(r"\d|\\|=|<|>", s) is not None
    s = re.sub(r"\\mathbb\s*\{\s*R\s*\}|\\R(?![A-Za-z])", r"(-\\infty,\\infty)", s)
    s = re.sub(r"\\langle(?![A-Za-z])", "(", s)
    s = re.sub(r"\\rangle(?![A-Za-z])", ")", s)
    s = _UNIT_LETTER_RE.sub(" ", s)  # "5\text{ m}^2": a spaced single letter in \text is a unit
    s = re.sub(r"\\[\[\]()]", " ", s)
    s = re.sub(r"\\[dtc]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\\[dt]binom(?![A-Za-z])", r"\\binom", s)
    s = _DROP_CMDS.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    if "overline" in s:
        s = _REPEATING_RE.sub(_repeating_fraction, s)
    s = _ORDINAL_RE.sub("", s)
    s = _unwrap_text_commands(s)
    s = s.replace("{,}", ",")
    s = re.sub(r"\s*\b(?:per\s*cent(?:age)?|pct)\b", "%", s, flags=re.IGNORECASE)
    rejected = re.search(r"\bnan\b", s, re.IGNORECASE) is not None
    split_number = re.search(r"\d[ \t]*\n\s*[\d\\]", s) is not None  # "7\n1/4" is not one number
    percent = bool(_PERCENT_RE.search(s))
    if percent:
        s = _PERCENT_RE.sub("", s)
    s = re.sub(r"\s+", " ", s).strip()
    if re.search(r"\d|\\|=|<|>", s) and re.search(r"\b(?:or|and)\b", s):
        s, joined = re.sub(r"\s*,?\s*\b(?:or|and)\b", ",", s), True
    s = re.sub(r",\s*,", ",", s).strip(" ,")
    s = re.sub(r"^[=:]\s*", "", s)
    label = _LABEL_RE.match(s)
    if label and label.group(0).split()[0].rstrip("=:").lower() in _CODE_WORDS:
        rejected = True  # "def: 2", "return: 2": program text, not a labelled value
    elif label and not any(w.lower() in _MATH_WORDS for w in re.findall(r"[A-Za-z]+", label.group(0))) and len(
        re.findall(r"[A-Za-z]{3,}", label.group(0))
    ):
        s = s[label.end() :]
    s = s.rstrip(".").strip()
    # "5 apples", "12 square units": drop trailing words after something numeric.
    m = _TRAILING_WORDS_RE.search(s)
    if m and m.start() > 0 and re.search(r"[\d}]", s[: m.start()]):
        words = re.findall(r"[A-Za-z]+", m.group(0))
        if not any(w.lower() in _MATH_WORDS for w in words):
            s = s[: m.start()].strip()
    s = _SPACE_GROUPS_RE.sub(lambda m: m.group(1) + m.group(2).replace(" ", ""), s) if not split_number else s
    euro = _EURO_RE.fullmatch(s)
    if euro:
        s = euro.group(1).replace(".", "") + "." + euro.group(2)
    attached = _ATTACHED_UNIT_RE.search(s)
    if attached and attached.start() > 0:
        s = s[: attached.start()].strip()
    if _THOUSANDS_RE.fullmatch(s) and not s.lstrip("-").startswith("0,"):
        s = s.replace(",", "")
    comma = _DECIMAL_COMMA_RE.fullmatch(s)
    if comma and (len(comma.group(3)) not in (1, 3) or comma.group(2) == "0"):
        s = f"{comma.group(1)}{comma.group(2)}.{comma.group(3)}"
    mixed = _MIXED_RE.fullmatch(s)
    if mixed:
        sign, whole, num, den = mixed.groups()
        if percent or split_number:
            rejected = True
        s = f"{'-' if sign == '-' else ''}({whole}+{num}/{den})"
    word = _WORD_NUMBERS.get(s.lower())
    if word is not None:  # "\\text{five}"
        s = word
    if "((" in s or "{{" in s or "[[" in s:
        s = collapse_redundant_brackets(s)
    dec = _DECIMAL_RE.fullmatch(s)
    decimals = len(dec.group(2)) if dec else None
    return NormalizedAnswer(
        text=s, percent=percent, decimals=decimals, joined_by_words=joined, rejected=rejected, degrees=degrees
    )


def decimal_comma_reading(text: str) -> str | None:
    """``3,4`` read as the decimal 3.4 (used only when the gold is a single number), else None."""
    comma = _DECIMAL_COMMA_RE.fullmatch(text)
    if comma and len(comma.group(3)) != 3:
        return f"{comma.group(1)}{comma.group(2)}.{comma.group(3)}"
    return None


_PART_LABEL_RE = re.compile(r"(?:^|(?<=[\s,;]))\(?([a-h]|i{1,3}|iv|vi{0,3})\)\s*")
_PART_ORDER = ("abcdefgh", ("i", "ii", "iii", "iv", "v", "vi", "vii", "viii"))


def labelled_parts(text: str) -> tuple[tuple[str, str], ...] | None:
    """``(a) 12, (b) 5`` / ``a) 12, b) 5`` -> (("a", "12"), ("b", "5")): an answer given as labelled parts
    (each label once, the labels together consecutive from (a) or (i), one at the start); None when ``text``
    is not such a list of at least two parts."""
    labels = list(_PART_LABEL_RE.finditer(text))
    if len(labels) < 2 or labels[0].start() != 0:
        return None
    names = [m.group(1) for m in labels]
    if not any(sorted(names) == sorted(order[: len(names)]) for order in _PART_ORDER):
        return None  # labels each once, consecutive from (a) / (i), in any written order
    parts = []
    for m, nxt in zip(labels, labels[1:] + [None]):
        body = text[m.end() : nxt.start() if nxt else len(text)].strip().strip(",;").strip()
        if not body:
            return None
        parts.append((m.group(1), body))
    return tuple(parts)


def split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and braces (``(1, 2), 3`` -> ``["(1, 2)", "3"]``)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return items


_CLOSER = {"(": ")", "[": "]", "{": "}"}


def collapse_redundant_brackets(s: str) -> str:
    """``((((2))))`` -> ``(2)``, ``{{{x}}}`` -> ``{x}``: a bracket pair whose only content is a pair of the same
    kind is redundant (the parser reads ``((a, b))`` as ``(a, b)`` and ``[[x]]`` as ``[x]``), so benign deep
    nesting parses within MAX_DEPTH. One linear pass; escaped ``\\{``/``\\}`` and unbalanced text are left alone."""
    stack: list[int] = []
    inner_open: dict[int, int] = {}  # close index -> open index, for every matched pair
    drop: set[int] = set()
    i, n = 0, len(s)
    while i < n:
        ch = s[i]
        if ch == "\\":
            i += 2
            continue
        if ch in _CLOSER:
            stack.append(i)
        elif ch in ")]}":
            if not stack or _CLOSER[s[stack[-1]]] != ch:
                return s
            start = stack.pop()
            first = start + 1
            while first < i and s[first] == " ":
                first += 1
            last = i - 1
            while last > start and s[last] == " ":
                last -= 1
            if inner_open.get(last) == first and s[first] == s[start]:
                drop.update((start, i))
            inner_open[i] = start
        i += 1
    if stack or not drop:
        return s
    return "".join(ch for k, ch in enumerate(s) if k not in drop)

