"""The DraftModel protocol, shared by every draft."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from compute.types import SamplingParams


@dataclass(slots=True)
class DraftProposal:
    token_ids: list[int] = field(default_factory=list)
    # q per token [vocab], the distribution each token was drawn from; None for
    # a deterministic guess (n-gram), which verification treats as one-hot.
    probs: list[torch.Tensor | None] = field(default_factory=list)


class DraftModel(Protocol):
    """Contract: propose(...) returns at most max_tokens guesses for the
    positions right after token_ids, stopping early when its confidence (the
    top probability of its distribution) falls below `cutoff`. Greedy
    requests get argmax guesses, seeded requests guesses under the same
    Gumbel noise as the target (sampling.choose_token), unseeded requests
    samples with their q. A draft may keep per-sequence state; release(seq_id)
    frees it. Called from the coordinator's thread only.
    """

    name: str
    is_free: bool  # its guesses cost no compute (n-gram lookup, no draft)

    def propose(
        self,
        seq_id: int,
        token_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams,
        cutoff: float,
        generator: torch.Generator | None,
    ) -> DraftProposal: ...

    def release(self, seq_id: int) -> None: ...


class NoDraft:
    """`--draft none`: never guesses, so every mode decodes autoregressively."""

    name = "none"
    is_free = True

    def propose(self, seq_id, token_ids, max_tokens, sampling, cutoff, generator) -> DraftProposal:
        return DraftProposal()

    def release(self, seq_id: int) -> None:
        pass
