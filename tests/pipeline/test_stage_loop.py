"""The stage loop every transport runs: what waits goes through in one
forward, KV ops in their place; at the first of several stages a run
chained behind one in the forward being gathered waits for the next one,
so that parent and child overlap on two stages instead of taking turns."""

from __future__ import annotations

import queue

import pytest

from compute.stage_model import StageModel
from compute.types import SamplingParams
from pipeline.stage import Stage
from pipeline.stage_loop import STOP, StageLoop, every_message
from pipeline.types import FreeSequence, Run

GREEDY = SamplingParams()
CHAIN = [Run(1, 0, None, 0, (3, 4, 5), False, GREEDY), Run(2, 0, 1, 3, (6, 7), True, GREEDY),
         Run(3, 0, 2, 5, (8,), True, GREEDY)]
OTHER = Run(4, 1, None, 0, (60, 61), False, GREEDY)


def run_loop(target, first_of_several: bool, messages: list) -> tuple[Stage, list, list]:
    """The first of two stages (layers 0-1), or the whole model alone, fed
    `messages`, then STOP; -> the stage, what it sent on, what it sent back."""
    model = StageModel.load(target, 0, 2 if first_of_several else 4, with_embed=True, with_head=not first_of_several)
    stage = Stage(model, stage_index=0)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    for message in [*messages, STOP]:
        inbox.put(message)
    sent_on, sent_back = [], []
    StageLoop(stage, lambda: every_message(inbox), sent_on.append if first_of_several else None, sent_back.append).run()
    return stage, sent_on, sent_back


@pytest.mark.parametrize("first_of_several", [False, True])
def test_a_chain_rides_one_forward_alone_and_overlaps_where_stages_follow(tiny_target, first_of_several):
    stage, sent_on, sent_back = run_loop(tiny_target, first_of_several, [[(run, None) for run in (*CHAIN, OTHER)]])
    # Alone, one forward; first of several, the parent, then each child in turn (the other
    # sequence's run joins the forward it reaches).
    assert stage.counters.num_forwards == (3 if first_of_several else 1)
    assert stage.counters.num_runs_computed == 4
    if first_of_several:  # each forward's runs, on to the next stage in order
        assert [[run.run_id for run, _ in message] for message in sent_on[:-1]] == [[1], [2], [3, 4]]
        assert sent_on[-1] == STOP and sent_back == []
    else:
        assert sorted(r.run_id for r in sent_back) == [1, 2, 3, 4] and sent_on == []


def test_a_kv_op_of_a_sequence_in_the_batch_waits_for_its_runs(tiny_target):
    stage, sent_on, _ = run_loop(tiny_target, True, [[(CHAIN[0], None)], FreeSequence(0), [(OTHER, None)]])
    assert stage.counters.num_forwards == 2  # the run, then the free, then the other run
    assert [type(m).__name__ for m in sent_on] == ["list", "FreeSequence", "list", "str"]
    assert stage.kv.sequences.keys() == {1}


def test_runs_the_next_stage_cannot_take_fail_as_a_stage_down(tiny_target):
    """The next stage's process died (its link refuses): the runs' requests
    fail at once with stage_down (503, worth a retry once it is back), not
    as an internal error."""
    from compute.types import FailureCode

    model = StageModel.load(tiny_target, 0, 2, with_embed=True, with_head=False)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    for message in [[(CHAIN[0], None)], STOP]:
        inbox.put(message)

    def refuse(message):
        raise ConnectionResetError("peer gone")

    sent_back = []
    StageLoop(Stage(model, stage_index=0), lambda: every_message(inbox), refuse, sent_back.append).run()
    assert [(r.run_id, r.failure.code) for r in sent_back] == [(1, FailureCode.STAGE_DOWN)]
    assert "stage 1 is unreachable" in sent_back[0].failure.message
