"""All stages in one process, each on its own thread, so runs really overlap
(torch releases the GIL in its kernels) as they will across machines."""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

from pipeline.cores import own_cores, shares_cores
from pipeline.stage import Stage
from pipeline.stage_loop import STOP, StageLoop, every_message
from pipeline.trace import StageSpan
from pipeline.transport import ResultSink, Transport
from pipeline.types import Delivery, FreeSequence, KVOp, Ping, Run, RunResult

# Injected latency: (stage_index, layer_index) -> seconds to sleep before that layer.
LayerDelay = Callable[[int, int], float]

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
    shares_forwards = True  # a stage takes every run waiting for it in one forward (StageLoop)

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
        self._first_loop: StageLoop | None = None

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
        self._inboxes[0].put(op)

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
        self._inboxes[0].put(STOP)
        for thread in self._threads:
            thread.join(timeout=10)

    def _stage_loop(self, index: int) -> None:
        if self._cores:
            own_cores(self._cores[index])
        outbox = self._inboxes[index + 1] if index + 1 < self.num_stages else None
        inbox = self._inboxes[index]
        take = (lambda: self._waiting(inbox)) if index == 0 else (lambda: every_message(inbox))
        loop = StageLoop(self.stages[index], take, outbox and outbox.put, self._deliver, self._delay_hook(index))
        if index == 0:
            self._first_loop = loop
        loop.run()

    def send_ping(self, ping: Ping) -> bool:
        self._inboxes[0].put(ping)
        return True

    def _deliver(self, delivery: Delivery | Ping) -> None:
        if isinstance(delivery, Ping):
            self.ping_arrived(delivery)
            return
        if isinstance(delivery, RunResult):
            self._returning.left(delivery.seq_id, [delivery.run_id])
        self._on_result(delivery)

    def _waiting(self, inbox: queue.SimpleQueue) -> list:
        """The first stage's: every message waiting (at least one), and up to
        BATCH_WAIT_SHARE of its last forward for the runs of sequences back
        at the coordinator."""
        messages = [inbox.get()]
        deadline = time.monotonic() + BATCH_WAIT_SHARE * self._first_loop.forward_s
        while True:
            try:
                messages.append(inbox.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or STOP in messages or not self._returning.any_besides(
                    {run.seq_id for m in messages if isinstance(m, list) for run, _ in m}):
                return messages
            try:
                messages.append(inbox.get(timeout=remaining))
            except queue.Empty:
                return messages

    def _delay_hook(self, index: int) -> Callable[[int], None] | None:
        if self._layer_delay is None:
            return None
        delay = self._layer_delay
        return lambda layer: time.sleep(delay(index, layer))
