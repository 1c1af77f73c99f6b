"""How runs travel between the coordinator and the stages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pipeline.trace import StageSpan
from pipeline.types import KVOp, Run, RunResult

ResultSink = Callable[[RunResult], None]


class Transport(Protocol):
    """Carries runs and KV ops through the stages, in order, and results back.

    - submit(run) and send_kv_op(op) enter the first stage and travel down the
      pipeline in the order they were sent, so every stage applies KV ops at
      the same point relative to the runs.
    - cancel() overtakes queued work: a stage skips a cancelled run, or stops
      it between two layers.
    - Results (and errors, as RunResult.error) go to the sink given to start();
      a sequence-level error carries run_id -1, and one that loses every
      sequence's state (a stage process died) seq_id -1 as well.
    """

    num_stages: int

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
