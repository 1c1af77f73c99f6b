"""Incremental detokenization that never leaks a stop string.

Text is released as tokens arrive, except (a) a trailing incomplete UTF-8
character and (b) a trailing piece that could still become a stop string.
When a stop string appears, the text ends just before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # released so far
        self.is_stopped = False

    def add(self, token_id: int) -> str:
        """-> the text this token releases (may be empty)."""
        if self.is_stopped:
            return ""
        self.token_ids.append(token_id)
        full = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        stop_at = self._find_stop(full)
        if stop_at is not None:
            self.is_stopped = True
            return self._release(full[:stop_at])
        return self._release(full[: len(full) - self._held_back(full)])

    def flush(self) -> str:
        """At the end of generation: release what was held back."""
        if self.is_stopped or not self.token_ids:
            return ""
        return self._release(self._tokenizer.decode(self.token_ids, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        delta = upto[len(self.text):]
        if len(upto) > len(self.text):
            self.text = upto
        return delta

    def _find_stop(self, full: str) -> int | None:
        # A stop string can only begin where text was not yet released, minus its length.
        search_from = max(0, len(self.text) - self._longest_stop)
        hits = [i for s in self._stop if (i := full.find(s, search_from)) != -1]
        return min(hits) if hits else None

    def _held_back(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of a stop string."""
        for length in range(min(self._longest_stop - 1, len(full)), 0, -1):
            tail = full[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
