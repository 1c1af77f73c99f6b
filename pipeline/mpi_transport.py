"""Stages as MPI ranks (mpi4py), for clusters launched by mpirun/srun.

Rank 0 runs the coordinator; rank i (1..N) runs stage i-1; a draft that
computes runs on a rank of its own, N+1, as PipeInfer runs it. Work (runs
and KV ops, with hidden states: pipeline/stage_loop.py's messages) flows
rank 0 -> 1 -> ... -> N with non-blocking sends; each rank's StageLoop takes
the runs waiting for it in one forward; results and failures go back to
rank 0. Cancellations go from rank 0 straight to every stage on their own
tag, which a stage applies before each look for work and between layers,
so they overtake queued work and reach a forward in progress. Draft requests go to the draft rank on theirs; its guesses come
back to rank 0 with the results. Where the ranks run, and on which cores,
is mpiexec's choice (e.g. `-bind-to core:3`); each rank computes with as
many torch threads as its plan's num_cpus.

Blocking MPI waits spin a core in most MPI builds; with few cores that steals
the stages' compute, so receiving loops poll with a sleep between looks:
short while messages flow (a hop costs about the sleep), longer once idle.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
import threading
import time
from pathlib import Path

import torch

from compute.stage_model import DTYPES
from draft_models import load_draft
from pipeline.channel import dumps
from pipeline.cores import split_cores, use_cores
from pipeline.drafter import Drafter, DraftRequest, Guesses, GuessSink, ThreadDrafter
from pipeline.partition import StagePlan
from pipeline.stage import Stage
from pipeline.stage_loop import STOP, StageLoop
from pipeline.trace import StageSpan
from pipeline.transport import ResultSink, Transport
from pipeline.types import KVOp, Ping, Run

log = logging.getLogger(__name__)

TAG_WORK, TAG_RESULT, TAG_CONTROL, TAG_DRAFT = 1, 2, 3, 4
STOPPED = "stopped"
ACTIVE_POLL_S, IDLE_POLL_S = 0.00005, 0.0005  # between looks while messages flow / once idle
ACTIVE_WINDOW_S = 0.05  # messages flow: one came this recently
HEARTBEAT_S = 1.0  # a computing stage tells rank 0 it progresses at most this often


class Poll:
    """The sleep between two looks for a message: short within
    ACTIVE_WINDOW_S of the last one (a hop costs about the sleep), long
    once idle (each look costs a little of a core)."""

    __slots__ = ("_heard_at",)

    def __init__(self) -> None:
        self._heard_at = 0.0

    def heard(self) -> None:
        self._heard_at = time.monotonic()

    def wait(self) -> None:
        time.sleep(ACTIVE_POLL_S if time.monotonic() - self._heard_at < ACTIVE_WINDOW_S else IDLE_POLL_S)


def _comm():
    from mpi4py import MPI

    if MPI.pickle.dumps is not dumps:  # tensors as their raw bytes: a hop's pickling 94 -> 22 us (channel.py)
        MPI.pickle.__init__(dumps, pickle.loads)
    return MPI.COMM_WORLD


def mpi_rank_and_size() -> tuple[int, int]:
    comm = _comm()
    return comm.Get_rank(), comm.Get_size()


def local_cores(index: int, counts: list[int]) -> list[int] | None:
    """Worker `index`'s cores (stage ranks in order, then a draft rank) where
    every rank of the job runs on this machine (MPICH's MPI_LOCALNRANKS):
    cores of their own, as local and Ray stages get, so that one many-core
    machine is a faithful cluster. Else None: placement is mpiexec's."""
    if os.environ.get("MPI_LOCALNRANKS") != str(_comm().Get_size()):
        return None
    return split_cores(counts)[index]


def check_rank_count(num_stages: int, has_draft_rank: bool) -> None:
    size, needed = _comm().Get_size(), num_stages + 1 + has_draft_rank
    if size != needed:
        parts = "coordinator + stages" + (" + the draft" if has_draft_rank else "")
        raise ValueError(f"--stages {num_stages} needs {needed} MPI ranks ({parts}), got {size}")


ABORT_GRACE_S = 1.0


def abort_all_ranks(code: int) -> None:
    """End every rank of the job (after an error on the coordinator).

    mpiexec forwards each rank's output asynchronously and Abort tears the job
    down at once, so the error just printed could be lost (seen once in CI):
    flush, and give the forwarder a moment first."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(ABORT_GRACE_S)
    _comm().Abort(code)


class MPITransport(Transport):
    """The coordinator's side (rank 0)."""

    def __init__(self, plans: tuple[StagePlan, ...], has_draft_rank: bool = False) -> None:
        self._comm = _comm()
        if self._comm.Get_rank() != 0:
            raise RuntimeError("MPITransport runs on rank 0; other ranks run run_stage_worker()")
        num_stages = len(plans)
        check_rank_count(num_stages, has_draft_rank)
        self._draft_rank = num_stages + 1 if has_draft_rank else None
        self._on_guesses: GuessSink | None = None
        self.num_stages = num_stages
        self.num_layers = sum(p.layer_end - p.layer_start for p in plans)
        self._sends: list = []
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stats: list[dict] = [{} for _ in range(num_stages)]  # each stage's last (its KV use, for metrics)
        self._spans: list[StageSpan] = []
        self._spans_lock = threading.Lock()
        self._heard_at = time.monotonic()  # the last message from any stage
        self._on_result: ResultSink | None = None
        self._receiver = threading.Thread(target=self._receive_results, name="mpi-results", daemon=True)

    def start(self, on_result: ResultSink) -> None:
        self._on_result = on_result
        self._receiver.start()

    shares_forwards = True  # each rank's StageLoop takes every run waiting in one forward

    def submit(self, run: Run) -> None:
        self.submit_together([run])

    def submit_together(self, runs) -> None:
        self._send([(run, None) for run in runs], dest=1, tag=TAG_WORK)  # one message: they travel together

    def send_kv_op(self, op: KVOp) -> None:
        self._send(op, dest=1, tag=TAG_WORK)

    def send_ping(self, ping: Ping) -> bool:
        self._send(ping, dest=1, tag=TAG_WORK)
        return True

    def cancel(self, seq_id: int, run_ids: list[int]) -> None:
        for rank in range(1, self.num_stages + 1):
            self._send(("cancel", seq_id, run_ids), dest=rank, tag=TAG_CONTROL)

    def drafter(self, spec: str, model_dir: Path, dtype: str) -> Drafter:
        """A draft that computes runs on the draft rank."""
        if self._draft_rank is None:
            return super().drafter(spec, model_dir, dtype)
        return _MPIDrafter(self)

    def is_alive(self) -> bool:
        return not self._stopping.is_set() and self._receiver.is_alive()

    def idle_s(self) -> float:
        return time.monotonic() - self._heard_at

    def stage_stats(self) -> list[dict]:
        return [s for s in self._stats if s]

    def stage_spans(self) -> list[StageSpan]:
        """What the stages sent with their stats since the last call (a rank's
        spans ride with the stats it sends after each KV op)."""
        with self._spans_lock:
            spans, self._spans = self._spans, []
        return spans

    def close(self) -> None:
        """Stop travels down the pipeline behind all work; the last stage
        answers "stopped", so every message in flight is received first."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._draft_rank is not None:
            self._send(STOP, dest=self._draft_rank, tag=TAG_DRAFT)
        self._send(STOP, dest=1, tag=TAG_WORK)
        self._receiver.join(timeout=30)
        with self._send_lock:
            for request in self._sends:
                request.wait()
            self._sends.clear()

    def _send(self, message, dest: int, tag: int) -> None:
        with self._send_lock:
            self._sends = [r for r in self._sends if not r.Test()]
            self._sends.append(self._comm.isend(message, dest=dest, tag=tag))

    def _receive_results(self) -> None:
        from mpi4py import MPI

        poll = Poll()
        while True:
            if not self._comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT):
                poll.wait()
                continue
            kind, payload = self._comm.recv(source=MPI.ANY_SOURCE, tag=TAG_RESULT)
            self._heard_at = time.monotonic()  # a result, stats, or a heartbeat
            if kind != "alive":
                poll.heard()
            if kind == "result" and isinstance(payload, Ping):
                self.ping_arrived(payload)
            elif kind == "result":
                self._on_result(payload)
            elif kind == "guesses":
                self._on_guesses(payload)
            elif kind == "stats":  # a stage's stats and its spans since, sent after each KV op
                stats, spans = payload
                self._stats[stats["stage"]] = stats
                with self._spans_lock:
                    self._spans += spans
            elif kind == STOPPED:
                return


class _MPIDrafter:
    """The Drafter protocol on rank 0, for the draft rank: requests go out on
    TAG_DRAFT, guesses come back through the transport's receiver."""

    def __init__(self, transport: MPITransport) -> None:
        self._transport = transport

    def start(self, on_guesses: GuessSink) -> None:
        self._transport._on_guesses = on_guesses

    def request(self, request: DraftRequest) -> None:
        self._transport._send(request, dest=self._transport._draft_rank, tag=TAG_DRAFT)

    def release(self, seq_id: int) -> None:
        self._transport._send(seq_id, dest=self._transport._draft_rank, tag=TAG_DRAFT)

    def close(self) -> None:
        pass  # the transport stops the draft rank with the stages

    def where(self) -> dict:
        return {"runs_on": "mpi rank", "rank": self._transport._draft_rank}


def run_draft_worker(spec: str, model_dir: str, dtype: str, num_cpus: int,
                     stage_cpus: list[int] | None = None) -> None:
    """Rank N+1: draft (on a ThreadDrafter) until rank 0 says stop.
    stage_cpus: the stages' cores, counted before the draft's."""
    comm = _comm()
    torch.set_grad_enabled(False)
    counts = [*(stage_cpus or []), num_cpus]
    use_cores(local_cores(len(counts) - 1, counts), num_cpus, whole_process=True)
    sends: list = []

    def send_guesses(guesses: Guesses) -> None:  # from the drafter's thread; MPI is thread-safe here
        sends.append(comm.isend(("guesses", guesses), dest=0, tag=TAG_RESULT))

    drafter = ThreadDrafter(load_draft(spec, Path(model_dir), DTYPES[dtype], show_progress=False))
    drafter.start(send_guesses)
    poll = Poll()
    while True:
        if not comm.iprobe(source=0, tag=TAG_DRAFT):
            poll.wait()
            continue
        message = comm.recv(source=0, tag=TAG_DRAFT)
        poll.heard()
        if message == STOP:
            break
        if isinstance(message, DraftRequest):
            drafter.request(message)
        else:
            drafter.release(message)
    drafter.close()
    for request in sends:
        request.wait()


def run_stage_worker(model_dir: str, plans: tuple[StagePlan, ...], dtype: str,
                     kv_budget_bytes: int | None = None) -> None:
    """Ranks 1..N: serve one stage until rank 0 says stop."""
    _StageWorker(model_dir, plans, dtype, kv_budget_bytes).serve()


class _StageWorker:
    """A stage rank: the StageLoop every transport shares, taking what the
    rank before sent (every message waiting, runs together) on its own
    thread, and cancellations from rank 0 before each look and between
    layers (no receiving thread of its own to contend for the GIL with)."""

    def __init__(self, model_dir: str, plans: tuple[StagePlan, ...], dtype: str, kv_budget_bytes: int | None) -> None:
        self.comm = _comm()
        self.rank = self.comm.Get_rank()
        torch.set_grad_enabled(False)
        counts = [int(plan.num_cpus) for plan in plans]
        use_cores(local_cores(self.rank - 1, counts), counts[self.rank - 1], whole_process=True)
        self.stage = Stage.load(model_dir, plans, self.rank - 1, dtype, kv_budget_bytes)
        self.next_rank = self.rank + 1 if self.rank < len(plans) else None
        self._sends: list = []
        self._beat_at = 0.0
        self._poll = Poll()

    def serve(self) -> None:
        send_on = None if self.next_rank is None else (
            lambda message: self._send(message, dest=self.next_rank, tag=TAG_WORK))
        StageLoop(self.stage, self._take, send_on,
                  lambda delivery: self._send(("result", delivery), dest=0, tag=TAG_RESULT),
                  before_layer=self._between_layers, after_kv_op=self._report_stats).run()
        if self.next_rank is None:
            self._send((STOPPED, None), dest=0, tag=TAG_RESULT)
        for request in self._sends:
            request.wait()
        self._drain_control()

    def _take(self) -> list:
        """Every message the rank before sent that has arrived, in order (waiting for one)."""
        while True:
            self._drain_control()
            messages = []
            while self.comm.iprobe(source=self.rank - 1, tag=TAG_WORK):
                messages.append(self.comm.recv(source=self.rank - 1, tag=TAG_WORK))
            if messages:
                self._poll.heard()
                return messages
            self._poll.wait()

    def _drain_control(self) -> None:
        """Cancellations overtake queued work: applied before each look and between layers."""
        while self.comm.iprobe(source=0, tag=TAG_CONTROL):
            _, seq_id, run_ids = self.comm.recv(source=0, tag=TAG_CONTROL)
            self.stage.cancel(seq_id, run_ids)

    def _between_layers(self, layer: int) -> None:
        self._drain_control()
        self._heartbeat()

    def _heartbeat(self) -> None:
        if time.monotonic() - self._beat_at >= HEARTBEAT_S:  # a long forward still progresses
            self._beat_at = time.monotonic()
            self._send(("alive", self.stage.stage_index), dest=0, tag=TAG_RESULT)

    def _report_stats(self) -> None:
        self._send(("stats", (self.stage.stats(), self.stage.spans.drain())), dest=0, tag=TAG_RESULT)

    def _send(self, message, dest: int, tag: int) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.comm.isend(message, dest=dest, tag=tag))
