"""Lossless: at temperature 0 the output equals greedy decoding of the target
alone (transformers' generate), for every mode, draft, stage count and
max_tokens, including across run boundaries and under random stage delays."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.types import GenerationRequest, Mode
from tests.helpers import TINY_VOCAB, greedy_reference, load_engine

MODES = [m.value for m in Mode]
REFERENCE_LEN = 24
_reference_cache: dict = {}


def reference(model_dir, prompt: list[int], max_tokens: int) -> list[int]:
    key = (str(model_dir), tuple(prompt))
    if key not in _reference_cache:
        _reference_cache[key] = greedy_reference(model_dir, prompt, REFERENCE_LEN)
    return _reference_cache[key][:max_tokens]


def draft_spec(kind: str, model_dir, unrelated_draft) -> str:
    return {"unrelated": str(unrelated_draft), "self": str(model_dir)}.get(kind, kind)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_tiny_models_equal_target_greedy(tiny_targets, unrelated_draft, data):
    arch = data.draw(st.sampled_from(sorted(tiny_targets)), label="arch")
    model_dir = tiny_targets[arch]
    draft = data.draw(st.sampled_from(["none", "ngram", "layers:1", "layers:3", "int8", "unrelated", "self"]), label="draft")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    stages = data.draw(st.integers(1, 4), label="stages")
    max_tokens = data.draw(st.integers(1, REFERENCE_LEN), label="max_tokens")
    # Repeated fragments give the n-gram draft something to find.
    fragment = data.draw(st.lists(st.integers(2, TINY_VOCAB - 1), min_size=1, max_size=5), label="fragment")
    prompt = (fragment * data.draw(st.integers(1, 3)))[:12]
    speculation = {
        "draft_len": data.draw(st.integers(1, 6), label="draft_len"),
        "max_runs_in_flight": data.draw(st.integers(1, 5), label="max_in_flight"),
        "confidence_cutoff": data.draw(st.sampled_from([0.0, 0.3, 0.9]), label="cutoff"),
    }
    delay_seed = data.draw(st.one_of(st.none(), st.integers(0, 1000)), label="delay_seed")
    layer_delay = None
    if delay_seed is not None:
        rng = random.Random(delay_seed)
        layer_delay = lambda stage, layer: rng.random() * 0.002  # noqa: E731

    with load_engine(model_dir, draft_spec(draft, model_dir, unrelated_draft), stages, mode,
                     layer_delay=layer_delay, **speculation) as engine:
        out = engine.complete(GenerationRequest(tuple(prompt), max_tokens))
    assert out.token_ids == reference(model_dir, prompt, max_tokens)
    assert out.finish_reason == "length"
    assert out.stats.num_accepted_tokens <= out.stats.num_draft_tokens


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("draft", ["unrelated", "self"])
def test_extreme_drafts_all_stage_counts(tiny_target, unrelated_draft, mode, draft):
    """An always-wrong draft and an always-right draft, at every stage count."""
    prompt = [5, 17, 33, 5, 17]
    expected = reference(tiny_target, prompt, REFERENCE_LEN)
    for stages in (1, 2, 3, 4):
        with load_engine(tiny_target, draft_spec(draft, tiny_target, unrelated_draft), stages, mode,
                         confidence_cutoff=0.0) as engine:
            out = engine.complete(GenerationRequest(tuple(prompt), REFERENCE_LEN))
        assert out.token_ids == expected, (stages, out.stats)
        if draft == "self" and mode != "ar":
            assert out.stats.acceptance_rate == 1.0
            assert out.stats.num_runs_cancelled == 0
        if draft == "unrelated" and mode == "pipeinfer":
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
@pytest.mark.parametrize("mode", MODES)
def test_default_model_equals_target_greedy(default_model, mode):
    """The real SmolLM2-135M: every draft kind, stage counts 1 to 4."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    prompts = [
        "The capital of France is",
        "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday,",
    ]
    drafts = ["none", "ngram", "layers:10", "int8", str(default_model)]
    for index, draft in enumerate(drafts):
        stages = 1 + (index + MODES.index(mode)) % 4
        with load_engine(default_model, draft, stages, mode) as engine:
            for prompt in prompts:
                ids = tokenizer.encode(prompt)
                out = engine.complete(GenerationRequest(tuple(ids), 20))
                assert out.token_ids == reference(default_model, ids, 20), (draft, stages, prompt)
