"""Lossless: at temperature 0 the output equals greedy decoding of the target
alone, as the stages compute it (dense or quantized), for every mode, draft, stage count and
max_tokens, including across run boundaries and under random stage delays;
unseeded sampling follows the target's distribution, and a seeded request
gives the same text in every mode, draft and timing."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from compute.sampling import coupled_token, sampling_probs
from compute.types import GenerationRequest, SamplingParams
from pipeline.drafter import ThreadDrafter
from pipeline.types import Mode
from tests.helpers import (
    TINY_VOCAB,
    assert_follows,
    greedy_reference,
    load_engine,
    make_tiny_model,
    transformers_greedy,
)

MODES = [m.value for m in Mode]
REFERENCE_LEN = 24
_reference_cache: dict = {}


def reference(model_dir, prompt: list[int], max_tokens: int) -> list[int]:
    key = (str(model_dir), tuple(prompt))
    if key not in _reference_cache:
        _reference_cache[key] = greedy_reference(model_dir, prompt, REFERENCE_LEN)
    return _reference_cache[key][:max_tokens]


def draft_spec(kind: str, model_dir, unrelated_draft, head=None) -> str:
    return {"unrelated": str(unrelated_draft), "self": str(model_dir), "head": f"head:{head}",
            "ngram+head": f"ngram+head:{head}"}.get(kind, kind)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tiny_models_equal_greedy_reference(tiny_targets, unrelated_draft, tiny_heads, data):
    arch = data.draw(st.sampled_from(sorted(tiny_targets)), label="arch")
    model_dir = tiny_targets[arch]
    draft = data.draw(st.sampled_from(["none", "ngram", "layers:1", "layers:3", "int8", "unrelated", "self", "head",
                                       "ngram+head"]),
                      label="draft")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    stages = data.draw(st.integers(1, 4), label="stages")
    max_tokens = data.draw(st.integers(1, REFERENCE_LEN), label="max_tokens")
    # Repeated fragments give the n-gram draft something to find.
    fragment = data.draw(st.lists(st.integers(2, TINY_VOCAB - 1), min_size=1, max_size=5), label="fragment")
    prompt = (fragment * data.draw(st.integers(1, 3)))[:12]
    speculation = {
        "draft_len": data.draw(st.integers(1, 6), label="draft_len"),
        "max_runs_in_flight": data.draw(st.integers(1, 5), label="max_in_flight"),
        "min_accept_prob": data.draw(st.sampled_from([0.0, 0.15, 0.9]), label="min_accept_prob"),
    }
    delay_seed = data.draw(st.one_of(st.none(), st.integers(0, 1000)), label="delay_seed")
    layer_delay = None
    if delay_seed is not None:
        rng = random.Random(delay_seed)
        layer_delay = lambda stage, layer: rng.random() * 0.002  # noqa: E731

    spec = draft_spec(draft, model_dir, unrelated_draft, tiny_heads[arch])
    with load_engine(model_dir, spec, stages, mode, layer_delay=layer_delay, **speculation) as engine:
        out = engine.complete(GenerationRequest(tuple(prompt), max_tokens))
    assert out.token_ids == reference(model_dir, prompt, max_tokens)
    assert out.finish_reason == "length"
    assert out.stats.num_accepted_tokens <= out.stats.num_draft_tokens


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_quantized_targets_equal_their_own_greedy(tiny_targets, unrelated_draft, tiny_heads, data):
    """An int4 or int8 target: the output equals that quantized target decoding
    alone, bit-for-bit by batch invariance (not by argmax margins)."""
    arch = data.draw(st.sampled_from(sorted(tiny_targets)), label="arch")
    quantize = data.draw(st.sampled_from(["int4", "int8"]), label="quantize")
    model_dir = tiny_targets[arch]
    draft = data.draw(st.sampled_from(["ngram", "unrelated", "self", "head", "ngram+head"]), label="draft")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    stages = data.draw(st.integers(1, 4), label="stages")
    prompt = data.draw(st.lists(st.integers(2, TINY_VOCAB - 1), min_size=1, max_size=4), label="fragment") * 2
    rng = random.Random(data.draw(st.integers(0, 1000), label="delay_seed"))
    spec = draft_spec(draft, model_dir, unrelated_draft, tiny_heads[arch])
    with load_engine(model_dir, spec, stages, mode, layer_delay=lambda stage, layer: rng.random() * 0.002,
                     quantize=quantize, min_accept_prob=data.draw(st.sampled_from([0.0, 0.15]))) as engine:
        out = engine.complete(GenerationRequest(tuple(prompt), 16))
    assert out.token_ids == greedy_reference(model_dir, prompt, 16, quantize=quantize)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("draft", ["unrelated", "self"])
def test_extreme_drafts_all_stage_counts(tiny_target, unrelated_draft, mode, draft):
    """An always-wrong draft and an always-right draft, at every stage count."""
    prompt = [5, 17, 33, 5, 17]
    expected = reference(tiny_target, prompt, REFERENCE_LEN)
    for stages in (1, 2, 3, 4):
        with load_engine(tiny_target, draft_spec(draft, tiny_target, unrelated_draft), stages, mode,
                         min_accept_prob=0.0) as engine:
            out = engine.complete(GenerationRequest(tuple(prompt), REFERENCE_LEN))
        assert out.token_ids == expected, (stages, out.stats)
        # pipeinfer mode launches a guess only if it is ready in time (never waits for
        # the draft), so on a busy machine it may launch none: sync, which waits, must.
        if draft == "self" and mode != "ar":
            assert out.stats.num_accepted_tokens == out.stats.num_draft_tokens  # every launched guess was right
            assert out.stats.num_runs_cancelled == 0
            assert out.stats.num_draft_tokens > 0 or mode == "pipeinfer"
        if draft == "unrelated" and mode == "pipeinfer" and out.stats.num_draft_tokens:
            assert out.stats.num_runs_cancelled > 0


def test_stops_at_eos_like_generate(tiny_target):
    """With stop tokens, output ends at (and includes) the first one, as generate does."""
    prompt = [7, 8, 9]
    full = reference(tiny_target, prompt, REFERENCE_LEN)
    eos = full[5]
    expected = full[: full.index(eos) + 1]
    assert expected == greedy_reference(tiny_target, prompt, REFERENCE_LEN, eos_token_id=eos)
    for mode in MODES:
        with load_engine(tiny_target, str(tiny_target), 2, mode) as engine:
            out = engine.complete(GenerationRequest(tuple(prompt), REFERENCE_LEN, stop_token_ids=frozenset([eos])))
        assert out.token_ids == expected
        assert out.finish_reason == "stop"


@pytest.mark.slow
def test_dense_stages_answer_as_transformers_generate(default_model):
    """The bridge from the stages' arithmetic to the model's: on real weights,
    whose margins are far above rounding, the dense target alone decodes
    what transformers' generate does (tiny random models have near-ties:
    their logits are compared within a tolerance, tests/compute)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    for prompt in ("The capital of France is", "def fibonacci(n):"):
        ids = tokenizer.encode(prompt)
        assert greedy_reference(default_model, ids, 24, quantize="none") == transformers_greedy(default_model, ids, 24)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_default_model_equals_greedy_reference(default_model, mode):
    """The real SmolLM2-135M, as its GGUF's quantized blocks: every draft kind, stage counts 1 to 4."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    prompts = [
        "The capital of France is",
        "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday,",
    ]
    drafts = ["auto", "none", "ngram", "layers:10", "int8", str(default_model)]
    for index, draft in enumerate(drafts):
        stages = 1 + (index + MODES.index(mode)) % 4
        with load_engine(default_model, draft, stages, mode) as engine:
            for prompt in prompts:
                ids = tokenizer.encode(prompt)
                out = engine.complete(GenerationRequest(tuple(ids), 20))
                assert out.token_ids == greedy_reference(default_model, ids, 20), (draft, stages, prompt)


# ---- sampling: the target's distribution, and seeded text identical everywhere ----

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
    counts, drafted = np.zeros(8), 0
    with load_engine(tiny_vocab_model, str(draft), 2, mode, min_accept_prob=0.0, draft_len=3) as engine:
        for _ in range(1500):
            out = engine.complete(GenerationRequest(tuple(prompt), 2, params))
            counts[out.token_ids[0]] += 1
            drafted += out.stats.num_draft_tokens
    assert drafted > 0  # (pipeinfer mode never waits for the draft: a given request may have had no guess)
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
def test_seeded_sampling_is_identical_in_every_mode_draft_and_timing(tiny_target, unrelated_draft, tiny_heads, seed):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=seed)
    prompt = [9, 8, 7, 9, 8]
    expected = coupled_reference(tiny_target, prompt, 16, params)
    rng = random.Random(seed)
    for mode in Mode:
        for draft in ("none", "ngram", "layers:2", str(unrelated_draft), str(tiny_target), f"head:{tiny_heads['llama']}",
                      f"ngram+head:{tiny_heads['llama']}"):
            stages = rng.randint(1, 4)
            delay = lambda stage, layer: rng.random() * 0.002  # noqa: E731
            with load_engine(tiny_target, draft, stages, mode, layer_delay=delay, min_accept_prob=0.0) as engine:
                out = engine.complete(GenerationRequest(tuple(prompt), 16, params))
            assert out.token_ids == expected, (mode, draft, stages)


class DelayedDraft:
    """A real draft whose guesses take a random while: the drafter thread
    delivers them at random moments relative to the results."""

    is_free = False

    def __init__(self, draft, seed: int) -> None:
        self.name, self._draft, self._rng = f"delayed {draft.name}", draft, random.Random(seed)

    def propose(self, *args):
        time.sleep(self._rng.random() * 0.004)
        return self._draft.propose(*args)

    def release(self, seq_id) -> None:
        self._draft.release(seq_id)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_draft_worker_at_random_speeds_changes_no_token(tiny_target, unrelated_draft, seed):
    """Greedy and seeded text are the target's own, whatever the draft's timing."""
    from draft_models import load_draft

    prompt = [9, 8, 7, 9, 8]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    expected = {"greedy": greedy_reference(tiny_target, prompt, 20),
                "seeded": coupled_reference(tiny_target, prompt, 20, seeded)}
    rng = random.Random(seed)
    for mode in ("sync", "pipeinfer"):
        for draft in (str(tiny_target), str(unrelated_draft), "layers:2"):
            delayed = ThreadDrafter(DelayedDraft(load_draft(draft, tiny_target), seed))
            delay = lambda stage, layer: rng.random() * 0.002  # noqa: E731
            with load_engine(tiny_target, delayed, rng.randint(1, 3), mode, layer_delay=delay,
                             min_accept_prob=0.0) as engine:
                for name, sampling in (("greedy", SamplingParams()), ("seeded", seeded)):
                    out = engine.complete(GenerationRequest(tuple(prompt), 20, sampling))
                    assert out.token_ids == expected[name], (mode, draft, name)
