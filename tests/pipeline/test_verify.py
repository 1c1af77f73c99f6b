"""Verification (pipeline/verify.py): known target tokens and scripted
guesses for the deterministic cases, as vLLM's rejection-sampler tests do;
statistical tests that speculative sampling keeps the target's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compute.sampling import target_tokens
from compute.types import SamplingParams
from pipeline.verify import Verdict, speculative_sample, verify
from tests.helpers import P, Q, assert_follows


def one_hot_logits(token_ids: list[int], vocab: int = 10) -> torch.Tensor:
    """Logits [n, vocab] whose argmax is each given token."""
    logits = torch.zeros(len(token_ids), vocab)
    logits[torch.arange(len(token_ids)), token_ids] = 5.0
    return logits


@pytest.mark.parametrize("guesses,target,expected", [
    # every guess agrees, then the bonus token where no guess follows
    ([5, 7, None], [5, 7, 9], Verdict([5, 7, 9], 2, is_rejected=False)),
    # the first guess is wrong: the target's own token, and the chain breaks
    ([5, 7, None], [4, 7, 9], Verdict([4], 0, is_rejected=True)),
    # the second is wrong
    ([5, 7, None], [5, 8, 9], Verdict([5, 8], 1, is_rejected=True)),
    # the last guess is the next run's first token: agreeing, the chain goes on
    ([5, 7], [5, 7], Verdict([5, 7], 2, is_rejected=False)),
    # ... or refuted at the boundary
    ([5, 7], [5, 6], Verdict([5, 6], 1, is_rejected=True)),
    # a lone canonical run: one token, no guess
    ([None], [3], Verdict([3], 0, is_rejected=False)),
])
def test_greedy_verdicts(guesses, target, expected):
    target_ids = target_tokens(one_hot_logits(target), SamplingParams(), first_position=0)
    assert verify(guesses, [None] * len(guesses), target_ids, None, None) == expected


def test_unseeded_verdicts_with_certain_targets():
    """p one-hot on the guess: always accepted; p zero at the guess: always
    refuted, and the replacement is drawn from the residual."""
    generator = torch.Generator().manual_seed(0)
    sure = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    for _ in range(50):
        assert verify([1, None], [None, None], None, sure, generator) == Verdict([1, 2], 1, is_rejected=False)
    never = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0]])
    outcomes = {tuple(verify([1, None], [None, None], None, never, generator).token_ids) for _ in range(50)}
    assert outcomes == {(0,), (2,)}  # refuted at once, resampled from p without the guess


def test_speculative_sampling_preserves_the_target_distribution():
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(len(P))
    for _ in range(20000):
        x = int(torch.multinomial(Q, 1, generator=generator))
        counts[speculative_sample(P, x, Q, generator)] += 1
    assert_follows(counts, P)


def test_speculative_sampling_with_a_deterministic_guess():
    """n-gram guesses have no q: treated as one-hot, accepted with probability p(x)."""
    generator = torch.Generator().manual_seed(1)
    counts = np.zeros(len(P))
    for _ in range(20000):
        counts[speculative_sample(P, 2, None, generator)] += 1
    assert_follows(counts, P)


def test_verify_keeps_the_target_distribution_at_every_position():
    """Two positions, each with its own p and a disagreeing q: the first
    verified token follows p1; the second, when reached, follows p2."""
    generator = torch.Generator().manual_seed(3)
    p = torch.stack([P, P.flip(0)])
    q = [Q, Q.flip(0)]
    first, second = np.zeros(len(P)), np.zeros(len(P))
    for _ in range(20000):
        guesses = [int(torch.multinomial(q[0], 1, generator=generator)),
                   int(torch.multinomial(q[1], 1, generator=generator))]
        verdict = verify(guesses, q, None, p, generator)
        first[verdict.token_ids[0]] += 1
        if len(verdict.token_ids) == 2:
            second[verdict.token_ids[1]] += 1
    assert_follows(first, P)
    assert_follows(second, P.flip(0))


def test_a_broken_rule_would_be_caught():
    """Accepting every draft token follows q, not p: the test statistic sees it."""
    generator = torch.Generator().manual_seed(2)
    counts = np.zeros(len(P))
    for _ in range(20000):
        counts[int(torch.multinomial(Q, 1, generator=generator))] += 1
    with pytest.raises(AssertionError):
        assert_follows(counts, P)
