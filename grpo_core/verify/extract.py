"""Finding the final answer span in a model response, and string-level normalization of that span.

Extraction order (first that applies wins; see :class:`ExtractConfig`):

1. the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (real brace matching; also the ``\\boxed 5`` form). If the
   last one is unterminated or longer than MAX_ANSWER_CHARS the response has no answer: a truncated
   final answer is not silently replaced by an earlier (abandoned) one;
2. the last "final answer is X" / "the answer is X" / "Answer: X" phrase (X runs to the end of the line or
   sentence);
3. the whole response, when it is short (a bare answer such as ``"42"`` or ``"$\\frac{1}{2}$"``);
4. optional fallbacks: the last ``$...$`` math span, the last number.

Every scan is linear in the response length; responses are cut to their last MAX_RESPONSE_CHARS.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

from grpo_core.verify.limits import MAX_ANSWER_CHARS, MAX_RESPONSE_CHARS


@dataclass(frozen=True)
class ExtractConfig:
    """Which extraction forms are accepted, in the order tried."""

    use_boxed: bool = True
    """Accept \\boxed{...} / \\fbox{...} (the last one decides)."""
    use_phrases: bool = True
    """Accept "the answer is X" / "final answer is X" / "Answer: X"."""
    bare_max_chars: int = 80
    """A response of at most this many characters (after stripping $ and spaces) is itself the answer; 0 disables."""
    fallback_last_math: bool = False
    """If nothing else matched, use the last $...$ span. Off by default: intermediate math is not an answer."""
    fallback_last_number: bool = False
    """If nothing else matched, use the last number in the response. Off by default for the same reason."""

    def __post_init__(self):
        if self.bare_max_chars < 0 or self.bare_max_chars > MAX_ANSWER_CHARS:
            raise ValueError(
                f"ExtractConfig.bare_max_chars must be in [0, {MAX_ANSWER_CHARS}], got {self.bare_max_chars}"
            )


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_PHRASE_RE = re.compile(
    r"(?:final\s+answer\s*\**\s*(?:is|:)|the\s+answer\s+is|answer\s*\**\s*:)[\s*]*(?::\s*)?",
    re.IGNORECASE,
)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_MATH_RE = re.compile(r"\$([^$]{1,%d})\$" % MAX_ANSWER_CHARS)


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last non-overlapping match of ``pattern`` in ``text`` (one linear scan, O(1) memory)."""
    tail = collections.deque(pattern.finditer(text), maxlen=1)
    return tail[0] if tail else None


def match_brace(text: str, open_pos: int, limit: int = MAX_ANSWER_CHARS) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped ``\\{``/``\\}`` skipped), or -1 if
    there is none within ``limit`` characters. O(limit)."""
    depth = 0
    end = min(len(text), open_pos + limit + 2)
    i = open_pos
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _last_boxed(text: str) -> tuple[bool, str | None]:
    """(found_any_box, content of the last box or None if that box is malformed / too long)."""
    last = _last_match(_BOX_RE, text)
    if last is None:
        return False, None
    i = last.end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        close = match_brace(text, i)
        if close < 0:
            return True, None
        return True, text[i + 1 : close]
    # "\boxed 5" form: the argument runs to the next space, "$" or end of line.
    m = re.match(r"[^\s$]{1,%d}" % MAX_ANSWER_CHARS, text[i : i + MAX_ANSWER_CHARS + 1])
    return True, (m.group(0) if m else None)


def _phrase_answer(text: str) -> str | None:
    last = _last_match(_PHRASE_RE, text)
    if last is None:
        return None
    rest = text[last.end() : last.end() + 4 * MAX_ANSWER_CHARS]
    rest = rest.split("\n", 1)[0]
    # Inside $...$ the span is the math; otherwise it ends at a sentence end ". " / final ".".
    m = re.match(r"\s*\$\$?([^$]+)\$", rest)
    if m:
        span = m.group(1)
    else:
        span = re.split(r"\.\s|\.$", rest, maxsplit=1)[0]
    span = span.strip().rstrip(".").strip()
    return span or None


def extract_span(response: str, config: ExtractConfig | None = None) -> str | None:
    """The raw final-answer span of ``response`` (before normalization), or None. Never raises on str."""
    config = config or ExtractConfig()
    if not isinstance(response, str):
        return None
    text = response[-MAX_RESPONSE_CHARS:]
    span = None
    if config.use_boxed:
        found, span = _last_boxed(text)
        if found:
            return _cap(span)
    if config.use_phrases:
        span = _phrase_answer(text)
        if span is not None:
            return _cap(span)
    stripped = text.strip().strip("$").strip()
    if config.bare_max_chars and 0 < len(stripped) <= config.bare_max_chars:
        return stripped
    if config.fallback_last_math:
        last = _last_match(_MATH_RE, text)
        if last is not None:
            return _cap(last.group(1).strip())
    if config.fallback_last_number:
        last = _last_match(_NUMBER_RE, text)
        if last is not None:
            return last.group(0)
    return None


def _cap(span: str | None) -> str | None:
    if span is None:
        return None
    span = span.strip()
    if not span or len(span) > MAX_ANSWER_CHARS:
        return None
    return span


def gold_span(gold: str) -> str | None:
    """The answer span of a gold label: the content of its last \\boxed{} if it has one, else all of it."""
    if not isinstance(gold, str):
        return None
    found, span = _last_boxed(gold[-MAX_RESPONSE_CHARS:])
    if found:
        return _cap(span)
    return _cap(gold.strip().strip("$"))
