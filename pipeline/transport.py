"""How runs travel between the coordinator and the stages."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from compute.stage_model import DTYPES
from draft_models import load_draft
from pipeline.drafter import Drafter, local_drafter
from pipeline.trace import StageSpan
from pipeline.types import Delivery, KVOp, Ping, Run

ResultSink = Callable[[Delivery], None]
PING_ROUND_TRIPS = 50


class Transport(Protocol):
    """Carries runs and KV ops through the stages, in order, and results back.

    - submit(run) and send_kv_op(op) enter the first stage and travel down the
      pipeline in the order they were sent, so every stage applies KV ops at
      the same point relative to the runs.
    - cancel() overtakes queued work: a stage skips a cancelled run, or stops
      it between two layers.
    - What comes back goes to the sink given to start(): each run's RunResult
      (with a `failure` when a stage failed on it), a SequenceFailed when a
      stage could not apply a sequence's KV op, a PipelineFailed when every
      sequence's state is lost (a stage process died).

    Transports subclass it for the defaults below: real time, a coordinator
    that runs its own loop thread, a draft beside it. The simulator overrides
    them: it owns the clock, steps the coordinator and times the draft.
    """

    num_stages: int
    num_layers: int  # decoder layers over all stages (the modelled cluster's, when simulated)
    clock: Callable[[], float] = staticmethod(time.perf_counter)
    drives_coordinator: bool = False

    def drive(self, coordinator) -> None:
        """Run the coordinator's loop (only where drives_coordinator is True)."""
        raise NotImplementedError

    # Runs waiting together for a stage go through it in one forward. On a
    # single stage a run chained behind one submitted with it rides with it,
    # costing its tokens and not a forward of its own; the first of several
    # stages computes it next instead, overlapping its parent (stage_loop.py).
    shares_forwards: bool = False
    draft_cores: list[int] | None = None  # the draft's own cores, where it shares this machine
    draft_shares_cores: bool = False  # the draft computes on cores a stage computes on (too few cores)

    def drafter(self, spec: str, model_dir: Path, dtype: str) -> Drafter:
        """Where the draft runs: inline when it costs nothing, else on a
        thread of its own beside the coordinator (on draft_cores)."""
        return local_drafter(load_draft(spec, model_dir, DTYPES[dtype], show_progress=False), self.draft_cores)

    def start(self, on_result: ResultSink) -> None: ...

    def submit(self, run: Run) -> None: ...

    def submit_together(self, runs: Sequence[Run]) -> None:
        """Runs the coordinator launched in one step (one sequence's, in
        chain order): where the transport shares forwards, they go through
        every stage in one."""
        for run in runs:
            self.submit(run)

    def send_kv_op(self, op: KVOp) -> None: ...

    def cancel(self, seq_id: int, run_ids: list[int]) -> None: ...

    def is_alive(self) -> bool:
        """False once any stage is gone."""
        ...

    def idle_s(self) -> float:
        """Seconds since any stage last made progress (a layer, a run, a KV
        op): the stall watchdog's evidence that the pipeline itself is stuck."""
        ...

    def stage_stats(self) -> list[dict]:
        """Stage.stats() of every stage, in order."""
        ...

    def stage_spans(self) -> list[StageSpan]:
        """The spans every stage recorded since the last call (empty where
        the transport cannot collect them)."""
        ...

    def send_ping(self, ping: Ping) -> bool:
        """Into the first stage, behind the work sent before it; the last
        stage's Ping comes back through ping_arrived(). False: not supported
        (the simulator charges hops from its profile)."""
        return False

    def measure_hops(self, num_pings: int = PING_ROUND_TRIPS, timeout_s: float = 10.0) -> dict | None:
        """Pings sent one at a time through the idle pipeline and back:
        round_trip_ms_p50, hops (num_stages + 1: in, between the stages,
        back) and ms_per_hop_p50, everything a message costs to cross but
        compute (pickling, the channel, waking the reader). None where not
        supported or a ping did not come back in time."""
        round_trips = []
        for ping_id in range(num_pings):
            started = time.perf_counter()
            if not self.send_ping(Ping(ping_id)):
                return None
            try:
                while self._pings().get(timeout=timeout_s).ping_id != ping_id:
                    pass  # a late one from an earlier measurement
            except queue.Empty:
                return None
            round_trips.append(time.perf_counter() - started)
        hops = self.num_stages + 1
        median = sorted(round_trips)[len(round_trips) // 2]
        return {"round_trip_ms_p50": round(1000 * median, 4), "hops": hops,
                "ms_per_hop_p50": round(1000 * median / hops, 4)}

    def ping_arrived(self, ping: Ping) -> None:
        """The transport's result path calls this for a Ping back from the last stage."""
        self._pings().put(ping)

    _ping_queue: queue.SimpleQueue | None = None  # made at the first ping (transports keep their own __init__)

    def _pings(self) -> queue.SimpleQueue:
        if self._ping_queue is None:
            self._ping_queue = queue.SimpleQueue()
        return self._ping_queue

    def close(self) -> None: ...
