"""Stages as MPI ranks (mpi4py), for clusters launched by mpirun/srun.

Rank 0 runs the coordinator; rank i (1..N) runs stage i-1; a draft that
computes runs on a rank of its own, N+1, as PipeInfer runs it. Work (runs
and KV ops, with hidden states) flows rank 0 -> 1 -> ... -> N with
non-blocking sends; the last rank sends each RunResult back to rank 0.
Cancellations go from rank 0 straight to every stage on their own tag, which
a stage drains before each message and between layers, so they overtake
queued work. Draft requests go to the draft rank on theirs; its guesses come
back to rank 0 with the results. Where the ranks run, and on which cores,
is mpiexec's choice (e.g. `-bind-to core:3`); each rank computes with as
many torch threads as its plan's num_cpus.

Blocking MPI waits spin a core in most MPI builds; with few cores that steals
the stages' compute, so idle loops poll with a short sleep instead.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import torch

from compute.stage_model import DTYPES
from draft_models import load_draft
from pipeline.cores import use_cores
from pipeline.drafter import Drafter, DraftRequest, Guesses, GuessSink, ThreadDrafter
from pipeline.partition import StagePlan
from pipeline.stage import Stage, stage_failure
from pipeline.transport import ResultSink, Transport
from pipeline.types import KVOp, Run, RunResult

log = logging.getLogger(__name__)

TAG_WORK, TAG_RESULT, TAG_CONTROL, TAG_DRAFT = 1, 2, 3, 4
STOP, STOPPED = "stop", "stopped"
IDLE_POLL_S = 0.0002
HEARTBEAT_S = 1.0  # a computing stage tells rank 0 it progresses at most this often


def _comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


def mpi_rank_and_size() -> tuple[int, int]:
    comm = _comm()
    return comm.Get_rank(), comm.Get_size()


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
        self._stats: list[dict] = [{} for _ in range(num_stages)]
        self._heard_at = time.monotonic()  # the last message from any stage
        self._on_result: ResultSink | None = None
        self._receiver = threading.Thread(target=self._receive_results, name="mpi-results", daemon=True)

    def start(self, on_result: ResultSink) -> None:
        self._on_result = on_result
        self._receiver.start()

    def submit(self, run: Run) -> None:
        self._send((run, None), dest=1, tag=TAG_WORK)

    def send_kv_op(self, op: KVOp) -> None:
        self._send((op, None), dest=1, tag=TAG_WORK)

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

    def stage_spans(self) -> list:
        """Not collected over MPI: the benchmark's timeline needs the local or Ray transport."""
        return []

    def close(self) -> None:
        """Stop travels down the pipeline behind all work; the last stage
        answers "stopped", so every message in flight is received first."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._draft_rank is not None:
            self._send(STOP, dest=self._draft_rank, tag=TAG_DRAFT)
        self._send((STOP, None), dest=1, tag=TAG_WORK)
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

        while True:
            if not self._comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT):
                time.sleep(IDLE_POLL_S)
                continue
            kind, payload = self._comm.recv(source=MPI.ANY_SOURCE, tag=TAG_RESULT)
            self._heard_at = time.monotonic()  # a result, stats, or a heartbeat
            if kind == "result":
                self._on_result(payload)
            elif kind == "guesses":
                self._on_guesses(payload)
            elif kind == "stats":  # a stage's stats, sent after each KV op
                self._stats[payload["stage"]] = payload
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


def run_draft_worker(spec: str, model_dir: str, dtype: str, num_cpus: int) -> None:
    """Rank N+1: draft (on a ThreadDrafter) until rank 0 says stop."""
    comm = _comm()
    torch.set_grad_enabled(False)
    use_cores(None, num_cpus)
    sends: list = []

    def send_guesses(guesses: Guesses) -> None:  # from the drafter's thread; MPI is thread-safe here
        sends.append(comm.isend(("guesses", guesses), dest=0, tag=TAG_RESULT))

    drafter = ThreadDrafter(load_draft(spec, Path(model_dir), DTYPES[dtype], show_progress=False))
    drafter.start(send_guesses)
    while True:
        if not comm.iprobe(source=0, tag=TAG_DRAFT):
            time.sleep(IDLE_POLL_S)
            continue
        message = comm.recv(source=0, tag=TAG_DRAFT)
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
    def __init__(self, model_dir: str, plans: tuple[StagePlan, ...], dtype: str, kv_budget_bytes: int | None) -> None:
        self.comm = _comm()
        self.rank = self.comm.Get_rank()
        torch.set_grad_enabled(False)
        use_cores(None, plans[self.rank - 1].num_cpus)
        self.stage = Stage.load(model_dir, plans, self.rank - 1, dtype, kv_budget_bytes)
        self.next_rank = self.rank + 1 if self.rank < len(plans) else None
        self._sends: list = []
        self._beat_at = 0.0

    def serve(self) -> None:
        while True:
            self.drain_control()
            if not self.comm.iprobe(source=self.rank - 1, tag=TAG_WORK):
                time.sleep(IDLE_POLL_S)
                continue
            item, hidden = self.comm.recv(source=self.rank - 1, tag=TAG_WORK)
            if isinstance(item, Run):
                self._handle_run(item, hidden)
            elif item == STOP:
                break
            else:
                self._handle_kv_op(item)
        if self.next_rank is not None:
            self._send((STOP, None), dest=self.next_rank, tag=TAG_WORK)
        else:
            self._send((STOPPED, None), dest=0, tag=TAG_RESULT)
        for request in self._sends:
            request.wait()
        self.drain_control()

    def between_layers(self) -> None:
        self.drain_control()
        if time.monotonic() - self._beat_at >= HEARTBEAT_S:  # a long forward still progresses
            self._beat_at = time.monotonic()
            self._send(("alive", self.stage.stage_index), dest=0, tag=TAG_RESULT)

    def drain_control(self) -> None:
        """Apply pending cancellations: before each message and between layers."""
        while self.comm.iprobe(source=0, tag=TAG_CONTROL):
            _, seq_id, run_ids = self.comm.recv(source=0, tag=TAG_CONTROL)
            self.stage.cancel(seq_id, run_ids)

    def _handle_run(self, run: Run, hidden) -> None:
        try:
            out = self.stage.process(run, hidden, before_layer=lambda layer: self.between_layers())
        except Exception as exc:
            log.exception("stage %d failed on run %d", self.stage.stage_index, run.run_id)
            out = stage_failure(run, self.stage.stage_index, exc)
        if isinstance(out, RunResult):
            self._send(("result", out), dest=0, tag=TAG_RESULT)
        elif out is not None:
            self._send((run, out), dest=self.next_rank, tag=TAG_WORK)

    def _handle_kv_op(self, op: KVOp) -> None:
        try:
            self.stage.apply(op)
        except Exception as exc:
            self._send(("result", stage_failure(op, self.stage.stage_index, exc)),
                       dest=0, tag=TAG_RESULT)
        if self.next_rank is not None:
            self._send((op, None), dest=self.next_rank, tag=TAG_WORK)
        self._send(("stats", self.stage.stats()), dest=0, tag=TAG_RESULT)  # KV use, for metrics

    def _send(self, message, dest: int, tag: int) -> None:
        self._sends = [r for r in self._sends if not r.Test()]
        self._sends.append(self.comm.isend(message, dest=dest, tag=tag))
