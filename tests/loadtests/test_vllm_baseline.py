"""The vLLM baselines of `pipeinfer bench --baselines` (extra pipeinfer[vllm]):
same prompts, same greedy tokens as our engine, sane per-chunk timings."""

from __future__ import annotations

import pytest

from compute.vllm_host import INSTALL_HINT, vllm_available
from loadtests.vllm_baseline import VLLMBaseline, VLLMBaselineError, speculative_config
from tests.helpers import greedy_reference, make_tiny_model

# find_spec, not importorskip: vLLM is imported only in the baseline's own process.
requires_vllm = pytest.mark.skipif(not vllm_available(), reason=INSTALL_HINT)
pytestmark = pytest.mark.vllm

MAX_TOKENS = 12
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List the days of the week: Monday, Tuesday, Wednesday, Monday, Tuesday,",
]


@pytest.fixture(scope="module")
def prompts(default_model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    return [tokenizer.encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def expected(default_model, prompts) -> list[list[int]]:
    """vLLM computes the GGUF's dense float32 copy: our dense target's greedy text."""
    return [greedy_reference(default_model, prompt, MAX_TOKENS, quantize="none") for prompt in prompts]


@pytest.fixture(scope="module")
def plain(default_model):
    with VLLMBaseline(default_model, "vllm") as baseline:
        yield baseline


def check_timings(timings, prompts, max_tokens):
    assert [t.prompt_index for t in timings] == list(range(len(prompts)))
    for timing in timings:
        assert len(timing.token_ids) == max_tokens == sum(timing.chunk_sizes)
        assert len(timing.chunk_times_s) == len(timing.chunk_sizes) >= 1
        assert all(size >= 1 for size in timing.chunk_sizes)
        assert 0 < timing.ttft_s <= timing.elapsed_s < 120
        assert timing.chunk_times_s == sorted(timing.chunk_times_s)
        assert timing.stats is None  # our engine's figures only


@requires_vllm
@pytest.mark.parametrize("concurrency", [1, 2])
def test_plain_vllm_equals_our_greedy(plain, prompts, expected, concurrency):
    assert plain.name == "vllm" and plain.info["vllm_version"].startswith("0.")
    timings = plain.run(prompts, MAX_TOKENS, concurrency)
    check_timings(timings, prompts, MAX_TOKENS)
    assert [t.token_ids for t in timings] == expected
    assert all(t.chunk_sizes == [1] * MAX_TOKENS for t in timings)  # no speculation: one token a step
    assert plain.last_spec_decode is None


@requires_vllm
def test_concurrency_overlaps_requests(plain, prompts):
    """At concurrency 2 the second request starts with the first, not after it."""
    one = plain.run(prompts[:2], 16, 1)
    two = plain.run(prompts[:2], 16, 2)
    assert [t.token_ids for t in one] == [t.token_ids for t in two]
    assert two[1].ttft_s < one[0].elapsed_s  # one at a time, it would wait for the whole first request


@requires_vllm
def test_vllm_speculation_baselines(tmp_path_factory):
    """vLLM's own n-gram and draft-model speculation, on a tiny model (head_dim 32,
    vLLM's CPU minimum) drafting for itself: greedy output unchanged, drafts accepted."""
    tiny = make_tiny_model(tmp_path_factory.mktemp("vllm-baseline") / "tiny", seed=11, num_heads=2, num_kv_heads=1)
    prompts = [[5, 17, 33, 5, 17, 33, 5, 17], [40, 41, 42, 43]]
    expected = [greedy_reference(tiny, prompt, 16) for prompt in prompts]
    for kind, name in [("vllm-ngram", "vllm-ngram"), (f"vllm-draft:{tiny}", "vllm-draft")]:
        with VLLMBaseline(tiny, kind) as baseline:
            assert baseline.name == name
            timings = baseline.run(prompts, 16, 2)
            check_timings(timings, prompts, 16)
            assert [t.token_ids for t in timings] == expected, kind
            spec = baseline.last_spec_decode
        if kind.startswith("vllm-draft"):
            assert spec["num_draft_tokens"] > 0 and spec["num_accepted_tokens"] == spec["num_draft_tokens"], spec
            assert max(max(t.chunk_sizes) for t in timings) > 1  # several tokens per step


def test_bad_kinds_are_explained():
    assert speculative_config("vllm") is None
    assert speculative_config("vllm-ngram")["method"] == "ngram"
    with pytest.raises(VLLMBaselineError, match="unknown baseline 'sglang'"):
        speculative_config("sglang")
    with pytest.raises(VLLMBaselineError, match="unknown baseline"):
        speculative_config("vllm-draft:")
    with pytest.raises(VLLMBaselineError, match="not found"):
        speculative_config("vllm-draft:/no/such/model")
