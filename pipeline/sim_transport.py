"""A cluster in simulated time: the real coordinator, the real draft and the
real (small) model compute the real tokens, while every stage and link is
charged the time a ClusterProfile says it would take on the cluster modelled.

A discrete-event loop on one thread owns the clock and drives the
coordinator (it steps it), so the coordinator's decisions happen at
simulated instants: results arrive when the modelled pipeline would deliver
them, the draft works on a node of its own and its guesses arrive after the
modelled draft time, and a cancellation stops a stage at the next modelled
layer boundary.
Links are FIFO, like TCP/MPI channels; transfers on one link do not queue
behind each other (a link is far from saturated by one request's activations).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from compute.stage_model import DTYPES
from draft_models import load_draft
from draft_models.base import DraftModel
from pipeline.drafter import GUESS_STEP, DraftLines, DraftRequest, Guesses, GuessSink
from pipeline.sim_profiles import ClusterProfile
from pipeline.stage import Stage, result_bytes, stage_failure
from pipeline.trace import SpanRecorder, StageSpan
from pipeline.transport import ResultSink, Transport
from pipeline.types import KVOp, Run, RunResult

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # real seconds to wait for new requests when nothing is scheduled
KV_OP_BYTES = 16
CANCEL_BYTES = 16


@dataclass(slots=True)
class _Busy:
    """The run a stage is computing, in simulated time."""

    run: Run
    hidden: torch.Tensor | None
    start_s: float
    end_s: float
    version: int  # bumped when a cancellation moves end_s: stale "done" events are ignored


class SimulatedTransport(Transport):
    drives_coordinator = True

    def __init__(self, stages: list[Stage], profile: ClusterProfile) -> None:
        if len(stages) != profile.num_stages:
            raise ValueError(f"profile {profile.name} has {profile.num_stages} stages, got {len(stages)}")
        self.stages = stages
        self.num_stages = len(stages)
        self.num_layers = profile.num_layers
        self.profile = profile
        self.now = 0.0  # time of the event being handled
        self.cursor = 0.0  # the coordinator's own time (never behind the event being handled)
        self.spans = SpanRecorder()
        self._heap: list[tuple[float, int, str, tuple]] = []
        self._order = itertools.count()  # equal times keep their scheduling order
        self._queues: list[deque] = [deque() for _ in stages]
        self._busy: list[_Busy | None] = [None] * len(stages)
        self._versions = itertools.count()
        self._link_free_at = [0.0] * (len(stages) + 1)  # FIFO per link: 0 = coordinator -> stage 0
        self._result_sink: ResultSink | None = None
        self._thread: threading.Thread | None = None

    # ---- called by the coordinator (on the simulation thread) -----------

    def clock(self) -> float:
        return self.cursor

    def drafter(self, spec: str, model_dir: Path, dtype: str) -> SimulatedDrafter:
        return SimulatedDrafter(load_draft(spec, model_dir, DTYPES[dtype], show_progress=False), self)

    def start(self, on_result: ResultSink) -> None:
        self._result_sink = on_result

    def drive(self, coordinator) -> None:
        """Run the event loop, and the coordinator in it, on a thread of its own."""
        self._thread = threading.Thread(target=self._drive, args=(coordinator,), name="simulation", daemon=True)
        self._thread.start()

    def submit(self, run: Run) -> None:
        self._send(0, (run, None), 4 * len(run.token_ids), self.cursor)

    def send_kv_op(self, op: KVOp) -> None:
        self._send(0, (op, None), KV_OP_BYTES, self.cursor)

    def cancel(self, seq_id: int, run_ids: list[int]) -> None:
        """Straight to every stage at once (its own small message)."""
        self.schedule(self.cursor + self.profile.link_time_s(CANCEL_BYTES), "cancel", (seq_id, list(run_ids)))

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def idle_s(self) -> float:
        return 0.0  # simulated time never stalls (and nothing watches it)

    def stage_stats(self) -> list[dict]:
        return [stage.stats() for stage in self.stages]

    def stage_spans(self) -> list[StageSpan]:
        return self.spans.drain()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the event loop ---------------------------------------------------

    def _drive(self, coordinator) -> None:
        torch.set_grad_enabled(False)
        # All compute happens on this one thread, one stage at a time. Small
        # ops from it ran ~20x slower with 2 intra-op threads than with 1
        # (measured on 2 cores), so the simulation computes single-threaded.
        torch.set_num_threads(1)
        while not coordinator.is_stopped:
            if not self._heap:
                coordinator.step(IDLE_WAIT_S)  # wait (in real time) for requests
                continue
            when, _, kind, payload = heapq.heappop(self._heap)
            self.now = when
            self.cursor = max(self.cursor, when)
            try:
                getattr(self, f"_on_{kind}")(*payload)
            except Exception:  # a bug here must not silently stop the clock
                log.exception("simulation failed on %s", kind)
                raise
            coordinator.step(0)  # handle whatever that delivered, and launch

    def schedule(self, when: float, kind: str, payload: tuple) -> None:
        heapq.heappush(self._heap, (when, next(self._order), kind, payload))

    def _send(self, link: int, item: tuple, num_bytes: int, sent_at: float) -> None:
        """Over link `link` into stage `link`; FIFO: never overtakes an earlier message."""
        arrives = max(sent_at + self.profile.link_time_s(num_bytes), self._link_free_at[link])
        self._link_free_at[link] = arrives
        self.schedule(arrives, "arrive", (link, item))

    def _on_arrive(self, stage: int, item: tuple) -> None:
        self._queues[stage].append(item)
        if self._busy[stage] is None:
            self._start_next(stage)

    def _on_cancel(self, seq_id: int, run_ids: list[int]) -> None:
        for index, stage in enumerate(self.stages):
            stage.cancel(seq_id, run_ids)
            busy = self._busy[index]
            if busy is not None and busy.run.run_id in run_ids:
                layer_s = self.profile.layer_time_s(index, len(busy.run.token_ids))
                layers_done = math.ceil((self.now - busy.start_s) / layer_s - 1e-9)
                busy.end_s = min(busy.end_s, busy.start_s + layers_done * layer_s)
                busy.version = next(self._versions)
                self.schedule(max(busy.end_s, self.now), "done", (index, busy.version))

    def _on_done(self, index: int, version: int) -> None:
        busy = self._busy[index]
        if busy is None or busy.version != version:
            return  # superseded by a cancellation
        stage, run = self.stages[index], busy.run
        out = self._compute(stage, run, busy.hidden)
        self._busy[index] = None
        if out is None:
            self._record(index, run, busy.start_s, "stopped", 0)
        elif isinstance(out, RunResult):
            num_bytes = 0 if out.failure else result_bytes(out)
            self._record(index, run, busy.start_s, "computed", num_bytes)
            self.schedule(self.now + self.profile.link_time_s(num_bytes), "deliver", (out,))
        else:
            num_bytes = self.profile.hidden_bytes(len(run.token_ids))
            self._record(index, run, busy.start_s, "computed", num_bytes)
            self._send(index + 1, (run, out), num_bytes, self.now)
        self._start_next(index)

    def _on_deliver(self, result: RunResult) -> None:
        self._result_sink(result)

    def _on_guesses(self, drafter: SimulatedDrafter, guesses: Guesses) -> None:
        drafter.delivered(guesses)

    def _start_next(self, index: int) -> None:
        stage, queue_ = self.stages[index], self._queues[index]
        while queue_ and self._busy[index] is None:
            item, hidden = queue_.popleft()
            if not isinstance(item, Run):
                self._apply(stage, item)
                if index + 1 < self.num_stages:
                    self._send(index + 1, (item, None), KV_OP_BYTES, self.now)
            elif stage.is_cancelled(item):
                stage.process(item, hidden)  # counts the skip
                self._record(index, item, self.now, "skipped", 0)
            else:
                duration = self.profile.stage_time_s(index, len(item.token_ids))
                busy = _Busy(item, hidden, self.now, self.now + duration, next(self._versions))
                self._busy[index] = busy
                self.schedule(busy.end_s, "done", (index, busy.version))

    def _compute(self, stage: Stage, run: Run, hidden):
        try:
            return stage.process(run, hidden)
        except Exception as exc:  # fails the run's request, as on a real stage
            log.exception("stage %d failed on run %d", stage.stage_index, run.run_id)
            return stage_failure(run, stage.stage_index, exc)

    def _apply(self, stage: Stage, op: KVOp) -> None:
        try:
            stage.apply(op)
        except Exception as exc:
            log.exception("stage %d failed on %r", stage.stage_index, op)
            self._result_sink(stage_failure(op, stage.stage_index, exc))

    def _record(self, index: int, run: Run, start_s: float, outcome: str, out_bytes: int) -> None:
        self.spans.record(StageSpan(index, run.seq_id, run.run_id, run.is_speculative, len(run.token_ids),
                                    start_s, self.now, outcome, out_bytes))


class SimulatedDrafter:
    """The draft on a node of its own, in simulated time: each batch of
    guesses is computed at once (the real draft, the real tokens) and
    delivered after the profile's time for it; the node takes one batch at a
    time. A draft that computes nothing (n-gram lookup) answers at once."""

    def __init__(self, draft: DraftModel, simulator: SimulatedTransport) -> None:
        self._lines = DraftLines(draft)
        self._sim = simulator
        self._is_busy = False
        self._last: int | None = None
        self._sink: GuessSink | None = None

    def start(self, on_guesses: GuessSink) -> None:
        self._sink = on_guesses

    def request(self, request: DraftRequest) -> None:
        self._lines.apply(request)
        self._next()

    def release(self, seq_id: int) -> None:
        self._lines.release(seq_id)

    def close(self) -> None:
        pass

    def where(self) -> dict:
        return {"runs_on": "simulated node"}

    def delivered(self, guesses: Guesses) -> None:
        self._is_busy = False
        self._sink(guesses)
        self._next()

    def _next(self) -> None:
        line = None if self._is_busy else self._lines.next_wanting(self._last)
        if line is None:
            return
        self._last = line.seq_id
        is_free = self._lines.draft.is_free
        guesses = self._lines.extend(line, line.wants if is_free else GUESS_STEP)
        profile = self._sim.profile
        cost = 0.0 if is_free else profile.draft_call_s + len(guesses.token_ids) * profile.draft_token_s
        guesses = dataclasses.replace(guesses, seconds=cost)
        self._is_busy = True
        self._sim.schedule(self._sim.cursor + cost, "guesses", (self, guesses))
