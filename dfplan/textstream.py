"""Streamed text with stop strings, for both runtimes (torch's dfplan/runtime, dfplan/lite).

Streaming decodes the row's generated ids and emits the new suffix; text that could still
change (a trailing U+FFFD from an unfinished UTF-8 sequence of a byte-level BPE) or that
could be the start of a stop string is held back until it is settled, so the concatenated
stream is exactly the non-streamed text.
"""
from __future__ import annotations


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """(text up to the earliest stop string, whether one occurred)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def settled_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be emitted now: not a trailing U+FFFD, not a possible stop prefix."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[n - k:n] == s[:k]:
                hold = max(hold, k)
                break
    return n - hold


class TextTracker:
    """Per-row decoded text during generation; stops rows at stop strings."""

    def __init__(self, tokenizer, batch: int, stops: tuple[str, ...], stream_row: int | None = None,
                 emit=None, eos_id: int | None = None):
        self.tok, self.stops, self.eos_id = tokenizer, stops, eos_id
        self.ids = [[] for _ in range(batch)]
        self.stopped = [False] * batch
        self.texts = [""] * batch
        self.emitted = 0
        self.stream_row, self.emit = stream_row, emit

    def __call__(self, nxt, t: int) -> bool:
        """nxt: the step's next ids, one per row (a tensor or a list); True when every row stopped."""
        vals = nxt.tolist() if hasattr(nxt, "tolist") else list(nxt)
        for i, v in enumerate(vals):
            if self.stopped[i]:
                continue
            if v == self.eos_id:             # the row ends here (other rows may go on)
                self.stopped[i] = True
                continue
            self.ids[i].append(v)
            text = self.tok.decode(self.ids[i])
            if self.stops:
                text, hit = cut_at_stop(text, self.stops)
                self.stopped[i] = hit
            self.texts[i] = text
            if i == self.stream_row and self.emit is not None:
                upto = len(text) if self.stopped[i] else settled_length(text, self.stops)
                if upto > self.emitted:
                    self.emit(text[self.emitted:upto])
                    self.emitted = upto
        return all(self.stopped)

    def flush(self, final_text: str) -> None:
        if self.emit is not None and len(final_text) > self.emitted:
            self.emit(final_text[self.emitted:])
            self.emitted = len(final_text)
