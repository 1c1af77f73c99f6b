"""Stages as Ray actors, one process each, holding only their layers.

Hidden states go actor to actor: the coordinator chains the calls by passing
each stage's output ObjectRef to the next stage, so the tensors never come
back through it; only the last stage's small RunResult does. Runs and KV ops
are submitted by this one caller on each actor's "compute" group (max
concurrency 1), so every stage sees them in the same order. Cancellation goes
on the "control" group and reaches a stage while it computes; the stage
checks it between layers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

import ray
import torch
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from compute.types import Failure, FailureCode
from pipeline.partition import StagePlan
from pipeline.ray_cluster import RayCluster
from pipeline.stage import Stage, failed, stage_failure
from pipeline.trace import StageSpan
from pipeline.transport import ResultSink, Transport
from pipeline.types import KVOp, PipelineFailed, Run, RunResult, SequenceFailed

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120


@ray.remote(concurrency_groups={"control": 1, "compute": 1})
class StageActor:
    def __init__(self, model_dir: str, plans: tuple[StagePlan, ...], index: int, dtype: str,
                 kv_budget_bytes: int | None, layer_delay_s: float) -> None:
        torch.set_grad_enabled(False)
        self.stage = Stage.load(model_dir, plans, index, dtype, kv_budget_bytes)
        self._before_layer = (lambda layer: time.sleep(layer_delay_s)) if layer_delay_s else None

    @ray.method(concurrency_group="compute")
    def process(self, run: Run, hidden):
        """hidden: the previous stage's output, or None (first stage / skipped upstream)."""
        if isinstance(hidden, RunResult):  # an error upstream: pass it on
            return hidden
        if hidden is None and not self.stage.is_first:
            return None  # cancelled upstream
        try:
            return self.stage.process(run, hidden, self._before_layer)
        except Exception as exc:
            log.exception("stage %d failed on run %d", self.stage.stage_index, run.run_id)
            return stage_failure(run, self.stage.stage_index, exc)

    @ray.method(concurrency_group="compute")
    def apply(self, op: KVOp) -> SequenceFailed | None:
        try:
            self.stage.apply(op)
            return None
        except Exception as exc:
            return stage_failure(op, self.stage.stage_index, exc)

    @ray.method(concurrency_group="control")
    def cancel(self, seq_id: int, run_ids: list[int]) -> None:
        self.stage.cancel(seq_id, run_ids)

    @ray.method(concurrency_group="control")
    def idle_s(self) -> float:
        return self.stage.idle_s()

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return {**self.stage.stats(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    @ray.method(concurrency_group="control")
    def drain_spans(self) -> list[StageSpan]:
        return self.stage.spans.drain()


class RayTransport(Transport):
    """layer_delay_s sleeps before every layer: a slower machine, for tests.
    A `cluster` given is stopped by close() (the private Ray it started)."""

    def __init__(self, model_dir: str, plans: Sequence[StagePlan], dtype: str = "float32",
                 strategy: str = "PACK", kv_budget_bytes: int | None = None, layer_delay_s: float = 0.0,
                 max_restarts: int = -1, cluster: RayCluster | None = None) -> None:
        if not ray.is_initialized():
            raise RuntimeError("connect to Ray (RayCluster.connect) before creating a RayTransport")
        self.cluster = cluster
        self.num_stages = len(plans)
        bundles = [{"CPU": p.num_cpus, **p.resources} for p in plans]
        self.placement_group = placement_group(bundles, strategy=strategy)
        try:
            ray.get(self.placement_group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement_group)
            raise RuntimeError(f"the cluster cannot place the stages {bundles} ({strategy}) within "
                               f"{PLACEMENT_TIMEOUT_S} s: check the nodes' CPUs and custom resources") from None
        self.actors = [
            StageActor.options(
                num_cpus=p.num_cpus, resources=p.resources, max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(model_dir, tuple(plans), i, dtype, kv_budget_bytes, layer_delay_s)
            for i, p in enumerate(plans)
        ]
        ray.get([a.stats.remote() for a in self.actors], timeout=600)  # loaded and ready
        self._pending: dict[ray.ObjectRef, tuple[Run | KVOp, float]] = {}  # final ref -> (work, sent at)
        self._last_failure_at = float("-inf")
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._closed = False
        self._on_result: ResultSink | None = None
        self._waiter = threading.Thread(target=self._wait_for_results, name="ray-results", daemon=True)

    def start(self, on_result: ResultSink) -> None:
        self._on_result = on_result
        self._waiter.start()

    def submit(self, run: Run) -> None:
        hidden = None
        for actor in self.actors:
            hidden = actor.process.remote(run, hidden)  # a ref: the tensor moves actor to actor
        self._track(hidden, run)

    def send_kv_op(self, op: KVOp) -> None:
        for actor in self.actors:
            self._track(actor.apply.remote(op), op)

    def cancel(self, seq_id: int, run_ids: list[int]) -> None:
        for actor in self.actors:
            actor.cancel.remote(seq_id, run_ids)

    def is_alive(self) -> bool:
        try:
            ray.get([a.stats.remote() for a in self.actors], timeout=5)
            return True
        except (RayError, TimeoutError):
            return False

    def idle_s(self) -> float:
        try:
            return min(ray.get([a.idle_s.remote() for a in self.actors], timeout=5))
        except (RayError, TimeoutError):
            return float("inf")  # a stage that cannot answer makes no progress

    def stage_stats(self) -> list[dict]:
        return ray.get([a.stats.remote() for a in self.actors], timeout=30)

    def stage_spans(self) -> list[StageSpan]:
        """Actors stamp spans with their own wall clock (one machine, or NTP-close ones)."""
        return [span for spans in ray.get([a.drain_spans.remote() for a in self.actors], timeout=30) for span in spans]

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.placement_group)
        if self.cluster is not None:
            self.cluster.stop()

    def _track(self, ref: ray.ObjectRef, item: Run | KVOp) -> None:
        with self._lock:
            self._pending[ref] = (item, time.monotonic())
        self._wakeup.set()

    def _wait_for_results(self) -> None:
        while not self._closed:
            with self._lock:
                refs = list(self._pending)
            if not refs:
                self._wakeup.wait(0.5)
                self._wakeup.clear()
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
            for ref in ready:
                with self._lock:
                    item, submitted_at = self._pending.pop(ref)
                self._deliver(ref, item, submitted_at)

    def _deliver(self, ref: ray.ObjectRef, item: Run | KVOp, submitted_at: float) -> None:
        try:
            value = ray.get(ref)
        except RayActorError as exc:
            # A stage died and lost every sequence's KV: fail them all, once
            # (later errors from work sent before this failure are covered).
            if submitted_at > self._last_failure_at:
                self._last_failure_at = time.monotonic()
                self._on_result(PipelineFailed(Failure(
                    FailureCode.STAGE_DOWN,
                    f"a stage process died ({type(exc).__name__}); its requests failed and it is being restarted")))
            return
        except RayError as exc:
            value = failed(item, Failure.of(exc, FailureCode.STAGE_ERROR))
        if value is not None:  # a run's result, or a failed KV op
            self._on_result(value)
