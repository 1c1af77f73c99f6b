"""One stage's work loop, the same on every transport (threads, Ray actors,
MPI ranks): take every message waiting, put the runs among them through the
stage in one forward (Stage.process_batch: one read of the weights for all
of them), pass their hidden states on and their results back.

Messages, in the order the coordinator sent them:
- a list of (Run, hidden states or None): runs that travel together;
- a KV op (CommitKV, FreeSequence), applied in its place and passed on;
- RESET: every sequence is forgotten (a stage was restarted: the others'
  KV is stale), passed on;
- a Ping: passed on, and from the last stage back to the coordinator;
- STOP: the loop passes it on after the work before it, and ends.

A KV op of a sequence with runs in the batch being gathered ends that
batch first (its runs compute before the op), so every stage sees each
sequence's work in the order it was sent; another sequence's op commutes
with the batch.

At the first stage of a pipeline of several, a run chained behind one in
the batch being gathered starts the next forward instead: its parent moves
on to the next stage meanwhile, so the two overlap rather than take turns
(PipeInfer's continuous speculation). With one stage there is nothing to
overlap, and the child rides in its parent's forward for the cost of its
tokens.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

import torch

from compute.types import Failure, FailureCode
from pipeline.stage import Stage, failed, stage_failure
from pipeline.types import Delivery, KVOp, Ping, Run, RunResult

log = logging.getLogger(__name__)

STOP = "stop"
RESET = "reset"

Message = list | KVOp | Ping | str
Sender = Callable[[Message], None]


class StageLoop:
    def __init__(self, stage: Stage, take: Callable[[], list[Message]], send_on: Sender | None,
                 send_back: Callable[[Delivery | Ping], None],
                 before_layer: Callable[[int], None] | None = None,
                 after_kv_op: Callable[[], None] | None = None) -> None:
        """take() -> the messages to handle now, in the order sent, at least
        one (it waits for them: every_message(queue) for a queue; none: the
        inbox was closed, and the loop ends); send_on:
        to the next stage (None on the last); send_back: results and
        failures, to the coordinator; after_kv_op(): once a KV op is applied
        (MPI reports the KV in use)."""
        self.stage = stage
        self._take = take
        self._send_on = send_on
        self._send_back = send_back
        self._before_layer = before_layer
        self._after_kv_op = after_kv_op
        self.forward_s = 0.0  # the last forward's time (the first stage's batching wait uses it)

    def run(self) -> None:
        torch.set_grad_enabled(False)
        pipelines = self.stage.is_first and self._send_on is not None
        while True:
            batch: list[tuple[Run, torch.Tensor | None]] = []
            messages = self._take()
            if not messages:  # the inbox was closed
                return
            for message in messages:
                if isinstance(message, Ping):
                    if self._send_on is None:
                        self._send_back(message)
                    else:
                        self._pass_on(message)
                    continue
                if isinstance(message, list):  # runs (and their hidden states) that travel together
                    for run, hidden in message:
                        if pipelines and any(run.parent_run_id == other.run_id for other, _ in batch):
                            self._runs(batch)  # its parent first, on to the next stage
                            batch = []
                        batch.append((run, hidden))
                    continue
                if isinstance(message, str) or any(run.seq_id == message.seq_id for run, _ in batch):
                    self._runs(batch)  # the work before it first
                    batch = []
                if message == STOP:
                    self._pass_on(STOP)
                    return
                if message == RESET:
                    self.stage.reset()
                    self._pass_on(RESET)
                else:
                    self._kv_op(message)
            self._runs(batch)

    def _runs(self, batch: list) -> None:
        if not batch:
            return
        started = time.monotonic()
        try:
            outs = self.stage.process_batch(batch, self._before_layer)
        except Exception as exc:  # a failing stage fails the runs' requests, not the server
            log.exception("stage %d failed on runs %s", self.stage.stage_index, [run.run_id for run, _ in batch])
            outs = [stage_failure(run, self.stage.stage_index, exc) for run, _ in batch]
        self.forward_s = time.monotonic() - started
        onward = []
        for (run, _), out in zip(batch, outs):
            if isinstance(out, RunResult):
                self._send_back(out)
            elif out is not None:  # (None: cancelled)
                onward.append((run, out))
        if onward and not self._pass_on(onward):
            # The next stage is gone (its process died): these runs' requests fail now, not at a
            # timeout, as a stage down (503, worth a retry once it is restarted), not an internal error.
            down = Failure(FailureCode.STAGE_DOWN, f"stage {self.stage.stage_index + 1} is unreachable")
            for run, _ in onward:
                self._send_back(failed(run, down))

    def _kv_op(self, op: KVOp) -> None:
        try:
            self.stage.apply(op)
        except Exception as exc:
            log.exception("stage %d failed on %r", self.stage.stage_index, op)
            self._send_back(stage_failure(op, self.stage.stage_index, exc))
        self._pass_on(op)
        if self._after_kv_op is not None:
            self._after_kv_op()

    def _pass_on(self, message: Message) -> bool:
        """-> False where the next stage could not be reached (logged)."""
        if self._send_on is None:
            return True
        try:
            self._send_on(message)
            return True
        except (OSError, EOFError) as exc:
            log.warning("stage %d: the next stage is unreachable (%s)", self.stage.stage_index, exc)
            return False


def every_message(inbox: queue.SimpleQueue) -> list[Message]:
    """The next message (waited for) and every one behind it."""
    messages = [inbox.get()]
    while True:
        try:
            messages.append(inbox.get_nowait())
        except queue.Empty:
            return messages
