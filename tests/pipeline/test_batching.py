"""Runs that wait for a stage go through its layers together: one forward
for every sequence's runs (each weight read once), attention per run. The
results equal the runs computed one at a time, whatever is cancelled when."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from compute.stage_model import StageModel
from compute.types import FailureCode, GenerationRequest, SamplingParams
from pipeline.stage import Stage
from pipeline.types import Run
from tests.helpers import greedy_reference, load_engine

GREEDY = SamplingParams()
# Two sequences: a prompt and a chain of two runs behind it each; the runs
# of a chain follow each other in the batch, as a stage receives them.
RUNS = [
    Run(1, 0, None, 0, (3, 4, 5), False, GREEDY),
    Run(2, 1, None, 0, (60, 61, 62, 63, 64), False, GREEDY),
    Run(3, 0, 1, 3, (6, 7), True, GREEDY),
    Run(4, 1, 2, 5, (65,), True, GREEDY),
    Run(5, 0, 3, 5, (8,), True, GREEDY),
]


def whole_model_stage(target) -> Stage:
    return Stage(StageModel.load(target, 0, 4, with_embed=True, with_head=True), stage_index=0)


def one_at_a_time(target) -> dict[int, list[int]]:
    stage = whole_model_stage(target)
    return {run.run_id: stage.process(run, None).target_token_ids for run in RUNS}


def test_a_batch_of_runs_equals_the_runs_one_at_a_time(tiny_target):
    expected = one_at_a_time(tiny_target)
    stage = whole_model_stage(tiny_target)
    outs = stage.process_batch([(run, None) for run in RUNS])
    assert {run.run_id: out.target_token_ids for run, out in zip(RUNS, outs)} == expected
    assert stage.counters.num_forwards == 1 and stage.counters.num_runs_computed == len(RUNS)


def test_a_request_whose_parameters_fail_fails_alone_in_its_batch(tiny_target):
    """Huge finite logits that sequence 1's tiny temperature overflows: its
    runs fail as bad requests; sequence 0's, in the same forward, are exact."""
    expected = one_at_a_time(tiny_target)
    stage = whole_model_stage(tiny_target)
    stage.model.logits = lambda hidden, real=stage.model.logits: real(hidden) * 1e34
    broken = SamplingParams(temperature=1e-4, seed=3)
    runs = [dataclasses.replace(run, sampling=broken) if run.seq_id == 1 else run for run in RUNS]
    outs = stage.process_batch([(run, None) for run in runs])
    assert stage.counters.num_forwards == 1
    for run, out in zip(runs, outs):
        if run.seq_id == 1:
            assert out.failure.code is FailureCode.BAD_REQUEST and out.failure.param == "temperature"
        else:
            assert out.failure is None and out.target_token_ids == expected[run.run_id]


@pytest.mark.parametrize("layer", [0, 1, 3])
@pytest.mark.parametrize("victim", [0, 1])
def test_a_sequence_cancelled_inside_a_batch_leaves_the_others_exact(tiny_target, layer, victim):
    """Sequence `victim`'s runs are cancelled before `layer` (0: after the
    batch was formed, before any layer): they stop, the rest go on unchanged."""
    expected = one_at_a_time(tiny_target)
    stage = whole_model_stage(tiny_target)

    def cancel(at):
        if at == layer:
            stage.cancel(victim, [run.run_id for run in RUNS if run.seq_id == victim])

    outs = stage.process_batch([(run, None) for run in RUNS], before_layer=cancel)
    for run, out in zip(RUNS, outs):
        if run.seq_id == victim:
            assert out is None
        else:
            assert out.target_token_ids == expected[run.run_id], run
    assert stage.counters.num_runs_stopped_mid_forward == sum(run.seq_id == victim for run in RUNS)
    assert stage.kv.num_chunks() == sum(run.seq_id != victim for run in RUNS)  # the stopped runs' KV is gone


def test_concurrent_requests_share_forwards_and_keep_their_text(tiny_target):
    """Slow layers, so that the requests' runs queue at the stages: they are
    computed in shared forwards, and each request's text is its own greedy
    decoding."""
    prompts = [(3, 4, 5), (60, 61), (7, 7, 7, 7), (90,), (12, 40, 12), (1, 2), (33,), (50, 51, 52)]
    outputs: dict[int, list[int]] = {}
    with load_engine(tiny_target, "none", 2, "ar", layer_delay=lambda stage, layer: 0.003) as engine:
        def worker(i):
            outputs[i] = engine.complete(GenerationRequest(prompts[i], 12)).token_ids

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        stats = engine.transport.stage_stats()
    for i, prompt in enumerate(prompts):
        assert outputs[i] == greedy_reference(tiny_target, list(prompt), 12), i
    for stage in stats:
        assert stage["num_forwards"] < stage["num_runs_computed"] / 2  # most forwards carried several runs


def test_one_stage_keeps_every_request_in_one_forward(tiny_target):
    """On one stage, while some requests' results are being verified the
    stage waits a moment for their next runs rather than start a forward
    without them: the requests do not fall into groups that alternate."""
    prompts = [(3, 4, 5), (60, 61), (7, 7, 7, 7), (90,), (12, 40, 12), (1, 2), (33,), (50, 51, 52)]
    with load_engine(tiny_target, "none", 1, "ar", layer_delay=lambda stage, layer: 0.01) as engine:
        engine.complete(GenerationRequest((5,), 2))  # the stage has timed a forward
        before = engine.transport.stage_stats()[0]
        threads = [threading.Thread(target=engine.complete, args=(GenerationRequest(p, 16),)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        after = engine.transport.stage_stats()[0]
    runs = after["num_runs_computed"] - before["num_runs_computed"]
    forwards = after["num_forwards"] - before["num_forwards"]
    assert runs == 8 * 16
    assert forwards <= 16 + 4  # a forward per token for all 8 (a few more while the prompts arrive)


def test_the_head_runs_only_where_outputs_are_needed(tiny_target):
    """A root run's outputs before its last token predict text already
    verified: with logits_from the last stage leaves them out, and the rest
    are the same."""
    full = whole_model_stage(tiny_target).process(RUNS[1], None).target_token_ids
    tail = whole_model_stage(tiny_target).process(dataclasses.replace(RUNS[1], logits_from=4), None)
    assert tail.target_token_ids == full[4:]
    seeded = dataclasses.replace(RUNS[1], sampling=SamplingParams(temperature=0.8, seed=7))
    full = whole_model_stage(tiny_target).process(seeded, None).target_token_ids
    tail = whole_model_stage(tiny_target).process(dataclasses.replace(seeded, logits_from=3), None)
    assert tail.target_token_ids == full[3:]  # the coupled noise follows the positions
