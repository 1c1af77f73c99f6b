"""Prompt lookup: guess that the text continues as it did after the last
earlier occurrence of its final n tokens (the longest n, up to max_ngram,
that occurs before). No weights, no cost.

Confidence comes from the match statistics: of the m earlier occurrences of
that n-gram, the share k/(m + 1) whose continuation agrees with the guesses
so far, times n / max_ngram (a longer match is better evidence). The
coordinator calibrates it against what the target accepts."""

from __future__ import annotations

from collections.abc import Sequence

from draft_models.base import DraftProposal


class NGramDraft:
    """name: ngram, or ngram+head:PATH for that hybrid's lookup (the head
    drafts on the last stage; the coordinator picks between the two)."""

    is_free = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, name: str = "ngram") -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.name = name

    def propose(self, seq_id, token_ids: Sequence[int], max_tokens, sampling, generator) -> DraftProposal:
        tokens = list(token_ids)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            starts = _earlier_occurrences(tokens, n)  # latest first
            if not starts:
                continue
            follow = tokens[starts[0] + n : starts[0] + n + max_tokens]
            confidences = []
            for i in range(len(follow)):
                agreeing = sum(tokens[s + n : s + n + i + 1] == follow[: i + 1] for s in starts)
                confidences.append(agreeing / (len(starts) + 1) * n / self.max_ngram)
            return DraftProposal(follow, [None] * len(follow), confidences)
        return DraftProposal()

    def release(self, seq_id: int) -> None:
        pass


def _earlier_occurrences(tokens: list[int], n: int) -> list[int]:
    """Starts of the earlier occurrences of tokens[-n:] that are followed by
    at least one token, latest first."""
    suffix = tokens[-n:]
    return [start for start in range(len(tokens) - n - 1, -1, -1) if tokens[start : start + n] == suffix]
