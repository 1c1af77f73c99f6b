"""Both lossless sampling rules preserve the target's distribution, and a
seeded request gives the same text in every mode, draft and timing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM

from pipeline.sampling import coupled_token, sampling_probs, target_tokens
from pipeline.types import GenerationRequest, Mode, SamplingParams
from pipeline.verify import speculative_sample
from tests.helpers import load_engine, make_tiny_model

P_VALUE_FLOOR = 1e-3  # fixed seeds: deterministic; a broken rule fails by many orders of magnitude

P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.07, 0.03])
Q = torch.tensor([0.05, 0.10, 0.50, 0.05, 0.20, 0.10])  # a draft that disagrees a lot


def assert_follows(counts: np.ndarray, p: torch.Tensor) -> None:
    p = p.double().numpy()
    expected = p / p.sum() * counts.sum()
    assert chisquare(counts, expected).pvalue > P_VALUE_FLOOR, (counts, expected)


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


def test_a_broken_rule_would_be_caught():
    """Accepting every draft token follows q, not p: the test statistic sees it."""
    generator = torch.Generator().manual_seed(2)
    counts = np.zeros(len(P))
    for _ in range(20000):
        counts[int(torch.multinomial(Q, 1, generator=generator))] += 1
    with pytest.raises(AssertionError):
        assert_follows(counts, P)


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


@pytest.fixture(scope="module")
def tiny_vocab_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("v8") / "m", seed=11, vocab_size=8, num_layers=2,
                           hidden_size=32, init_range=0.15)


@pytest.mark.parametrize("mode", ["sync", "pipeinfer"])
def test_engine_sampling_follows_the_target_distribution(tiny_vocab_model, tmp_path_factory, mode):
    """Unseeded sampling end to end (rule a): the token after a speculated one
    follows the target's conditional distribution."""
    draft = make_tiny_model(tmp_path_factory.mktemp("d8") / "d", seed=12, vocab_size=8, num_layers=1,
                            hidden_size=32, init_range=0.6)
    prompt = [2, 5, 3]
    params = SamplingParams(temperature=1.0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_vocab_model, dtype=torch.float32)
    with torch.no_grad():
        p_first = sampling_probs(reference(torch.tensor([prompt])).logits[0, -1], params)
    counts = np.zeros(8)
    with load_engine(tiny_vocab_model, str(draft), 2, mode, confidence_cutoff=0.0, draft_len=3) as engine:
        for _ in range(1500):
            out = engine.complete(GenerationRequest(tuple(prompt), 2, params))
            counts[out.token_ids[0]] += 1
        assert out.stats.num_draft_tokens > 0
    assert_follows(counts, p_first)


def coupled_reference(model_dir, prompt, max_tokens, params) -> list[int]:
    """Non-speculative seeded sampling of the target alone, with transformers' forward."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            probs = sampling_probs(model(torch.tensor([ids])).logits[0, -1], params)
            ids.append(coupled_token(probs, params.seed, len(ids)))
    return ids[len(prompt):]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seeded_sampling_is_identical_in_every_mode_draft_and_timing(tiny_target, unrelated_draft, seed):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=seed)
    prompt = [9, 8, 7, 9, 8]
    expected = coupled_reference(tiny_target, prompt, 16, params)
    rng = random.Random(seed)
    for mode in Mode:
        for draft in ("none", "ngram", "layers:2", str(unrelated_draft), str(tiny_target)):
            stages = rng.randint(1, 4)
            delay = lambda stage, layer: rng.random() * 0.002  # noqa: E731
            with load_engine(tiny_target, draft, stages, mode, layer_delay=delay, confidence_cutoff=0.0) as engine:
                out = engine.complete(GenerationRequest(tuple(prompt), 16, params))
            assert out.token_ids == expected, (mode, draft, stages)
