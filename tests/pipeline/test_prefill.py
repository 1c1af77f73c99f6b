"""A long prompt goes through the stages in chunks, one in flight at a
time: the text is the same, and a short request that arrives meanwhile is
not held up behind the whole prompt."""

from __future__ import annotations

import threading
import time

import pytest

from compute.types import GenerationRequest, SamplingParams
from tests.helpers import greedy_reference, load_engine

PROMPT = tuple(3 + i % 90 for i in range(53))  # alone, prefill_chunk=2: three chunks of 16, then a root run of 5


@pytest.mark.parametrize("mode", ["ar", "sync", "pipeinfer"])
def test_a_prompt_in_chunks_gives_the_same_text(tiny_target, mode):
    with load_engine(tiny_target, str(tiny_target), 2, mode, prefill_chunk=2) as engine:
        engine.stage_spans()  # (drop the warm-up's)
        out = engine.complete(GenerationRequest(PROMPT, 12))
        first_runs = [span.num_tokens for span in engine.stage_spans() if span.stage == 0][:4]
        seeded = engine.complete(GenerationRequest(PROMPT, 12, SamplingParams(temperature=0.9, seed=5)))
    assert out.token_ids == greedy_reference(tiny_target, list(PROMPT), 12)
    assert first_runs[:3] == [16, 16, 16] and first_runs[3] >= 5  # then the rest, and any guesses
    with load_engine(tiny_target, "none", 1, "ar", prefill_chunk=64) as engine:  # the prompt whole
        whole = engine.complete(GenerationRequest(PROMPT, 12, SamplingParams(temperature=0.9, seed=5)))
    assert seeded.token_ids == whole.token_ids


def test_a_short_request_is_not_held_behind_a_long_prompt(tiny_target):
    """One stage, 2 ms a layer: a 200-token prompt goes in chunks (32 tokens
    while alone, 4 once the short request runs too); the short request, sent
    just after it, is done before the long one's first token. Its own
    20-token prompt, no longer than an alone-chunk, goes whole."""
    done_at: dict[str, float] = {}
    with load_engine(tiny_target, "none", 1, "ar", layer_delay=lambda stage, layer: 0.002, prefill_chunk=4) as engine:
        def long():
            stream = engine.generate(GenerationRequest(tuple(3 + i % 90 for i in range(200)), 2))
            next(stream)
            done_at["long_first_token"] = time.monotonic()
            list(stream)

        thread = threading.Thread(target=long)
        thread.start()
        time.sleep(0.02)
        short = engine.complete(GenerationRequest(tuple(range(5, 25)), 4))
        done_at["short"] = time.monotonic()
        thread.join(timeout=60)
        spans = engine.stage_spans()
    assert done_at["short"] < done_at["long_first_token"]
    assert short.token_ids == greedy_reference(tiny_target, list(range(5, 25)), 4)
    assert 20 in {span.num_tokens for span in spans} and 4 in {span.num_tokens for span in spans}
