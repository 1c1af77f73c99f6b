"""Prompt lookup: guess that the text continues as it did after the last
earlier occurrence of its final n tokens. No weights, no cost."""

from __future__ import annotations

from collections.abc import Sequence

from draft_models.base import DraftProposal


class NGramDraft:
    name = "ngram"
    is_free = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seq_id, token_ids: Sequence[int], max_tokens, sampling, cutoff, generator) -> DraftProposal:
        if max_tokens <= 0:
            return DraftProposal()
        tokens = list(token_ids)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            continuation = _continuation_after_last_match(tokens, n, max_tokens)
            if continuation:
                return DraftProposal(continuation, [None] * len(continuation))
        return DraftProposal()

    def release(self, seq_id: int) -> None:
        pass


def _continuation_after_last_match(tokens: list[int], n: int, max_tokens: int) -> list[int]:
    """Tokens that followed the latest earlier occurrence of tokens[-n:]."""
    suffix = tokens[-n:]
    for start in range(len(tokens) - n - 1, -1, -1):
        if tokens[start : start + n] == suffix:
            follow = tokens[start + n : start + n + max_tokens]
            if follow:
                return follow
    return []
