"""How runs travel between the coordinator and the stages."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from compute.stage_model import DTYPES
from draft_models import load_draft
from pipeline.drafter import Drafter, local_drafter
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

    # Runs waiting together for a stage go through it in one forward: a run
    # chained behind one submitted with it rides with it, costing its tokens
    # and not a forward of its own (nothing of it overlaps its parent).
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

    def close(self) -> None: ...
