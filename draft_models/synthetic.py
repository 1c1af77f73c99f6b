"""`--draft synthetic:ALPHA`: an acceptance model, not a real draft.

Each guess is the target's own greedy token with probability ALPHA and a
wrong token otherwise (a run's guesses stop after the first wrong one), and
every guess reports confidence ALPHA. It lets the simulator sweep acceptance
rates that no draft on hand has. It computes its guesses with the whole
target, so it is only cheap where its cost is modelled (--simulate).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from compute.types import SamplingParams
from draft_models.base import DraftProposal
from draft_models.model_draft import ModelDraft

_GREEDY = SamplingParams()


class SyntheticDraft:
    is_free = False  # it stands for a real draft, whose time the simulator charges

    def __init__(self, oracle: ModelDraft, acceptance: float, vocab_size: int, seed: int = 0) -> None:
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        self.name = f"synthetic:{acceptance:g}"
        self.acceptance = acceptance
        self._oracle = oracle
        self._vocab_size = vocab_size
        self._rng = random.Random(seed)  # fixed: the same guesses on every run of a benchmark

    def propose(self, seq_id: int, token_ids: Sequence[int], max_tokens: int, sampling: SamplingParams,
                cutoff: float, generator: torch.Generator | None) -> DraftProposal:
        if max_tokens <= 0 or self.acceptance < cutoff:
            return DraftProposal()
        # Greedy guesses are one-hot, hence lossless under every acceptance rule.
        truth = self._oracle.propose(seq_id, token_ids, max_tokens, _GREEDY, 0.0, None).token_ids
        guesses = []
        for token in truth:
            if self._rng.random() < self.acceptance:
                guesses.append(token)
            else:
                guesses.append((token + 1) % self._vocab_size)
                break  # the run's later guesses are moot once one is wrong
        return DraftProposal(guesses, [None] * len(guesses))

    def release(self, seq_id: int) -> None:
        self._oracle.release(seq_id)
