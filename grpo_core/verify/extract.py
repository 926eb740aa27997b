"""Finding the final answer span in a model response.

Extraction order (first that applies wins; each rule can be switched off in :class:`ExtractConfig`):

0. text after the first chat-template token (``<|im_end|>``, ``<|im_start|>``, ``<|endoftext|>``,
   ``<|eot_id|>``, ``</s>``, ..., or a blank line followed by ``Human:`` / ``User:``) is ignored: it is a
   hallucinated next turn, not the answer;
1. the LAST ``\\boxed{...}`` / ``\\fbox{...}`` (real brace matching; also the ``\\boxed 5`` form). Boxes that
   directly precede it, separated only by commas, "and"/"or", ``$``, ``\\(``/``\\)`` or spacing (``\\boxed{3},
   \\boxed{4}``), are joined into one list answer; when every joined box is preceded by a name (``$x_1 =
   \\boxed{2}$ and $x_2 = \\boxed{-4}$``) the names are kept (``x_1 = 2, x_2 = -4``). A response in labelled
   parts ("(a)", "(b)", ... or "(i)", "(ii)", ...; "Part (a)", a line starting "a)") whose every part holds a box
   (or a rule-2 phrase), the last box in the last part, answers ``(a) <last box of (a)>, (b) <last box of (b)>``.
   A last box left unclosed at the very end (``\\boxed{9``) answers its content when that is short, has no braces
   and holds a digit; any other unterminated or too long last box means no answer: a truncated final answer is
   not replaced by an earlier one;
2. (parts: as in rule 1, each part's phrase) the last "final answer is X" / "the answer is X" / "Answer: X" /
   "#### X" / "X is the answer" phrase (X runs to the end of the line or sentence; a clause after the value is
   dropped: "12 apples, since ..." is 12, "7 (because ...)" is 7; a math span followed in its sentence by
   "giving" / "which equals" / "=" and a value closing the sentence is not the answer, that value is: "the answer
   is $\\sum_k k$ evaluated, giving 12" is 12; if X is itself a sentence such as "The smallest $k$ is 27", rule 3
   is applied to it);
3. the final sentence (closing courtesy sentences such as "I hope it is correct." skipped): the math
   span it ends with (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``, newlines allowed inside), else the
   value after its last "is" / "are" / "equals" / "=" when that value is short and numeric-looking,
   else, in a concluding sentence ("Therefore/Thus/So/Hence ..."), its only number. Applies only when
   the response has prose around the answer; a response that is nothing but an answer is rule 4's;
4. the whole response, when it is short (``bare_max_chars``; a bare answer such as ``"42"``);
5. optional fallbacks: the last ``$...$`` math span anywhere, the last number.

Every scan is linear in the response length; responses are cut to their last MAX_RESPONSE_CHARS and
the sentence rules look only at the last SENTENCE_WINDOW characters.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass

from grpo_core.verify.limits import MAX_ANSWER_CHARS, MAX_LITERAL_CHARS, MAX_RESPONSE_CHARS

SENTENCE_WINDOW = 4000
"""The sentence rules (3) look at most this many characters back from the end of the response."""

@dataclass(frozen=True)
class ExtractConfig:
    """Which extraction forms are accepted, in the order tried."""

    use_boxed: bool = True
    """Accept \\boxed{...} / \\fbox{...} (the last one decides)."""
    use_phrases: bool = True
    """Accept "the answer is X" / "final answer is X" / "Answer: X"."""
    use_final_sentence: bool = True
    """Accept the answer stated by the final sentence (rule 3 of the module docstring)."""
    cut_at_template_tokens: bool = True
    """Ignore everything after the first chat-template token (``<|im_end|>``, ``<|im_start|>``, ...)."""
    join_adjacent_boxes: bool = True
    """``\\boxed{3}, \\boxed{4}`` is the list answer ``3, 4`` (boxes separated only by commas/and/or)."""
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
    r"(?:final\s+answer\s*\**\s*(?:is|:)|the\s+answer\s+is|answer\s*\**\s*:|^[ \t]*####)[ \t*]*(?::[ \t]*)?",
    re.IGNORECASE | re.MULTILINE,
)
_FINAL_PHRASE_RE = re.compile(r"final\s+answer\s*\**\s*(?:is|:)|the\s+answer\s+is", re.IGNORECASE)
_IS_THE_ANSWER_RE = re.compile(
    r"(\$[^$]{1,200}\$|\\\(.{1,200}?\\\)|[^\s$]{1,60})\s+is\s+(?:the|our)\s+(?:final\s+)?answer\b", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_MATH_RE = re.compile(r"\$([^$]{1,%d})\$" % MAX_ANSWER_CHARS)
_TEMPLATE_RE = re.compile(
    r"<\|(?:im_end|im_start|endoftext|eot_id|end_of_text|start_header_id|end|user|assistant|system)\|>"
    r"|</s>|<end_of_turn>|<start_of_turn>|<\uff5c(?:end\u2581of\u2581sentence|User|Assistant)\uff5c>"
    r"|\n\n(?:Human|User|USER):"
)
_BOX_GAP_RE = re.compile(
    r"(?:\s|\$|,|;|\\quad|\\qquad|\\[,;: ()]|\\text\{\s*(?:and|or|,)?\s*\}|\band\b|\bor\b|\\(?:text|mathrm)\{\s*\})*"
)
_LITERAL_RE = re.compile(r"[-+]?(?:\d+|\d{1,3}(?:[, ]\d{3})+)(?:\.\d+)?")
_BOILERPLATE_RE = re.compile(
    r"(?:[\s*]*(?:I hope (?:it|this|that) (?:is correct|helps)|Hope (?:this|it) helps|Let me know[^.!?\n]*"
    r"|Please let me know[^.!?\n]*|Feel free[^.!?\n]*|If you have any[^.!?\n]*|Thank you|Thanks|Good luck"
    r"|Is there anything else[^.!?\n]*)[.!?]?[\s*]*)+$",
    re.IGNORECASE,
)
_VERB_RE = re.compile(
    r"(?:\b(?:is|are|was|equals|equal to|be|becomes|gives|get|obtain|it's|that's)(?![\w'])|=|:"
    r"|\bby(?=\s*[\d.]+\s*\\?%))\s*",
    re.IGNORECASE,
)
_CONCLUSION_RE = re.compile(
    r"\s*(?:therefore|thus|so|hence|in conclusion|in total|finally|altogether|overall|consequently|in summary)\b",
    re.IGNORECASE,
)
_FILLER_RE = re.compile(
    r"\s*(?:therefore|thus|then|exactly|just|simply|precisely|now|still|also|clearly|indeed|found to be|"
    r"approximately|about|roughly)\s+",
    re.IGNORECASE,
)
_APPROX_GAP_RE = re.compile(
    r"[\s,;(]*(?:which is |or |i\.e\.,? |that is,? )?(?:approximately|about|roughly|around|\\approx|\u2248)\s*"
)
_NEXT_SPAN_RE = re.compile(r"[ \t]{0,8}(?:,|,?[ \t]{0,8}and|,?[ \t]{0,8}or)[ \t]{0,8}\$([^$\n]{1,%d})\$" % MAX_ANSWER_CHARS)
_LIST_GAP_RE = re.compile(r"\s*(?:,|,?\s*and|,?\s*or)\s*")
_CLAUSE_RE = re.compile(r"(?:[,;:]\s*|\s)((?:so|therefore|thus|hence)\b)", re.IGNORECASE)
_ABBREVIATION_RE = re.compile(r"\b(?:i\.e|e\.g|approx|vs|cf|resp|etc)\.", re.IGNORECASE)
_CHOICE_VALUE_RE = re.compile(r"\(?[A-J]\)")
_TRAILING_CLAUSE_RE = re.compile(
    r"[,;][ \t]{0,3}(?:because|since|as|so|which|where|when|if|for|but|while|given|then|this|that|it|we|i|they|"
    r"here|note|check|thus|hence|therefore|and (?:the|we|so|then|it|this|that|there|thus|hence))(?![A-Za-z])"
    r"|(?<=\s)(?:because|since|which|where|as|for)(?![A-Za-z])|(?<=\s)\((?=[A-Za-z]{3,}\b)",
    re.IGNORECASE,
)
_LATER_VERB_RE = re.compile(
    r"(?:giving|yielding|which (?:gives|equals|is|evaluates to|is equal to)|to get|we get|that gives|this gives|"
    r"equal to|equals|=)[ \t]{0,3}",
    re.IGNORECASE,
)
_CLOSING_VALUE_RE = re.compile(
    r"(\$[^$\n]{1,200}\$|[-+\u2212]?\d[\d,]{0,40}(?:\.\d{1,40})?(?:/\d{1,20})?)[ \t]{0,3}(?:[.!](?:\s|$)|$)"
)


def _later_value(sentence_rest: str) -> str | None:
    """The value that closes the sentence after a verb such as "giving" / "which equals" / "=" (the last such
    verb of the sentence), or None. ``sentence_rest`` is what follows the first math span of the phrase."""
    sentence = re.split(r"\.\s|\n", sentence_rest, maxsplit=1)[0]
    verb = _last_match(_LATER_VERB_RE, sentence)
    if verb is None or len(sentence) - verb.end() > 210:
        return None
    value = _CLOSING_VALUE_RE.match(sentence, verb.end())
    if value is None or sentence[value.end() :].strip(" .!"):
        return None
    return value.group(1).strip("$").strip() or None


def _cut_trailing_clause(value: str) -> str:
    """``12 apples, since each box holds 3`` -> ``12 apples``: a value followed by a clause about it. Only
    cuts when what precedes the clause is short and holds a digit (words after it are units, not prose)."""
    cut = _TRAILING_CLAUSE_RE.search(value)
    head = value[: cut.start()].rstrip() if cut is not None else ""
    if not head:
        return value
    if "$" in head and head.count("$") % 2:
        return value  # the clause word sits inside math
    if re.search(r"\d", head) and len(re.findall(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", head))) <= 2:
        return head.strip()
    return value
_NUM_TOKEN_RE = re.compile(r"[-+\u2212]?\$?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?%?")


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last non-overlapping match of ``pattern`` in ``text`` (one linear scan, O(1) memory)."""
    tail = collections.deque(pattern.finditer(text), maxlen=1)
    return tail[0] if tail else None


