"""Stages as Ray actors in their own processes: lossless, only their layers,
cancellation between layers, many requests at once, a stage that dies."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import threading
import time

import pytest
import ray

from compute.types import GenerationRequest, SamplingParams
from draft_models import parse_draft
from pipeline.engine import Engine
from pipeline.partition import StagePlan, balanced_plans
from pipeline.ray_cluster import RayCluster
from pipeline.ray_transport import RayTransport
from pipeline.speculation import SpeculationConfig
from pipeline.types import GenerationError, Mode
from tests.compute.test_stage_model import full_model_bytes
from tests.helpers import greedy_reference

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    cluster = RayCluster.connect(None)
    yield
    cluster.stop()


def ray_engine(model_dir, draft, stages, mode, layer_delay_s=0.0, quantize="auto", **speculation):
    """An Engine over a RayTransport (optionally with slow layers); a draft
    that computes runs in an actor of its own."""
    draft_plan = None if parse_draft(draft).is_free else StagePlan(0, 0)
    plans = [dataclasses.replace(plan, quantize=quantize) for plan in balanced_plans(model_dir, stages)]
    transport = RayTransport(str(model_dir), plans, layer_delay_s=layer_delay_s, draft_plan=draft_plan)
    return Engine(model_dir, transport, transport.drafter(draft, model_dir, "float32"),
                  SpeculationConfig(mode=Mode(mode), **speculation))


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("mode", ["ar", "sync", "pipeinfer"])
def test_ray_stages_are_lossless(tiny_target, unrelated_draft, stages, mode):
    draft = {"ar": "none", "sync": str(tiny_target), "pipeinfer": str(unrelated_draft)}[mode]
    with ray_engine(tiny_target, draft, stages, mode, min_accept_prob=0.0) as engine:
        for prompt, max_tokens in (([3, 4, 5], 17), ([50, 51, 50, 51], 9)):
            out = engine.complete(GenerationRequest(tuple(prompt), max_tokens))
            assert out.token_ids == greedy_reference(tiny_target, prompt, max_tokens), (stages, mode)


@pytest.mark.parametrize("quantize,mode", [("int4", "pipeinfer"), ("int8", "sync")])
def test_quantized_ray_stages_equal_the_quantized_target_alone(tiny_target, unrelated_draft, quantize, mode):
    draft = {"sync": str(tiny_target), "pipeinfer": str(unrelated_draft)}[mode]
    with ray_engine(tiny_target, draft, 2, mode, layer_delay_s=0.001, quantize=quantize, min_accept_prob=0.0) as engine:
        assert [s["weight_format"]["quantize"] for s in engine.stage_stats()] == [quantize, quantize]
        for prompt, max_tokens in (([3, 4, 5], 17), ([50, 51, 50, 51], 9)):
            out = engine.complete(GenerationRequest(tuple(prompt), max_tokens))
            assert out.token_ids == greedy_reference(tiny_target, prompt, max_tokens, quantize=quantize), mode


@pytest.mark.parametrize("mode,kind", [("sync", "head"), ("pipeinfer", "head"), ("sync", "ngram+head"),
                                       ("pipeinfer", "ngram+head")])
def test_tail_drafting_on_ray_stages_is_lossless(tiny_target, tiny_heads, mode, kind):
    """A head on the last actor (alone, or with the n-gram lookup on the
    coordinator): features cross the actors with the hidden states, guesses
    come back with the results; greedy and seeded text as the target's alone."""
    from pipeline.config import EngineConfig
    from tests.pipeline.test_lossless import coupled_reference

    draft = f"{kind}:{tiny_heads['llama']}"
    plans = EngineConfig(draft=draft, num_stages=3).plans(tiny_target)
    transport = RayTransport(str(tiny_target), plans)
    spec = SpeculationConfig(mode=Mode(mode), min_accept_prob=0.0)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    with Engine(tiny_target, transport, transport.drafter(draft, tiny_target, "float32"), spec,
                tail_drafting=True) as engine:
        for prompt, max_tokens in (([3, 4, 5], 17), ([50, 51, 50, 51, 50, 51], 9)):
            out = engine.complete(GenerationRequest(tuple(prompt), max_tokens))
            assert out.token_ids == greedy_reference(tiny_target, prompt, max_tokens), mode
            assert out.stats.draft_guesses > 0
            out = engine.complete(GenerationRequest(tuple(prompt), max_tokens, seeded))
            assert out.token_ids == coupled_reference(tiny_target, prompt, max_tokens, seeded), mode
        assert engine.stage_stats()[-1]["draft_head_tokens"] > 0


