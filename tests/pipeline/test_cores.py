"""Stages (and the draft) that share a machine compute on cores of their own,
and the coordinator knows when there are too few to go round."""

from __future__ import annotations

import os

import pytest

from compute.types import GenerationRequest
from pipeline.config import EngineConfig
from pipeline.cores import machine_cores, shares_cores, split_cores
from pipeline.engine import Engine
from pipeline.speculation import SpeculationConfig

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux thread affinity")


def test_core_groups_wrap_around_and_say_when_they_overlap():
    cores = machine_cores()
    groups = split_cores([1] * (len(cores) + 1))
    assert [g[0] for g in groups] == [*cores, cores[0]]  # one more worker than cores: the last shares the first's
    assert shares_cores(groups[:-1], groups[-1])
    assert not shares_cores([[0, 1], [2, 3]], [4])


def test_each_local_stage_and_the_draft_compute_on_cores_of_their_own(tiny_target):
    config = EngineConfig(model=str(tiny_target), draft=str(tiny_target), num_stages=2, stage_cpus=1,
                          speculation=SpeculationConfig())
    with Engine.load(config, show_progress=False) as engine:
        engine.complete(GenerationRequest((5, 6, 7), 8))  # every thread has started, and pinned itself
        stages, draft = split_cores([1, 1, 1])[:2], split_cores([1, 1, 1])[2]
        threads = [stats["thread_id"] for stats in engine.stage_stats()]
        assert [os.sched_getaffinity(t) for t in threads] == [set(c) for c in stages]
        assert os.sched_getaffinity(engine.draft_where()["thread_id"]) == set(draft)
        assert engine.transport.draft_shares_cores == (len(machine_cores()) < 3)
