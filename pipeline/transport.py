"""How runs travel between the coordinator and the stages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from pipeline.trace import StageSpan
from pipeline.types import Delivery, KVOp, Run

ResultSink = Callable[[Delivery], None]


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

    Transports subclass it for the defaults below: real time, and a
    coordinator that runs its own loop thread. The simulator overrides them:
    it owns the clock, steps the coordinator and charges the draft's time.
    """

    num_stages: int
    clock: Callable[[], float] = staticmethod(time.perf_counter)
    drives_coordinator: bool = False

    def drive(self, coordinator) -> None:
        """Run the coordinator's loop (only where drives_coordinator is True)."""
        raise NotImplementedError

    def charge_draft(self, draft, num_tokens: int) -> None:
        """The draft just guessed num_tokens tokens (their cost is real time here)."""

    def start(self, on_result: ResultSink) -> None: ...

    def submit(self, run: Run) -> None: ...

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

    def close(self) -> None: ...