_BRACE_CHARS_RE = re.compile(r"[\\{}]")


def match_brace(text: str, open_pos: int, limit: int = MAX_ANSWER_CHARS) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` (escaped ``\\{``/``\\}`` skipped), or -1 if
    there is none within ``limit`` characters. O(limit), visiting only backslashes and braces."""
    depth = 0
    end = min(len(text), open_pos + limit + 2)
    skip_to = -1
    for m in _BRACE_CHARS_RE.finditer(text, open_pos, end):
        i = m.start()
        if i < skip_to:
            continue
        ch = text[i]
        if ch == "\\":
            skip_to = i + 2
            continue
        if ch == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return i
    return -1


def cut_at_template_token(text: str) -> str:
    """``text`` up to the first chat-template token that follows some content (leading tokens skipped)."""
    pos = 0
    for m in _TEMPLATE_RE.finditer(text):
        if text[pos : m.start()].strip():
            return text[: m.start()]
        pos = m.end()
    return text[pos:] if pos else text


def _box_at(text: str, m: re.Match, limit: int) -> tuple[str | None, int]:
    """(content of the box whose command is matched by ``m`` or None if malformed, index after it)."""
    i = m.end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        close = match_brace(text, i, limit)
        if close < 0:
            return None, len(text)
        return text[i + 1 : close], close + 1
    # "\boxed 5" form: the argument runs to the next space, "$" or end of line.
    arg = re.match(r"[^\s$]{1,%d}" % MAX_ANSWER_CHARS, text[i : i + MAX_ANSWER_CHARS + 1])
    return (arg.group(0), i + arg.end()) if arg else (None, i)


PART_WINDOW = 20_000
"""Labelled parts ``(a) ... (b) ...`` are looked for in at most this many characters at the end of the response."""
_PART_HEAD_RE = re.compile(
    r"(?:^|(?<=[\s*>#_]))(?:[Pp]art\s*)?\(([a-h]|i{1,3}|iv|vi{0,3})\)"
    r"|^[ \t*#>_]*(?:[Pp]art\s+)?([a-h])(?:\)|\*\*|:)",
    re.MULTILINE,
)
_PART_ORDERS = ("abcdefgh", ("i", "ii", "iii", "iv", "v", "vi", "vii", "viii"))


def _part_answers(text: str, last_box: int | None) -> str | None:
    """``(a) ... \\boxed{12} ... (b) ... \\boxed{5}`` -> ``(a) 12, (b) 5``: a response in labelled parts
    ((a), (b), ... or (i), (ii), ...; "Part (a)", a line starting "a)") whose every part states an answer (its
    last box, else its "the answer is" phrase); with ``last_box`` (the response's last box) in the last part.
    None otherwise."""
    start = max(0, len(text) - PART_WINDOW)
    if text.find(")", start) < 0 and text.find("**", start) < 0 and text.find(":", start) < 0:
        return None  # no part label can be there: skip the scan
    heads = [(m.group(1) or m.group(2), m) for m in _PART_HEAD_RE.finditer(text, start)]
    if len(heads) < 2:
        return None
    for order in _PART_ORDERS:
        firsts = [k for k, (name, _) in enumerate(heads) if name == order[0]]
        for k in reversed(firsts[-5:]):  # a later "(a)" may be a reference back ("as in (a)")
            chosen, expected = [heads[k][1]], 1
            for name, m in heads[k + 1 :]:
                if expected < len(order) and name == order[expected]:
                    chosen.append(m)
                    expected += 1
                elif name not in order[:expected]:
                    break
            else:
                answer = _answers_of_parts(text, chosen, order, last_box)
                if answer is not None:
                    return answer
    return None


def _answers_of_parts(text: str, heads: list, order, last_box: int | None) -> str | None:
    if len(heads) < 2 or (last_box is not None and heads[-1].end() > last_box):
        return None
    answers = []
    for j, head in enumerate(heads):
        end = heads[j + 1].start() if j + 1 < len(heads) else len(text)
        segment = text[head.end() : end]
        box = _last_match(_BOX_RE, segment)
        if box is not None:
            content, after = _box_at(text, _BOX_RE.match(text, head.end() + box.start()), MAX_ANSWER_CHARS)
            if content is None or after > end:
                return None
        elif _PHRASE_RE.search(segment):
            content = _phrase_answer(segment)
            if content is None:
                return None
        else:
            return None
        answers.append(f"({order[j]}) {content.strip()}")
    return ", ".join(answers)


_BOX_LABEL_RE = re.compile(r"(?<![A-Za-z\\])([A-Za-z](?:_\{?[A-Za-z0-9]{1,8}\}?)?)\s*=\s*(?:\\\(|\$)?\s*$")
_UNCLOSED_TAIL_RE = re.compile(r"\s*\{([^$\n]{1,100}?)\s*(?:\$\$?|\\\]|\\\))?[\s.]*")


def _unclosed_box(text: str, m: re.Match) -> str | None:
    """``... \\boxed{9`` / ``$\\boxed{9$.`` at the very end: the box's closing brace was left out. Its content
    is the answer when it is short, on one line, without braces and holds a digit; a tail with groups
    (``\\boxed{\\frac{1}{2}``: was it ``{25}``?) or a long one is a truncated answer, and no answer."""
    if len(text) - m.end() > 400:
        return None
    tail = _UNCLOSED_TAIL_RE.fullmatch(text, m.end())
    if tail is None:
        return None
    content = tail.group(1)
    return content if "{" not in content and "}" not in content and re.search(r"\d", content) else None


def _last_boxed(text: str, join: bool = False) -> tuple[bool, str | None]:
    """(found_any_box, content of the last box or None if that box is malformed / too long). With
    ``join``, boxes directly before the last one (only commas/and/or/$/spacing between) are joined into
    a comma list; repeated identical contents count once."""
    last = _last_match(_BOX_RE, text)
    if last is None:
        return False, None
    content, _ = _box_at(text, last, MAX_LITERAL_CHARS)
    if content is None:
        content = _unclosed_box(text, last)
    if content is None or not join:
        return True, content
    parts = _part_answers(text, last.start())
    if parts is not None:
        return True, parts
    parts, start = [content], last.start()
    labels = [_BOX_LABEL_RE.search(text, max(0, start - 30), start)]
    while len(parts) < 20:
        prev = max(text.rfind("\\boxed", max(0, start - 2 * MAX_ANSWER_CHARS), start),
                   text.rfind("\\fbox", max(0, start - 2 * MAX_ANSWER_CHARS), start))
        if prev < 0:
            break
        m = _BOX_RE.match(text, prev)
        if m is None:
            break
        prev_content, after = _box_at(text, m, MAX_ANSWER_CHARS)
        gap_end = labels[-1].start() if labels[-1] is not None and labels[-1].start() >= after else start
        if prev_content is None or after > start or gap_end - after > 40 or not _BOX_GAP_RE.fullmatch(text, after, gap_end):
            break
        parts.append(prev_content)
        start = prev
        labels.append(_BOX_LABEL_RE.search(text, max(0, start - 30), start))
    if len(parts) > 1 and all(label is not None for label in labels):
        # "$x_1 = \\boxed{2}$ and $x_2 = \\boxed{-4}$": the names belong to the values
        parts = [f"{label.group(1)} = {part.strip()}" for label, part in zip(labels, parts)]
    unique = list(dict.fromkeys(p.strip() for p in reversed(parts)))
    return True, ", ".join(unique)


def _math_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of the ``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]`` spans of ``text``, left to
    right; escaped ``\\$`` is not a delimiter. Linear in len(text)."""
    spans, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt in "[(":
                closer = "\\]" if nxt == "[" else "\\)"
                j = text.find(closer, i + 2)
                if j < 0:
                    return spans
                if nxt == "[" or "\n" not in text[i + 2 : j]:  # inline math does not span lines
                    spans.append((i, j + 2, text[i + 2 : j]))
                i = j + 2
                continue
            i += 2
            continue
        if ch == "$":
            delim = "$$" if text.startswith("$$", i) else "$"
            j = i + len(delim)
            while True:
                j = text.find(delim, j)
                if j < 0:
                    return spans
                if text[j - 1] != "\\":
                    break
                j += 1
            if delim == "$$" or "\n" not in text[i + 1 : j]:  # inline math does not span lines
                spans.append((i, j + len(delim), text[i + len(delim) : j]))
            i = j + len(delim)
            continue
        i += 1
    return spans


def _has_prose(text: str) -> bool:
    return re.search(r"[A-Za-z]{2,}", text) is not None


def _sentence_answer(text: str, require_prose: bool = True) -> str | None:
    """The answer stated by the final sentence of ``text`` (rule 3), or None."""
    tail = text[-SENTENCE_WINDOW:]
    spans = _math_spans(tail)
    masked = list(tail)
    for a, b, _ in spans:
        masked[a:b] = "\x00" * (b - a)
    masked = "".join(masked)
    end = len(masked.rstrip())
    window = max(0, end - 400)  # courtesy sentences are short; a bounded window keeps the regex linear
    cut = _BOILERPLATE_RE.search(masked, window, end)
    end = cut.start() if cut else end
    while end > 0 and masked[end - 1] in " \t\r\n.!;,*":
        end -= 1
    if end == 0:
        return None
    head = masked[:end]
    dots = _ABBREVIATION_RE.sub(lambda m: m.group(0).replace(".", "_"), head[-600:])  # "i.e." ends no sentence
    dots = head[: len(head) - len(dots)] + dots
    bound = max(dots.rfind(". "), dots.rfind(".\n"), dots.rfind("\n"), dots.rfind("! "), dots.rfind("? "))
    begin = bound + 1
    sentence_spans = [(a, b, c) for a, b, c in spans if a >= begin and b <= end]

    def found(a: int, b: int, value: str) -> str | None:
        outside = tail[:a] + " " + tail[b:]
        for sa, sb, _ in spans:  # math elsewhere is not prose
            if sb <= a or sa >= b:
                outside = outside.replace(tail[sa:sb], " ")
        if require_prose and not _has_prose(outside):
            return None
        value = value.strip().strip("*").strip()
        return value or None

    if sentence_spans and sentence_spans[-1][1] == end:
        k = len(sentence_spans) - 1
        while k > 0 and _APPROX_GAP_RE.fullmatch(tail, sentence_spans[k - 1][1], sentence_spans[k][0]):
            k -= 1  # "$\\sqrt{2}$, approximately $1.414$": the exact value is the answer
        first = k
        while first > 0 and _LIST_GAP_RE.fullmatch(tail, sentence_spans[first - 1][1], sentence_spans[first][0]):
            first -= 1  # "$x = 1$ and $x = 4$": a list of answers
        if first < k:
            contents = [c for _, _, c in sentence_spans[first : k + 1]]
            return found(sentence_spans[first][0], sentence_spans[k][1], ", ".join(contents))
        a, b, content = sentence_spans[k]
        return found(a, b, content)
    verb = _last_match(_VERB_RE, head[begin:])
    if verb is not None:
        a = begin + verb.end()
        b = end  # the value must close the sentence: "We get 12 apples, then 13 pears; ..." states nothing
        filler = _FILLER_RE.match(tail, a, b)
        if filler:
            a = filler.end()
        raw = tail[a:b].strip()
        if raw and len(raw) <= 200:
            masked_raw = head[a:b]
            words = [w for w in re.findall(r"[A-Za-z]{2,}", masked_raw.replace("\x00", " "))]
            raw = raw.strip("*").strip()
            cut = _cut_trailing_clause(raw)
            if cut != raw:
                masked_raw, raw = masked_raw[: len(cut)], cut
                words = [w for w in re.findall(r"[A-Za-z]{2,}", masked_raw.replace("\x00", " "))]
            if _CHOICE_VALUE_RE.fullmatch(raw):
                return found(a, b, raw)
            if (re.search(r"\d", raw) or "\x00" in masked_raw) and len(words) <= 3 and re.match(
                r"[-+\u2212(\\$\d.|]", raw
            ):
                return found(a, b, raw.strip("$").strip() if raw.count("$") == 2 else raw)
    sentence = head[begin:]
    clause = _last_match(_CLAUSE_RE, sentence)
    if clause is not None:  # "But wait, he gave 2 away, so he has 8 left": the concluding clause
        begin += clause.start(1)
        sentence = head[begin:]
        sentence_spans = [(a, b, c) for a, b, c in spans if a >= begin and b <= end]
    if _CONCLUSION_RE.match(sentence):
        numbers = list(_NUM_TOKEN_RE.finditer(sentence.replace("\x00", " ")))
        if len(sentence_spans) == 1 and not numbers:
            a, b, content = sentence_spans[0]
            return found(a, b, content)
        if len(numbers) == 1 and not sentence_spans:
            m = numbers[0]
            return found(begin + m.start(), begin + m.end(), m.group(0))
    return None


def _phrase_answer(text: str) -> str | None:
    last = _last_match(_PHRASE_RE, text)
    is_ans = _last_match(_IS_THE_ANSWER_RE, text[-SENTENCE_WINDOW:])
    offset = max(0, len(text) - SENTENCE_WINDOW)
    if is_ans is not None and (last is None or offset + is_ans.start() > last.end()):
        span = is_ans.group(1)
        if span.startswith("$"):
            span = span.strip("$")
        elif span.startswith("\\("):
            span = span[2:-2]
        return span.strip().strip("*").strip() or None
    if last is None:
        return None
    rest = text[last.end() : last.end() + MAX_LITERAL_CHARS + 100].lstrip(" \t*")
    for opener, closer in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if rest.startswith(opener):
            j = rest.find(closer, len(opener))
            if j > 0:
                parts = [rest[len(opener) : j].strip()]
                after = j + len(closer)
                while len(parts) < 10:  # "the answer is $a=2$, $b=3$": the listed spans together
                    more = _NEXT_SPAN_RE.match(rest, after)
                    if more is None:
                        break
                    parts.append(more.group(1).strip())
                    after = more.end()
                later = _later_value(rest[after : after + 400]) if len(parts) == 1 else None
                if later is not None:  # "the answer is $\\sum_k k$ evaluated, giving 12": the value closing it
                    return later
                return ", ".join(p for p in parts if p) or None
            break
    line = rest.lstrip().split("\n", 1)[0]
    m = re.match(r"\s*\$\$?([^$]+)\$", line)
    if m:
        span = m.group(1)
    else:
        span = re.split(r"\.\s|\.$", line, maxsplit=1)[0]
    span = span.strip().strip("*").rstrip(".").strip()
    if span.startswith(('\\"', '"')) and span.endswith('"'):  # The final answer is "$12$ and $13$".
        span = span.lstrip("\\").strip('"').rstrip("\\").strip()
    if not span:
        return None
    span = _cut_trailing_clause(span)
    words = re.findall(r"[A-Za-z]{2,}", re.sub(r"\$[^$]*\$|\\[A-Za-z]+", " ", span))
    if len(words) >= 3:  # "The smallest $k$ is 27": the phrase introduces a sentence
        inner = _sentence_answer(span, require_prose=False)
        if inner is not None:
            return inner
        numbers = _NUM_TOKEN_RE.findall(span)
        if len(numbers) == 1 and "$" not in span:  # "Final Answer: Jane started growing it 3 hours ago."
            return numbers[0]
    return span


def extract_span(response: str, config: ExtractConfig | None = None) -> str | None:
    """The raw final-answer span of ``response`` (before normalization), or None. Never raises on str."""
    config = config or ExtractConfig()
    if not isinstance(response, str):
        return None
    text = response[-MAX_RESPONSE_CHARS:]
    if config.cut_at_template_tokens:
        text = cut_at_template_token(text)
    span = None
    if config.use_boxed:
        found, span = _last_boxed(text, config.join_adjacent_boxes)
        if found:
            later = _last_match(_FINAL_PHRASE_RE, text[-SENTENCE_WINDOW:]) if config.use_phrases else None
            last_box = text.rfind("\\boxed")
            if later is not None and max(0, len(text) - SENTENCE_WINDOW) + later.start() > max(last_box, text.rfind("\\fbox")):
                # "... \boxed{255} ... Final Answer: The final answer is $10,455$": the later statement wins
                phrase = _phrase_answer(text)
                if phrase is not None:
                    return _cap(phrase)
            return _cap(span)
    if config.use_phrases:
        span = _part_answers(text, None) if config.join_adjacent_boxes else None
        span = span if span is not None else _phrase_answer(text)
        if span is not None:
            return _cap(span)
    if config.use_final_sentence:
        span = _sentence_answer(text)
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
    """The stripped span, or None when empty or too long. A plain number literal may be up to
    MAX_LITERAL_CHARS long (it compares in linear time); anything else up to MAX_ANSWER_CHARS."""
    if span is None:
        return None
    span = span.strip()
    if not span:
        return None
    if len(span) > MAX_ANSWER_CHARS and (len(span) > MAX_LITERAL_CHARS or not _LITERAL_RE.fullmatch(span)):
        return None
    return span


def gold_span(gold: str) -> str | None:
    """The answer span of a gold label: the content of its last \\boxed{} (adjacent boxes joined) if it has
    one; for a long worked solution without a box, the answer it states; else all of it."""
    if not isinstance(gold, str):
        return None
    found, span = _last_boxed(gold[-MAX_RESPONSE_CHARS:], join=True)
    if found:
        return _cap(span)
    if len(gold) > 200 and _has_prose(gold):  # a worked solution given as the gold: its stated answer
        stated = extract_span(gold, ExtractConfig(bare_max_chars=0))
        if stated is not None:
            return stated
    return _cap(gold.strip().strip("$"))
