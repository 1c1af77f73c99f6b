"""The engine facade: several requests at once, aborts, failing stages."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from compute.types import FailureCode, GenerationRequest
from pipeline.types import FinishEvent, GenerationError, TokenEvent
from tests.helpers import greedy_reference, load_engine


def wait_until_freed(engine, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(not s.kv.sequences for s in engine.stages):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("mode", ["ar", "sync", "pipeinfer"])
def test_concurrent_requests_each_equal_their_own_greedy_output(tiny_target, mode):
    prompts = [[3, 4, 5], [60, 61], [7, 7, 7, 7], [90], [12, 40, 12, 40, 12]]
    lengths = [10, 17, 5, 20, 13]
    outputs: dict[int, list[int]] = {}
    with load_engine(tiny_target, "layers:2", 2, mode, min_accept_prob=0.0) as engine:
        def worker(i):
            outputs[i] = engine.complete(GenerationRequest(tuple(prompts[i]), lengths[i])).token_ids

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert wait_until_freed(engine)
    for i, prompt in enumerate(prompts):
        assert outputs[i] == greedy_reference(tiny_target, prompt, lengths[i]), i


def test_closing_the_stream_aborts_and_frees_kv(tiny_target):
    slow = lambda stage, layer: 0.005  # noqa: E731
    with load_engine(tiny_target, "layers:2", 2, "pipeinfer", layer_delay=slow) as engine:
        stream = engine.generate(GenerationRequest((1, 2, 3), 200))
        assert isinstance(next(stream), TokenEvent)
        stream.close()  # the client hung up
        assert wait_until_freed(engine)
        # The engine keeps serving.
        out = engine.complete(GenerationRequest((1, 2, 3), 5))
        assert out.token_ids == greedy_reference(tiny_target, [1, 2, 3], 5)


def test_a_failing_stage_fails_only_its_request(tiny_target):
    failures = {"left": 1}

    def flaky(stage, layer):
        if stage == 1 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("simulated stage crash")
        return 0.0

    with load_engine(tiny_target, "none", 2, "ar", layer_delay=flaky) as engine:
        with pytest.raises(GenerationError, match="stage 1: RuntimeError: simulated stage crash") as failed:
            engine.complete(GenerationRequest((5, 6), 8))
        assert failed.value.failure.code is FailureCode.STAGE_ERROR
        out = engine.complete(GenerationRequest((5, 6), 8))
        assert out.token_ids == greedy_reference(tiny_target, [5, 6], 8)
        assert wait_until_freed(engine)


def test_prompt_that_does_not_fit_the_context_is_refused(tiny_target):
    with load_engine(tiny_target) as engine:
        with pytest.raises(ValueError, match=r"context is 512 tokens; the prompt has 500 tokens and max_tokens asks for 100"):
            list(engine.generate(GenerationRequest(tuple([3] * 500), 100)))


def test_finish_event_carries_stats(tiny_target):
    with load_engine(tiny_target, str(tiny_target), 2, "sync") as engine:
        events = list(engine.generate(GenerationRequest((8, 9), 9)))
    finish = events[-1]
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "length"
    assert sum(len(e.token_ids) for e in events[:-1]) == 9
    assert finish.stats.num_generated_tokens == 9 and finish.stats.acceptance_rate == 1.0
    assert finish.stats.first_token_s is not None and finish.stats.elapsed_s >= finish.stats.first_token_s


def test_a_dead_stage_thread_fails_requests_instead_of_hanging(tiny_target):
    dying = threading.Event()

    def delay(stage: int, layer: int) -> float:
        if stage == 1 and dying.is_set():
            raise SystemExit  # not an Exception: stage 1's thread ends mid-forward, as if it crashed
        return 0.01

    with load_engine(tiny_target, "none", 2, "ar", layer_delay=delay) as engine:
        stream = engine.generate(GenerationRequest((5, 6), 300))
        next(stream)
        dying.set()
        started = time.monotonic()
        events = list(stream)
        assert events[-1].finish_reason == "error" and events[-1].failure.code is FailureCode.STAGE_DOWN
        assert "a pipeline stage stopped" in events[-1].failure.message
        assert time.monotonic() - started < 10


def test_kv_budget_refuses_a_second_request_cleanly(tiny_target):
    from pipeline.config import EngineConfig
    from pipeline.engine import Engine

    config = EngineConfig(model=str(tiny_target), num_stages=2, kv_budget_bytes=1)
    with Engine.load(config, layer_delay=lambda stage, layer: 0.005, show_progress=False) as engine:
        first = engine.generate(GenerationRequest((1, 2), 100))
        next(first)  # the first request holds KV on every stage
        with pytest.raises(GenerationError, match="KV cache full") as failed:
            engine.complete(GenerationRequest((3, 4), 5))
        assert failed.value.failure.code is FailureCode.KV_CACHE_FULL
        assert sum(len(e.token_ids) for e in first if isinstance(e, TokenEvent)) == 99
        assert engine.complete(GenerationRequest((3, 4), 5)).token_ids == greedy_reference(tiny_target, [3, 4], 5)


def test_stages_may_compute_in_different_dtypes(tiny_target):
    from pipeline.config import EngineConfig
    from pipeline.engine import Engine
    from pipeline.partition import StagePlan

    plans = (StagePlan(0, 2, dtype="bfloat16"), StagePlan(2, 4))
    config = EngineConfig(model=str(tiny_target), num_stages=2, stage_plans=plans)
    with Engine.load(config, show_progress=False) as engine:
        assert [s.model.dtype for s in engine.stages] == [torch.bfloat16, torch.float32]
        out = engine.complete(GenerationRequest((5, 6, 7), 8))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_waiting_behind_other_work_is_not_stalling(tiny_target):
    """Each result takes longer than the stall timeout (slow layers, a
    second request in the way), but the stages keep progressing."""
    with load_engine(tiny_target, "none", 2, "ar", layer_delay=lambda stage, layer: 0.25,
                     stall_timeout_s=0.8) as engine:
        outputs = {}
        threads = [threading.Thread(target=lambda p=p: outputs.__setitem__(p, engine.complete(
            GenerationRequest(p, 4)).token_ids)) for p in ((5, 6), (7, 8, 9))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    for prompt, tokens in outputs.items():
        assert tokens == greedy_reference(tiny_target, list(prompt), 4)
    assert len(outputs) == 2


def test_a_stuck_stage_stalls_its_requests(tiny_target):
    release = threading.Event()

    def stuck(stage, layer):
        if stage == 1:
            release.wait(30)  # a stage that stops making progress mid-forward
        return 0.0

    with load_engine(tiny_target, "none", 2, "ar", layer_delay=stuck, stall_timeout_s=1.0) as engine:
        started = time.monotonic()
        with pytest.raises(GenerationError, match="no stage made progress for 1 s") as failed:
            engine.complete(GenerationRequest((5, 6), 4))
        assert failed.value.failure.code is FailureCode.STALLED
        assert time.monotonic() - started < 5
        release.set()
