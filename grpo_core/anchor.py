"""Anchor positions for Hidden-Align (docs/algorithms.md §4).

The anchor of a response is the position immediately before the first token of the *last* occurrence of
the answer marker (default ``\\boxed{``) in the decoded response: the hidden state there is the one that
predicts the marker. The marker may be a single token (the tiny tokenizer) or span several tokens, and a
token may hold text before the marker too (BPE); the anchor is then the position before the token that
holds the marker's first character.

Mapping characters back to tokens decodes each token about twice in small windows (incremental
detokenization with a prefix window, so multi-byte characters split across byte-level tokens come out
whole), never whole prefixes: O(T) work for a response of T tokens. Two shortcuts avoid even that: a
response whose full decode lacks the marker has no anchor, and when the marker is one token, the last
occurrence of that token id is checked with a single suffix decode.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import List, Optional, Sequence, Tuple

_REPLACEMENT = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def token_char_ends(response_ids: Sequence[int], tokenizer) -> Tuple[str, List[int]]:
    """Incrementally decode response_ids; return (text, ends) where ends[i] = len(text) once token i is read.

    Characters are attributed to the token that completes them (a UTF-8 character split across byte
    tokens belongs to its last byte's token). Each decode covers a window of a few tokens."""
    text_parts: List[str] = []
    length = 0
    ends: List[int] = []
    prefix_offset = read_offset = 0
    prefix_text = ""
    for i in range(len(response_ids)):
        new_text = _decode(tokenizer, response_ids[prefix_offset:i + 1])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            piece = new_text[len(prefix_text):]
            text_parts.append(piece)
            length += len(piece)
            # Keep the last completed token as context: decoders may render a token differently at the
            # very start of a decode call (e.g. a stripped leading space).
            prefix_offset, read_offset = read_offset, i + 1
            prefix_text = _decode(tokenizer, response_ids[prefix_offset:read_offset])
        ends.append(length)
    return "".join(text_parts), ends


class _MarkerInfo:
    """The marker and, when it is exactly one token, that token's id."""

    def __init__(self, tokenizer, marker: str):
        if not isinstance(marker, str) or not marker:
            raise ValueError(f"find_anchor: marker must be a non-empty string, got {marker!r}")
        self.marker = marker
        ids = list(tokenizer.encode(marker))
        self.single_id: Optional[int] = None
        if len(ids) == 1 and _decode(tokenizer, ids) == marker:
            self.single_id = ids[0]


def _find(response_ids: Sequence[int], tokenizer, info: _MarkerInfo) -> Optional[int]:
    ids = list(response_ids)
    if not ids or info.marker not in _decode(tokenizer, ids):
        return None
    if info.single_id is not None and info.single_id in ids:
        k = len(ids) - 1 - ids[::-1].index(info.single_id)
        # The last marker token starts the last occurrence unless the text after it holds another one.
        if _decode(tokenizer, ids[k:]).rfind(info.marker) == 0:
            return k - 1 if k > 0 else None
    text, ends = token_char_ends(ids, tokenizer)
    pos = text.rfind(info.marker)
    if pos < 0:
        return None
    first = bisect_right(ends, pos)  # first token whose text reaches past character `pos`
    return first - 1 if first > 0 else None


def find_anchor(response_ids: Sequence[int], tokenizer, marker: str = "\\boxed{") -> Optional[int]:
    """Index into response_ids just before the first token of the last `marker` occurrence, else None.

    Args:
        response_ids: token ids of the generated response (no prompt).
        tokenizer: has decode(ids, skip_special_tokens=False) -> str and encode(text) -> list[int].
        marker: the answer marker text.
    Returns None when the marker does not occur or its first token is at position 0 (no position before).
    """
    return _find(response_ids, tokenizer, _MarkerInfo(tokenizer, marker))


def find_anchors(batch_response_ids: Sequence[Sequence[int]], tokenizer,
                 marker: str = "\\boxed{") -> List[Optional[int]]:
    """find_anchor for each response of a batch (the marker is tokenized once)."""
    info = _MarkerInfo(tokenizer, marker)
    return [_find(ids, tokenizer, info) for ids in batch_response_ids]
