"""Stages as Ray actors, one process each, holding only their layers.

Ray is the control plane: it places the actors, restarts one that dies,
and carries cancellations, stats and spans (each actor's "control" group,
which answers while the stage computes). The data plane is a TCP link per
hop (pipeline/channel.py): runs and KV ops go coordinator -> stage 0 ->
... -> last stage, hidden states stage to stage, results from the last
stage (and failures from any) straight back to the coordinator. Each actor
runs the same StageLoop as a local stage, so the runs waiting for it share
one forward. A dead actor is seen by its serve() call failing: every
request fails at once, and when Ray has restarted it the links are made
again and every stage forgets the stale sequences.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import ray
import torch
from ray.exceptions import RayError
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from compute.stage_model import DTYPES
from compute.types import Failure, FailureCode
from draft_models import load_draft
from pipeline.channel import Address, Inbox, Link
from pipeline.cores import shares_cores, split_cores, use_cores
from pipeline.drafter import Drafter, DraftRequest, Guesses, GuessSink, ThreadDrafter
from pipeline.partition import StagePlan
from pipeline.ray_cluster import RayCluster
from pipeline.stage import Stage, failed
from pipeline.stage_loop import RESET, STOP, StageLoop
from pipeline.trace import StageSpan
from pipeline.transport import ResultSink, Transport
from pipeline.types import Delivery, KVOp, Ping, PipelineFailed, Run

log = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 120
DRAFT_READY_TIMEOUT_S = 600
POLL_S = 0.5  # a long poll for guesses returns at least this often (to notice close())


@ray.remote(concurrency_groups={"control": 1, "compute": 1})
class StageActor:
    """A stage in a process of its own. Work comes in over its Inbox and
    leaves over Links (pipeline/channel.py), in a StageLoop that serve()
    runs on the "compute" group; everything else is on "control", which
    answers while the stage computes."""

    def __init__(self, model_dir: str, plans: tuple[StagePlan, ...], index: int, dtype: str,
                 kv_budget_bytes: int | None, layer_delay_s: float, cores: list[int] | None,
                 authkey: bytes) -> None:
        torch.set_grad_enabled(False)
        use_cores(cores, plans[index].num_cpus, whole_process=True)
        if _gpus(plans[index]):  # Ray shows the actor its own GPU only
            plans = (*plans[:index], dataclasses.replace(plans[index], device="cuda"), *plans[index + 1:])
        self.stage = Stage.load(model_dir, plans, index, dtype, kv_budget_bytes)
        self._before_layer = (lambda layer: time.sleep(layer_delay_s)) if layer_delay_s else None
        self._authkey = authkey
        self._inbox = Inbox(ray.util.get_node_ip_address(), authkey)  # read by serve()'s thread
        self._next: Link | None = None
        self._back: Link | None = None

    @ray.method(concurrency_group="control")
    def address(self) -> Address:
        return self._inbox.address

    @ray.method(concurrency_group="control")
    def connect(self, next_address: Address | None, back_address: Address) -> None:
        """Links to the next stage (None: this is the last) and back to the
        coordinator; made anew when a stage was restarted."""
        old = (self._next, self._back)
        self._back = Link(back_address, self._authkey)
        self._next = Link(next_address, self._authkey) if next_address is not None else None
        for link in old:
            if link is not None:
                link.close()

    @ray.method(concurrency_group="compute")
    def serve(self) -> None:
        """The stage's loop, until STOP comes down the pipeline."""
        send_on = None if self.stage.is_last else (lambda message: self._next.send(message))
        StageLoop(self.stage, self._inbox.take, send_on, self._send_back, self._before_layer).run()

    def _send_back(self, delivery) -> None:
        try:
            self._back.send(delivery)
        except OSError as exc:  # the coordinator is gone or rewiring: its requests have failed already
            log.warning("stage %d: cannot reach the coordinator (%s)", self.stage.stage_index, exc)

    @ray.method(concurrency_group="control")
    def cancel(self, seq_id: int, run_ids: list[int]) -> None:
        self.stage.cancel(seq_id, run_ids)

    @ray.method(concurrency_group="control")
    def idle_s(self) -> float:
        return self.stage.idle_s()

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return {**self.stage.stats(), "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "hop_in": self._inbox.hops.as_dict()}

    @ray.method(concurrency_group="control")
    def drain_spans(self) -> list[StageSpan]:
        return self.stage.spans.drain()


@ray.remote(concurrency_groups={"requests": 1, "guesses": 1})
class DraftActor:
    """The draft in a process (and a bundle) of its own, drafting on a thread
    (ThreadDrafter). Requests arrive in order on their own group; guesses
    leave through take(), which the driver long-polls on another."""

    def __init__(self, spec: str, model_dir: str, dtype: str, cores: list[int] | None, num_cpus: float) -> None:
        torch.set_grad_enabled(False)
        use_cores(cores, num_cpus, whole_process=True)
        self._guesses: queue.SimpleQueue = queue.SimpleQueue()
        self._drafter = ThreadDrafter(load_draft(spec, Path(model_dir), DTYPES[dtype], show_progress=False), cores)
        self._drafter.start(self._guesses.put)

    @ray.method(concurrency_group="requests")
    def request(self, request: DraftRequest) -> None:
        self._drafter.request(request)

    @ray.method(concurrency_group="requests")
    def release(self, seq_id: int) -> None:
        self._drafter.release(seq_id)

    @ray.method(concurrency_group="guesses")
    def where(self) -> dict:
        return {"runs_on": "ray actor", "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    @ray.method(concurrency_group="guesses")
    def take(self, wait_s: float) -> list[Guesses]:
        """Every batch of guesses ready, waiting up to wait_s for the first."""
        try:
            batches = [self._guesses.get(timeout=wait_s)]
        except queue.Empty:
            return []
        while True:
            try:
                batches.append(self._guesses.get_nowait())
            except queue.Empty:
                return batches


class RayDrafter:
    """The Drafter protocol over a DraftActor: requests go out in order,
    guesses come back through a long poll on a thread of ours."""

    def __init__(self, actor) -> None:
        self._actor = actor
        try:  # placed, loaded and ready (its errors surface here)
            self._where = ray.get(actor.where.remote(), timeout=DRAFT_READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor, no_restart=True)
            raise RuntimeError(f"the draft's actor was not ready within {DRAFT_READY_TIMEOUT_S} s: does a node "
                               f"have draft_cpus free?") from None
        self._closed = threading.Event()
        self._sink: GuessSink | None = None
        self._thread = threading.Thread(target=self._poll, name="ray-guesses", daemon=True)

    def start(self, on_guesses: GuessSink) -> None:
        self._sink = on_guesses
        self._thread.start()

    def request(self, request: DraftRequest) -> None:
        self._actor.request.remote(request)

    def release(self, seq_id: int) -> None:
        self._actor.release.remote(seq_id)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        ray.kill(self._actor, no_restart=True)

    def where(self) -> dict:
        return self._where

    def _poll(self) -> None:
        while not self._closed.is_set():
            try:
                batches = ray.get(self._actor.take.remote(POLL_S))
            except RayError:  # the draft actor is gone: speculation stops, generation goes on
                log.warning("the draft actor is gone; going on without guesses")
                return
            for guesses in batches:
                self._sink(guesses)


def _gpus(plan: StagePlan) -> int:
    """A GPU stage's actor asks Ray for one GPU; Ray then shows it only that
    one, which it computes on as "cuda" (whatever index the plan named)."""
    return int((plan.device or "cpu").startswith("cuda"))


def _place(bundles: list[dict], strategy: str, what: str):
    """A placement group for these bundles, ready; a clear error if the cluster cannot hold it."""
    bundles = [{key: need for key, need in bundle.items() if need} for bundle in bundles]  # (no "GPU": 0)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for bundle in bundles:  # one no node could ever hold would wait forever: say so now
        if not any(all(node.get(key, 0) >= need for key, need in bundle.items()) for node in nodes):
            raise RuntimeError(f"no node of the cluster can hold {what}: {bundle}; its nodes have "
                               f"{[{k: v for k, v in n.items() if not k.startswith('node:')} for n in nodes]}")
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"the cluster cannot place {what} {bundles} ({strategy}) within "
                           f"{PLACEMENT_TIMEOUT_S} s: check the nodes' CPUs and custom resources") from None
    return group


class RayTransport(Transport):
    """layer_delay_s sleeps before every layer: a slower machine, for tests.
    A `cluster` given is stopped by close() (the private Ray it started)."""

    def __init__(self, model_dir: str, plans: Sequence[StagePlan], dtype: str = "float32",
                 strategy: str = "PACK", kv_budget_bytes: int | None = None, layer_delay_s: float = 0.0,
                 max_restarts: int = -1, cluster: RayCluster | None = None,
                 draft_plan: StagePlan | None = None, draft_stage: int | None = 0) -> None:
        """draft_plan: the CPUs and resources of the draft's actor, for a
        draft that computes (None: no draft actor); draft_stage: the stage
        whose node it prefers (None: any node)."""
        if not ray.is_initialized():
            raise RuntimeError("connect to Ray (RayCluster.connect) before creating a RayTransport")
        self.cluster = cluster
        self.num_stages = len(plans)
        self.num_layers = sum(p.layer_end - p.layer_start for p in plans)
        self.model_dir = model_dir
        self._draft_plan = draft_plan
        # A private cluster is this machine: each stage, and the draft, gets cores of its own.
        placed = [*plans, *([draft_plan] if draft_plan else [])]
        pinned = split_cores([int(p.num_cpus) for p in placed]) if cluster and cluster.is_private \
            else [None] * len(placed)
        self.draft_cores = pinned[len(plans)] if draft_plan else None
        self.draft_shares_cores = self.draft_cores is not None and shares_cores(pinned[:len(plans)], self.draft_cores)
        self._authkey = secrets.token_bytes(32)  # the data plane's links take only these processes
        self.placement_group = _place([{"CPU": p.num_cpus, "GPU": _gpus(p), **p.resources} for p in plans], strategy,
                                      "the stages")
        # A draft asking for node resources gets a bundle of its own (the
        # stages' strategy, one node each with spread, does not bind it);
        # otherwise it goes beside stage `draft_stage` where that node has the CPUs.
        self._draft_stage = draft_stage
        self.draft_group = None
        if draft_plan is not None and draft_plan.resources:
            try:
                self.draft_group = _place([{"CPU": draft_plan.num_cpus, **draft_plan.resources}], "PACK",
                                          "the draft's actor (draft_cpus, draft_resources)")
            except BaseException:
                remove_placement_group(self.placement_group)
                raise
        self.actors = [
            StageActor.options(
                num_cpus=p.num_cpus, num_gpus=_gpus(p), resources=p.resources, max_restarts=max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
            ).remote(model_dir, tuple(plans), i, dtype, kv_budget_bytes, layer_delay_s, pinned[i], self._authkey)
            for i, p in enumerate(plans)
        ]
        ray.get([a.stats.remote() for a in self.actors], timeout=600)  # loaded and ready
        self._closed = False
        self._on_result: ResultSink | None = None
        self._results = Inbox(ray.util.get_node_ip_address(), self._authkey, self._received)
        self._to_first: Link | None = None
        self._up = threading.Event()  # every link is made (cleared while a stage restarts)
        self._serving: dict[ray.ObjectRef, int] = {}  # each actor's serve() -> its stage
        self._wire(range(self.num_stages))
        self._watcher = threading.Thread(target=self._watch, name="ray-stages", daemon=True)

    def start(self, on_result: ResultSink) -> None:
        self._on_result = on_result
        self._watcher.start()

    shares_forwards = True  # each actor's StageLoop takes every run waiting in one forward

    def submit(self, run: Run) -> None:
        self.submit_together([run])

    def submit_together(self, runs: Sequence[Run]) -> None:
        if not self._send([(run, None) for run in runs]):
            for run in runs:  # fail now: the coordinator would otherwise wait for its stall timeout
                self._on_result(failed(run, Failure(FailureCode.STAGE_DOWN, "a stage process is being restarted")))

    def send_kv_op(self, op: KVOp) -> None:
        self._send(op)  # (lost only while a stage restarts, when every sequence is reset anyway)

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

    def drafter(self, spec: str, model_dir: Path, dtype: str) -> Drafter:
        """A draft that computes runs in its own actor, in the bundle made for it."""
        if self._draft_plan is None:
            return super().drafter(spec, model_dir, dtype)
        if self.draft_group is not None:
            where = PlacementGroupSchedulingStrategy(self.draft_group, placement_group_bundle_index=0)
        elif self._draft_stage is not None:  # beside that stage if its node has the CPUs, else anywhere
            node_id = placement_group_table(self.placement_group)["bundles_to_node_id"][self._draft_stage]
            where = NodeAffinitySchedulingStrategy(node_id, soft=True)
        else:
            where = "DEFAULT"
        actor = DraftActor.options(
            num_cpus=self._draft_plan.num_cpus, resources=self._draft_plan.resources, scheduling_strategy=where,
        ).remote(spec, str(model_dir), dtype, self.draft_cores, self._draft_plan.num_cpus)
        return RayDrafter(actor)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._send(STOP):  # behind all work sent; the actors are killed below whether or not they stop
            ray.wait(list(self._serving), num_returns=len(self._serving), timeout=5)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self._results.close()
        for group in (self.placement_group, self.draft_group):
            if group is not None:
                remove_placement_group(group)
        if self.cluster is not None:
            self.cluster.stop()

    def _send(self, message) -> bool:
        """Into the first stage: False where it cannot be reached now."""
        if not self._up.is_set():
            return False
        try:
            self._to_first.send(message)
            return True
        except OSError as exc:
            log.warning("the first stage is unreachable (%s)", exc)
            return False

    def send_ping(self, ping: Ping) -> bool:
        return self._send(ping)

    def _received(self, delivery: Delivery | Ping) -> None:
        if isinstance(delivery, Ping):
            self.ping_arrived(delivery)
        elif self._on_result is not None:
            self._on_result(delivery)

    def _wire(self, to_serve, reset: bool = False) -> None:
        """Every stage linked to the next and back to us, and the stages
        `to_serve` (all at first; then the restarted ones) serving. reset:
        every stage forgets every sequence first (a RESET sent before any
        run can be: one sent after would wipe a new request's KV)."""
        addresses = ray.get([a.address.remote() for a in self.actors], timeout=PLACEMENT_TIMEOUT_S)
        ray.get([actor.connect.remote(addresses[i + 1] if i + 1 < self.num_stages else None, self._results.address)
                 for i, actor in enumerate(self.actors)], timeout=PLACEMENT_TIMEOUT_S)
        old, self._to_first = self._to_first, Link(addresses[0], self._authkey)
        if old is not None:
            old.close()
        for index in to_serve:
            self._serving[self.actors[index].serve.remote()] = index
        if reset:
            self._to_first.send(RESET)
        self._up.set()

    def _watch(self) -> None:
        """A stage that dies loses every sequence's KV: fail them all, once;
        when Ray has restarted it, link it in again and reset the others' KV."""
        while not self._closed:
            ready, _ = ray.wait(list(self._serving), num_returns=1, timeout=0.5)
            if not ready or self._closed:
                continue
            index = self._serving.pop(ready[0])
            try:
                ray.get(ready[0])
                continue  # it stopped (close)
            except RayError as exc:
                self._up.clear()
                log.warning("stage %d died (%s); its requests fail and it is being restarted",
                            index, type(exc).__name__)
                self._received(PipelineFailed(Failure(
                    FailureCode.STAGE_DOWN,
                    f"a stage process died ({type(exc).__name__}); its requests failed and it is being restarted")))
            self._rejoin(index)

    def _rejoin(self, index: int) -> None:
        while not self._closed:
            try:
                ray.get(self.actors[index].stats.remote(), timeout=5)  # restarted, with its weights
                self._wire([index], reset=True)
                return
            except (RayError, TimeoutError, OSError):
                time.sleep(0.5)  # not back yet (or gone for good: is_alive says so)
