"""Stop-string detection on the host for the torch engine: the first token that completes a stop string.

Checks run every few decode steps over the tokens each row generated since its last check. Only a tail
window of tokens is decoded: as many tokens as the longest stop string has UTF-8 bytes (every token that
adds text adds at least one byte) plus 16 of slack for tokens that decode to nothing (skipped special
tokens) and for decoders that treat the first token specially. The per-token search runs only for rows
whose new tail contains a stop string at all, so a check costs about one short decode per active row.
"""
from __future__ import annotations

from torch import Tensor


class StopStringMatcher:
    """Per-slot token history and the scan that finds where a stop string is completed."""

    def __init__(self, tokenizer, stop_strings: list[str], rows: int):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.window = max(len(s.encode("utf-8")) for s in stop_strings) + 16
        self.history: list[list[int]] = [[] for _ in range(rows)]

    def reset(self, rows: list[int]) -> None:
        """Slots that start a new response forget the old one."""
        for b in rows:
            self.history[b] = []

    def _hit(self, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return any(s in text for s in self.stop_strings)

    def scan(self, tokens: Tensor, gen_len: list[int], rows: list[int]) -> list[tuple[int, int]]:
        """Scan the new tokens of `rows`.

        tokens: [B, max_new] long, the engine's per-slot response buffer (token i of slot b at [b, i]);
        gen_len: host copy of each slot's generated length. Returns (slot, length) for every slot whose
        response completes a stop string, length counting up to and including the completing token.
        """
        todo = [b for b in rows if gen_len[b] > len(self.history[b])]
        if not todo:
            return []
        lo = min(len(self.history[b]) for b in todo)
        hi = max(gen_len[b] for b in todo)
        new = tokens[todo, lo:hi].tolist()  # one device->host copy for all rows
        hits = []
        for b, row_new in zip(todo, new):
            history = self.history[b]
            start = len(history)
            history.extend(row_new[start - lo:gen_len[b] - lo])
            if not self._hit(history[max(0, start - self.window):]):
                continue
            for k in range(start, len(history)):
                if self._hit(history[max(0, k + 1 - self.window):k + 1]):
                    del history[k + 1:]
                    hits.append((b, k + 1))
                    break
        return hits
