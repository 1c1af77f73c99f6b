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
    # The draft's belief in each guess, in [0, 1] (a model's top probability,
    # n-gram match statistics): the coordinator calibrates it against what
    # the target accepts, and uses it only as far as it proves informative.
    confidences: list[float] = field(default_factory=list)


class DraftModel(Protocol):
    """Contract: propose(...) returns at most max_tokens guesses for the
    positions right after token_ids (fewer, even none, when it knows no
    more). Greedy requests get argmax guesses, seeded requests guesses under
    the same Gumbel noise as the target (sampling.choose_token), unseeded
    requests samples with their q. A draft may keep per-sequence state;
    release(seq_id) frees it. Called from one thread at a time (a drafter's).
    """

    name: str
    is_free: bool  # its guesses cost no compute (n-gram lookup, no draft)

    def propose(
        self,
        seq_id: int,
        token_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> DraftProposal: ...

    def release(self, seq_id: int) -> None: ...


class NoDraft:
    """`--draft none`: never guesses, so every mode decodes autoregressively."""

    name = "none"
    is_free = True

    def propose(self, seq_id, token_ids, max_tokens, sampling, generator) -> DraftProposal:
        return DraftProposal()

    def release(self, seq_id: int) -> None:
        pass
