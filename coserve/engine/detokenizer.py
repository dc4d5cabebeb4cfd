"""Incremental detokenization with stop strings.

Text is decoded over a sliding window of tokens (prefix window + new tokens),
so multi-byte characters split across tokens are never emitted half-way, and
each step costs a few tokens rather than the whole output. When stop strings
are set, the last (longest stop - 1) characters are held back until it is
clear they do not start a stop string; the matched stop string is never sent.
"""

from __future__ import annotations

from coserve.engine.tokenizer import ModelTokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: ModelTokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # decoded so far (truncated at a matched stop string)
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Decode one more token; sets `stopped` when a stop string appears."""
        if self.stopped:
            return
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        search_from = max(0, len(self.text) - self.hold)
        self.text += new
        found = [at for at in (self.text.find(s, search_from) for s in self.stop) if at != -1]
        if found:
            self.text = self.text[: min(found)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """Text not yet handed out; holds back a possible stop-string start unless final."""
        end = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
