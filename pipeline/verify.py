"""Acceptance rules, as pure functions.

A run's output i predicts the position after its input i; the draft's guess
for that position is guesses[i] (None: there is none, the bonus position at
the end of the chain). Verification walks the outputs in order, each giving
one verified token, and stops at the first that refutes its guess: that
token replaces the guess and everything built on the guess is invalid.

Greedy and seeded requests: the target's token at each position is fixed
(argmax, or argmax(log p + g) with shared noise); a draft token is accepted
when it equals it. Unseeded sampling uses standard speculative sampling:

    x ~ q (draft), accept with probability min(1, p(x) / q(x)),
    else resample from max(p - q, 0) / sum(max(p - q, 0)).

A position with no draft token is sampled from p directly (the bonus token).
Either way the output follows p, the target's distribution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Verdict:
    token_ids: list[int]  # verified, in order: the accepted guesses, then the target's own token (if any)
    num_accepted: int  # the accepted guesses: token_ids[:num_accepted]
    is_rejected: bool  # the last token refuted its guess: the chain breaks after it


def verify(
    guesses: Sequence[int | None],
    draft_probs: Sequence[torch.Tensor | None],
    target_token_ids: Sequence[int] | None,
    target_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> Verdict:
    """guesses [n], draft_probs [n] (q per guess, None = a deterministic
    guess); the target's tokens [n] (greedy, seeded) or its probs [n, vocab]
    (unseeded sampling, drawing from `generator`)."""
    token_ids: list[int] = []
    for i, guess in enumerate(guesses):
        if target_token_ids is not None:
            token = target_token_ids[i]
        else:
            token = speculative_sample(target_probs[i], guess, draft_probs[i], generator)
        token_ids.append(token)
        if guess is None:  # the bonus position: nothing to check
            return Verdict(token_ids, i, is_rejected=False)
        if token != guess:
            return Verdict(token_ids, i, is_rejected=True)
    return Verdict(token_ids, len(token_ids), is_rejected=False)  # every guess agreed


def speculative_sample(
    p: torch.Tensor,
    proposal: int | None,
    q: torch.Tensor | None,
    generator: torch.Generator | None,
) -> int:
    """p [vocab]: target probs; proposal: the draft token here (or None);
    q [vocab]: the draft's probs, None meaning a deterministic guess (q = one-hot)."""
    if proposal is None:
        return _sample(p, generator)
    q_x = 1.0 if q is None else float(q[proposal])
    p_x = float(p[proposal])
    if q_x > 0 and torch.rand((), generator=generator).item() < min(1.0, p_x / q_x):
        return proposal
    if q is None:
        residual = p.clone()
        residual[proposal] = 0.0
    else:
        residual = torch.clamp(p - q, min=0.0)
    if float(residual.sum()) <= 0.0:  # p == q: any rejection is a measure-zero event
        return _sample(p, generator)
    return _sample(residual, generator)


def _sample(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))
