"""Acceptance rules, as pure functions.

Greedy and seeded requests: the target's token at each position is fixed
(argmax, or argmax(log p + g) with shared noise); a draft token is accepted
when it equals it. Unseeded sampling uses standard speculative sampling:

    x ~ q (draft), accept with probability min(1, p(x) / q(x)),
    else resample from max(p - q, 0) / sum(max(p - q, 0)).

A position with no draft token is sampled from p directly (the bonus token).
Either way the output follows p, the target's distribution.
"""

from __future__ import annotations

import torch


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
