"""`--draft synthetic:ALPHA`: an acceptance model, not a real draft.

Each guess is the target's own greedy token with probability ALPHA and a
wrong token otherwise, decided by a hash of the position and the token, so
the same guesses come whatever the timing or the mode; every guess reports
confidence ALPHA. It lets the simulator sweep acceptance rates that no draft
on hand has. It computes its guesses with the whole target, so it is only
cheap where its cost is modelled (--simulate).
"""

from __future__ import annotations

import hashlib
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
        self._seed = seed

    def propose(self, seq_id: int, token_ids: Sequence[int], max_tokens: int, sampling: SamplingParams,
                generator: torch.Generator | None) -> DraftProposal:
        # Greedy guesses are one-hot, hence lossless under every acceptance rule.
        truth = self._oracle.propose(seq_id, token_ids, max_tokens, _GREEDY, None).token_ids
        guesses = [token if self._is_right(len(token_ids) + i, token) else (token + 1) % self._vocab_size
                   for i, token in enumerate(truth)]
        return DraftProposal(guesses, [None] * len(guesses), [self.acceptance] * len(guesses))

    def _is_right(self, position: int, token: int) -> bool:
        digest = hashlib.blake2b(f"{self._seed}:{position}:{token}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64 < self.acceptance

    def release(self, seq_id: int) -> None:
        self._oracle.release(seq_id)
