"""All stages in one process, each on its own thread, so runs really overlap
(torch releases the GIL in its kernels) as they will across machines."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import torch

from pipeline.cores import own_cores, shares_cores
from pipeline.stage import Stage, stage_failure
from pipeline.trace import StageSpan
from pipeline.transport import ResultSink, Transport
from pipeline.types import FreeSequence, KVOp, Run, RunResult

log = logging.getLogger(__name__)

# Injected latency: (stage_index, layer_index) -> seconds to sleep before that layer.
LayerDelay = Callable[[int, int], float]

_STOP = object()
# The first stage waits up to this share of its last forward for the next
# runs of sequences that are back at the coordinator (see _Returning).
BATCH_WAIT_SHARE = 0.25


class _Returning:
    """Which live sequences have no run inside the pipeline: their results
    are back and the coordinator is making their next runs. The first stage
    waits a moment for those, so that every request's runs share its forward
    rather than fall into groups that alternate (each group's forward reads
    every weight again). Sequences with runs inside are never waited for:
    that is the pipeline at work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside: dict[int, set[int]] = {}  # live seq_id -> its run ids inside the pipeline

    def entered(self, run: Run) -> None:
        with self._lock:
            self._inside.setdefault(run.seq_id, set()).add(run.run_id)

    def left(self, seq_id: int, run_ids) -> None:
        with self._lock:
            inside = self._inside.get(seq_id)
            if inside is not None:
                inside.difference_update(run_ids)

    def freed(self, seq_id: int) -> None:
        with self._lock:
            self._inside.pop(seq_id, None)

    def any_besides(self, seq_ids: set[int]) -> bool:
        with self._lock:
            return any(not inside and seq_id not in seq_ids for seq_id, inside in self._inside.items())


class LocalTransport(Transport):
    shares_forwards = True  # a stage takes every run waiting for it in one forward (_waiting)

    def __init__(self, stages: list[Stage], layer_delay: LayerDelay | None = None,
                 cores: list[list[int]] | None = None) -> None:
        """cores: one group per stage and one for the draft, each pinned to
        its own (None: the threads share whatever the process has)."""
        self.stages = stages
        self._cores = cores
        self.draft_cores = cores[-1] if cores else None
        self.draft_shares_cores = bool(cores) and shares_cores(cores[:-1], cores[-1])
        self.num_stages = len(stages)
        self.num_layers = sum(stage.model.num_layers for stage in stages)
        self._layer_delay = layer_delay
        self._inboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in stages]
        self._threads: list[threading.Thread] = []
        self._on_result: ResultSink | None = None
        self._returning = _Returning()
        self._forward_s = 0.0  # the first stage's last forward

    def start(self, on_result: ResultSink) -> None:
        self._on_result = on_result
        for index in range(self.num_stages):
            thread = threading.Thread(target=self._stage_loop, args=(index,), name=f"stage-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def submit(self, run: Run) -> None:
        self.submit_together([run])

    def submit_together(self, runs) -> None:
        for run in runs:
            self._returning.entered(run)
        self._inboxes[0].put([(run, None) for run in runs])  # one message: no stage takes one without the others

    def send_kv_op(self, op: KVOp) -> None:
        if isinstance(op, FreeSequence):
            self._returning.freed(op.seq_id)
        self._inboxes[0].put((op, None))

    def cancel(self, seq_id: int, run_ids: list[int]) -> None:
        self._returning.left(seq_id, run_ids)
        for stage in self.stages:
            stage.cancel(seq_id, run_ids)

    def is_alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def idle_s(self) -> float:
        return min(stage.idle_s() for stage in self.stages)

    def stage_stats(self) -> list[dict]:
        threads = self._threads or [None] * self.num_stages  # (not started yet)
        return [{**stage.stats(), "pid": os.getpid(), "thread_id": thread and thread.native_id}
                for stage, thread in zip(self.stages, threads)]

    def stage_spans(self) -> list[StageSpan]:
        return [span for stage in self.stages for span in stage.spans.drain()]

    def close(self) -> None:
        self._inboxes[0].put(_STOP)
        for thread in self._threads:
            thread.join(timeout=10)

    def _stage_loop(self, index: int) -> None:
        stage, inbox = self.stages[index], self._inboxes[index]
        outbox = self._inboxes[index + 1] if index + 1 < self.num_stages else None
        before_layer = self._delay_hook(index)
        torch.set_grad_enabled(False)
        if self._cores:
            own_cores(self._cores[index])
        while True:
            messages = self._waiting(inbox, index)
            batch: list[tuple[Run, torch.Tensor | None]] = []
            for message in messages:
                if message is _STOP:
                    self._handle_runs(stage, batch, outbox, before_layer)
                    if outbox is not None:
                        outbox.put(_STOP)
                    return
                if isinstance(message, list):  # runs (and their hidden states) that travel together
                    batch += message
                    continue
                item, _ = message
                if any(run.seq_id == item.seq_id for run, _ in batch):  # its sequence's runs first
                    self._handle_runs(stage, batch, outbox, before_layer)
                    batch = []
                self._handle_kv_op(stage, item, outbox)  # (another sequence's op commutes with the batch)
            self._handle_runs(stage, batch, outbox, before_layer)

    def _waiting(self, inbox: queue.SimpleQueue, index: int) -> list:
        """Every message waiting (at least one): its runs go through the
        layers together. The first stage also waits, up to BATCH_WAIT_SHARE
        of its last forward, for the runs of sequences back at the coordinator."""
        messages = [inbox.get()]
        deadline = time.monotonic() + BATCH_WAIT_SHARE * self._forward_s if index == 0 else 0.0
        while True:
            try:
                messages.append(inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or any(m is _STOP for m in messages) or not self._returning.any_besides(
                    {run.seq_id for m in messages if isinstance(m, list) for run, _ in m}):
                return messages
            try:
                messages.append(inbox.get(timeout=remaining))
            except queue.Empty:
                return messages

    def _handle_runs(self, stage: Stage, batch: list, outbox, before_layer) -> None:
        if not batch:
            return
        started = time.monotonic()
        try:
            outs = stage.process_batch(batch, before_layer)
        except Exception as exc:  # a failing stage fails the runs' requests, not the server
            log.exception("stage %d failed on runs %s", stage.stage_index, [run.run_id for run, _ in batch])
            outs = [stage_failure(run, stage.stage_index, exc) for run, _ in batch]
        if stage.is_first:
            self._forward_s = time.monotonic() - started
        onward = []
        for (run, _), out in zip(batch, outs):
            if out is None:
                continue
            if isinstance(out, RunResult):
                self._returning.left(run.seq_id, [run.run_id])
                self._on_result(out)
            else:
                onward.append((run, out))
        if onward:
            outbox.put(onward)  # the next stage takes them in one forward too

    def _handle_kv_op(self, stage: Stage, op: KVOp, outbox) -> None:
        try:
            stage.apply(op)
        except Exception as exc:
            log.exception("stage %d failed on %r", stage.stage_index, op)
            self._on_result(stage_failure(op, stage.stage_index, exc))
        if outbox is not None:
            outbox.put((op, None))

    def _delay_hook(self, index: int) -> Callable[[int], None] | None:
        if self._layer_delay is None:
            return None
        delay = self._layer_delay
        return lambda layer: time.sleep(delay(index, layer))