def test_actors_are_processes_holding_only_their_layers(tiny_target):
    with ray_engine(tiny_target, "none", 2, "ar") as engine:
        stats = engine.stage_stats()
    pids = {s["pid"] for s in stats}
    assert len(pids) == 2 and os.getpid() not in pids
    assert [s["layers"] for s in stats] == [[0, 2], [2, 4]]
    assert sum(s["parameter_bytes"] for s in stats) == full_model_bytes(tiny_target)


def test_cancellation_reaches_a_stage_mid_forward(tiny_target, unrelated_draft):
    """Slow layers (20 ms each): a refuted speculative run is stopped between layers."""
    with ray_engine(tiny_target, str(unrelated_draft), 2, "pipeinfer", layer_delay_s=0.02,
                    min_accept_prob=0.0, max_runs_in_flight=3) as engine:
        out = engine.complete(GenerationRequest((11, 12, 13), 10))
        stats = engine.stage_stats()
    assert out.token_ids == greedy_reference(tiny_target, [11, 12, 13], 10)
    assert out.stats.num_runs_cancelled > 0
    assert sum(s["num_runs_stopped_mid_forward"] for s in stats) >= 1, stats


def test_eight_concurrent_requests(tiny_target):
    prompts = [[i + 2, 2 * i + 3, 40 + i][: 1 + i % 3] for i in range(8)]
    lengths = [5 + 3 * i for i in range(8)]
    outputs: dict[int, list[int]] = {}
    with ray_engine(tiny_target, "layers:2", 2, "pipeinfer", min_accept_prob=0.0) as engine:
        def work(i):
            outputs[i] = engine.complete(GenerationRequest(tuple(prompts[i]), lengths[i])).token_ids

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        deadline = time.monotonic() + 10
        while any(s["num_sequences"] for s in engine.stage_stats()) and time.monotonic() < deadline:
            time.sleep(0.1)
        stats = engine.stage_stats()
        assert all(s["kv_bytes"] == 0 for s in stats)
    # Runs waiting for an actor share its forward (the same StageLoop as local stages).
    assert all(s["num_forwards"] < s["num_runs_computed"] for s in stats), stats
    # Every run and KV op came in over the data plane: the hop is timed there.
    assert all(s["hop_in"]["messages"] > 0 and 0 < s["hop_in"]["wait_ms_p50"] <= s["hop_in"]["wait_ms_p99"] < 1000 for s in stats), stats
    for i in range(8):
        assert outputs[i] == greedy_reference(tiny_target, prompts[i], lengths[i]), i


def test_a_killed_stage_fails_its_request_then_recovers(tiny_target):
    with ray_engine(tiny_target, "none", 2, "ar", layer_delay_s=0.01) as engine:
        victim = engine.stage_stats()[1]["pid"]
        failure: dict = {}

        def long_request():
            started = time.monotonic()
            try:
                engine.complete(GenerationRequest((1, 2, 3), 400))
            except GenerationError as exc:
                failure["error"], failure["after_s"] = str(exc), time.monotonic() - started

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(2.0)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive(), "the request hung after its stage died"
        assert re.search("a stage process died|a pipeline stage stopped", failure["error"]), failure
        assert time.monotonic() - killed_at < 30
        # The actor is restarted with its weights; later requests are served.
        deadline = time.monotonic() + 120
        while True:
            try:
                out = engine.complete(GenerationRequest((4, 5), 6))
                break
            except GenerationError:
                assert time.monotonic() < deadline, "the stage never came back"
                time.sleep(1)
        assert out.token_ids == greedy_reference(tiny_target, [4, 5], 6)
        assert engine.stage_stats()[1]["pid"] != victim


def test_health_is_503_not_500_when_a_stage_actor_is_gone(tiny_text_model):
    import asyncio

    import httpx

    from server.app import create_app
    from server.engine_host import EngineHost
    from server.settings import ServerSettings

    with ray_engine(tiny_text_model, "none", 2, "ar") as engine:
        app = create_app(EngineHost.ready(engine), ServerSettings(served_model_name="tiny"))

        async def health():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
                return await http.get("/health")

        assert asyncio.run(health()).status_code == 200
        ray.kill(engine.transport.actors[1], no_restart=True)
        response = asyncio.run(health())
        assert response.status_code == 503 and response.json()["status"] == "unhealthy"


def test_a_gpu_stage_asks_ray_for_a_gpu(tiny_target):
    """Placed only on a node with a GPU: on a cluster without one, a clear error at once."""
    if ray.cluster_resources().get("GPU"):
        pytest.skip("this cluster has a GPU")
    plans = [dataclasses.replace(plan, device="cuda") for plan in balanced_plans(tiny_target, 1)]
    with pytest.raises(RuntimeError, match=r"no node of the cluster can hold the stages: \{'CPU': 1.*'GPU': 1"):
        RayTransport(str(tiny_target), plans)
