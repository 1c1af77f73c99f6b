"""Sampling: coupled Gumbel-max samples the target's distribution and is a
pure function of (seed, position); top-k/top-p filter; greedy is argmax; a
temperature the arithmetic cannot take is the request's error."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compute.sampling import coupled_token, sampling_probs, target_tokens
from compute.types import RequestError, SamplingParams
from tests.helpers import P, assert_follows


def test_coupled_gumbel_max_samples_the_target_distribution():
    counts = np.zeros(len(P))
    for seed in range(20000):
        counts[coupled_token(P, seed, position=7)] += 1
    assert_follows(counts, P)


def test_coupled_token_is_a_pure_function_of_seed_and_position():
    assert coupled_token(P, 5, 3) == coupled_token(P, 5, 3)
    assert len({coupled_token(P, 5, pos) for pos in range(40)}) > 1


def test_top_k_and_top_p_filter_before_sampling():
    logits = torch.log(P)
    top_k = sampling_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.count_nonzero(top_k) == 2 and torch.isclose(top_k.sum(), torch.tensor(1.0))
    top_p = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=0.6))
    assert torch.count_nonzero(top_p).item() == 2  # 0.40 + 0.25 reaches 0.6
    tiny_p = sampling_probs(logits, SamplingParams(temperature=1.0, top_p=5e-324))  # rounds to 0 in float32
    assert tiny_p.tolist() == [1.0, 0, 0, 0, 0, 0]
    cold = sampling_probs(logits, SamplingParams(temperature=0.1))
    assert cold[0] > 0.99


def test_target_tokens_are_argmax_when_greedy():
    logits = torch.tensor([[0.1, 3.0, 0.2], [2.0, 0.0, 1.0]])
    assert target_tokens(logits, SamplingParams(), 0) == [1, 0]


def test_a_temperature_that_breaks_the_arithmetic_is_the_requests_error():
    huge = torch.tensor([1e36, 1.0, 0.0])  # finite, but / 1e-4 overflows float32
    with pytest.raises(RequestError, match="gives no valid distribution") as info:
        sampling_probs(huge, SamplingParams(temperature=1e-4, seed=1))
    assert info.value.param == "temperature"
    assert sampling_probs(huge, SamplingParams(temperature=1e-9)).argmax() == 0  # below 1e-5: greedy
