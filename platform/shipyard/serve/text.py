"""A choice's text as its tokens arrive: what is safe to send now, and where a stop string ends it.

The whole answer is decoded again at every step (answers are short next to the cost of a
decode step) and only the part no later token can change is sent: a trailing U+FFFD may be
the first bytes of a character still arriving, and a tail that begins one of the stop strings
may become that stop string. A streamed answer is the concatenation of these parts, so it
is the non-streamed answer, character for character.
"""

from __future__ import annotations

from collections.abc import Sequence

from shipyard.data.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class TextAssembler:
    """Tokens in, text out, for one choice."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.sent = ""  # the text handed out so far
        self.hit_stop = False  # a stop string ended the text

    def add(self, tokens: Sequence[int]) -> str:
        """The new text that `tokens` make safe to send ('' if none yet, or after a stop)."""
        if self.hit_stop:
            return ""
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        cut = self._stop_at(text)
        if cut is not None:
            self.hit_stop = True
            return self._send(text[:cut])
        ready = len(text.rstrip(REPLACEMENT))
        ready -= self._stop_prefix(text[:ready])
        return self._send(text[:ready])

    def finish(self) -> str:
        """Whatever was held back, once no token will follow."""
        if self.hit_stop:
            return ""
        return self._send(self.tokenizer.decode(self.tokens))

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent):  # a decoder that rewrote what it gave: wait
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new

    def _stop_at(self, text: str) -> int | None:
        """Where the earliest stop string begins in `text`, or None."""
        found = [index for stop in self.stop if (index := text.find(stop)) >= 0]
        return min(found) if found else None

    def _stop_prefix(self, text: str) -> int:
        """How many of `text`'s last characters begin a stop string (and so wait)."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
