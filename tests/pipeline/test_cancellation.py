"""Early inference cancellation: runs built on a wrong guess are skipped or
stopped between layers, and the output stays the target's greedy decoding."""

from __future__ import annotations

import random
import time

import pytest

from compute.stage_model import StageModel
from compute.types import GenerationRequest, SamplingParams
from pipeline.stage import Stage
from pipeline.types import Run
from tests.helpers import greedy_reference, load_engine


def test_stage_stops_a_run_between_layers(tiny_target):
    stage = Stage(StageModel.load(tiny_target, 0, 4, with_embed=True, with_head=True), stage_index=0)
    run = Run(7, 0, None, 0, (3, 4, 5), False, SamplingParams())
    layers_started = []

    def cancel_at_layer_two(layer):
        layers_started.append(layer)
        if layer == 2:
            stage.cancel(run.seq_id, [run.run_id])

    assert stage.process(run, None, before_layer=cancel_at_layer_two) is None
    assert layers_started == [0, 1, 2]  # layers 2 and 3 never ran
    assert stage.counters.num_runs_stopped_mid_forward == 1
    assert stage.kv.num_chunks() == 0  # its partial KV is gone
    # A cancelled run that arrives later is skipped without computing.
    assert stage.process(run, None) is None
    assert stage.counters.num_runs_skipped == 1


def test_cancel_reaches_a_run_mid_forward_in_the_pipeline(tiny_target, unrelated_draft):
    """Slow layers on the last stage: by the time the canonical run's result
    refutes the next speculative run, that run is inside stage 1's layers."""
    prompt = [11, 12, 13]
    slow_last_stage = lambda stage, layer: 0.02 if stage == 1 else 0.0  # noqa: E731
    with load_engine(tiny_target, str(unrelated_draft), 2, "pipeinfer", layer_delay=slow_last_stage,
                     min_accept_prob=0.0, max_runs_in_flight=3) as engine:
        out = engine.complete(GenerationRequest(tuple(prompt), 12))
        stopped = sum(s.counters.num_runs_stopped_mid_forward for s in engine.stages)
        skipped = sum(s.counters.num_runs_skipped for s in engine.stages)
    assert out.token_ids == greedy_reference(tiny_target, prompt, 12)
    assert out.stats.num_runs_cancelled > 0
    assert stopped >= 1, (stopped, skipped, out.stats)


@pytest.mark.parametrize("delay_seed", range(6))
def test_random_stage_delays_never_change_the_output(tiny_target, unrelated_draft, delay_seed):
    rng = random.Random(delay_seed)
    per_stage = [rng.choice([0.0, 0.001, 0.005]) for _ in range(3)]
    jitter = lambda stage, layer: per_stage[stage] * rng.random() * 2  # noqa: E731
    draft = [str(unrelated_draft), "ngram", "layers:2"][delay_seed % 3]
    prompt = [20, 21, 22, 20, 21]
    with load_engine(tiny_target, draft, 3, "pipeinfer", layer_delay=jitter, min_accept_prob=0.0) as engine:
        out = engine.complete(GenerationRequest(tuple(prompt), 20))
        engine_stages = engine.stages
        assert out.token_ids == greedy_reference(tiny_target, prompt, 20)
    cancelled_seen = sum(s.counters.num_runs_skipped + s.counters.num_runs_stopped_mid_forward for s in engine_stages)
    assert out.stats.num_runs_cancelled >= 1
    assert cancelled_seen <= out.stats.num_runs_cancelled * len(engine_stages)


def test_all_kv_is_freed_after_requests(tiny_target, unrelated_draft):
    with load_engine(tiny_target, str(unrelated_draft), 2, "pipeinfer", min_accept_prob=0.0) as engine:
        for prompt in ([1, 2, 3], [4, 5]):
            engine.complete(GenerationRequest(tuple(prompt), 10))
        # FreeSequence travels behind the last run; give the stages a moment to apply it.
        deadline = time.monotonic() + 5
        while any(s.kv.sequences for s in engine.stages) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(s.kv.num_bytes() == 0 and not s.kv.sequences for s in engine.stages)
