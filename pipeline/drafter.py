"""Drafting off the coordinator's critical path.

A Drafter keeps, per sequence, a *line*: the verified text followed by its
own guesses of the continuation. The coordinator tells it (DraftRequest)
which tokens are now verified and how far ahead to guess; the drafter
rolls its line back where the verified text departs from its guesses
(its draft reuses the KV of the common prefix), extends it, and sends the
new guesses back (Guesses) whenever they are ready. The coordinator takes
whatever guesses it has and never waits for them (sync mode excepted, by
definition).

Every guess is a pure function of the line and the request's sampling: the
greedy argmax, or for a seeded request the same Gumbel-noise choice the
target makes at that position; only unseeded requests draw from a random
stream (the drafter's own). So guesses, and the text, do not depend on when
they arrive.

Implementations: InlineDrafter (guesses at once, on the caller's thread: for
drafts that cost nothing, n-gram lookup and none), ThreadDrafter (its own
thread and torch threads), and, elsewhere, a Ray actor, an MPI rank, and the
simulator's drafter, which charges the modelled draft time.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from compute.types import SamplingParams
from draft_models.base import DraftModel
from pipeline.cores import own_cores
from pipeline.speculation import DRAFT

log = logging.getLogger(__name__)

GUESS_STEP = 2  # tokens proposed at a time, so that a rollback is noticed soon


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """coordinator -> drafter: the verified text from `start` on is
    `token_ids` (what lies before `start` is as sent before); guess the
    positions up to `upto` (exclusive). A new `epoch` means the coordinator
    dropped every guess it held (one was refuted): start again from the
    verified text."""

    seq_id: int
    epoch: int
    start: int
    token_ids: tuple[int, ...]
    upto: int
    sampling: SamplingParams


@dataclass(frozen=True, slots=True)
class Guesses:
    """drafter -> coordinator: guesses for positions [start, start + n)."""

    seq_id: int
    epoch: int
    start: int
    token_ids: list[int]
    probs: list[torch.Tensor | None]  # q per guess (unseeded sampling), else None
    confidences: list[float]  # the draft's own belief in each guess, for calibration
    is_exhausted: bool = False  # the draft has no more guesses for this line (n-gram without a match)
    seconds: float = 0.0  # the draft's compute for this batch (the simulator's calibration reads it)
    source: str = DRAFT  # the drafter's, or HEAD: the last stage's head (speculation.py judges each apart)


GuessSink = Callable[[Guesses], None]


class Drafter(Protocol):
    """request() and release() return at once; guesses go to the sink given
    to start(), from any thread."""

    def start(self, on_guesses: GuessSink) -> None: ...

    def request(self, request: DraftRequest) -> None: ...

    def release(self, seq_id: int) -> None: ...

    def close(self) -> None: ...

    def where(self) -> dict:
        """Where the draft runs, for /health and logs: {"runs_on": ..., ...}."""
        ...


@dataclass(slots=True)
class _Line:
    seq_id: int
    sampling: SamplingParams
    generator: torch.Generator | None  # unseeded sampling: the drafter's own random stream
    token_ids: list[int] = field(default_factory=list)  # verified text, then guesses
    epoch: int = 0
    upto: int = 0
    is_exhausted: bool = False  # the draft had nothing to add to this very line

    def apply(self, request: DraftRequest) -> None:
        """Take in newly verified tokens: keep the guesses they confirm, drop
        the rest; a new epoch drops every guess (the coordinator forgot them)."""
        end = request.start + len(request.token_ids)
        if request.epoch != self.epoch or self.token_ids[request.start:end] != list(request.token_ids):
            del self.token_ids[request.start:]
            self.token_ids.extend(request.token_ids)
            self.is_exhausted = False  # a new line: the draft may know more
        self.epoch, self.upto = request.epoch, request.upto

    @property
    def wants(self) -> int:
        return 0 if self.is_exhausted else max(0, self.upto - len(self.token_ids))


class DraftLines:
    """The lines of every sequence, and the one step every drafter repeats:
    extend a line by a few guesses."""

    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft
        self.lines: dict[int, _Line] = {}

    def apply(self, request: DraftRequest) -> None:
        line = self.lines.get(request.seq_id)
        if line is None:
            generator = None
            if not (request.sampling.is_greedy or request.sampling.is_coupled):
                generator = torch.Generator()
                generator.seed()
            line = self.lines[request.seq_id] = _Line(request.seq_id, request.sampling, generator)
        line.apply(request)

    def release(self, seq_id: int) -> None:
        if self.lines.pop(seq_id, None) is not None:
            self.draft.release(seq_id)

    def next_wanting(self, after: int | None) -> _Line | None:
        """Round robin over the lines that want guesses."""
        wanting = sorted((s for s, line in self.lines.items() if line.wants),
                         key=lambda s: (after is not None and s <= after, s))
        return self.lines[wanting[0]] if wanting else None

    def extend(self, line: _Line, step: int) -> Guesses:
        start, asked = len(line.token_ids), min(step, line.wants)
        started = time.perf_counter()
        proposal = self.draft.propose(line.seq_id, line.token_ids, asked, line.sampling, line.generator)
        seconds = time.perf_counter() - started
        line.token_ids.extend(proposal.token_ids)
        line.is_exhausted = len(proposal.token_ids) < asked  # it knows no more on this line
        return Guesses(line.seq_id, line.epoch, start, list(proposal.token_ids), list(proposal.probs),
                       list(proposal.confidences), is_exhausted=line.is_exhausted, seconds=seconds)


class InlineDrafter:
    """Guesses at once, on the caller's thread: for drafts that cost nothing."""

    def __init__(self, draft: DraftModel) -> None:
        self._lines = DraftLines(draft)
        self._sink: GuessSink | None = None

    def start(self, on_guesses: GuessSink) -> None:
        self._sink = on_guesses

    def request(self, request: DraftRequest) -> None:
        self._lines.apply(request)
        line = self._lines.lines[request.seq_id]
        if line.wants:
            self._sink(self._lines.extend(line, line.wants))

    def release(self, seq_id: int) -> None:
        self._lines.release(seq_id)

    def close(self) -> None:
        pass

    def where(self) -> dict:
        return {"runs_on": "coordinator"}


_STOP = object()


def local_drafter(draft: DraftModel, cores: list[int] | None = None) -> Drafter:
    """Inline when the draft costs nothing, else on a thread of its own."""
    return InlineDrafter(draft) if draft.is_free else ThreadDrafter(draft, cores)


class ThreadDrafter:
    """The draft on a thread of its own (on `cores`, where given), extending
    lines GUESS_STEP tokens at a time and taking in new requests between
    steps, so a rollback costs at most one step of wasted drafting."""

    def __init__(self, draft: DraftModel, cores: list[int] | None = None) -> None:
        self._lines = DraftLines(draft)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._cores = cores
        self._sink: GuessSink | None = None
        self._thread = threading.Thread(target=self._loop, name="drafter", daemon=True)

    def start(self, on_guesses: GuessSink) -> None:
        self._sink = on_guesses
        self._thread.start()

    def request(self, request: DraftRequest) -> None:
        self._inbox.put(request)

    def release(self, seq_id: int) -> None:
        self._inbox.put(seq_id)

    def close(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout=10)

    def where(self) -> dict:
        return {"runs_on": "thread", "cores": self._cores, "pid": os.getpid(), "thread_id": self._thread.native_id}

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self._cores:
            own_cores(self._cores)
        last = None
        while True:
            line = self._lines.next_wanting(last)
            try:  # take every command that has arrived; wait for one only when idle
                message = self._inbox.get_nowait() if line else self._inbox.get()
            except queue.Empty:
                message = None
            if message is _STOP:
                return
            if message is not None:
                self._handle(message)
                continue
            last = line.seq_id
            try:
                guesses = self._lines.extend(line, GUESS_STEP)
            except Exception:  # a failing draft must not stop drafting for everyone
                log.exception("the draft failed on sequence %d", line.seq_id)
                line.is_exhausted = True
                continue
            self._sink(guesses)

    def _handle(self, message) -> None:
        if isinstance(message, DraftRequest):
            self._lines.apply(message)
        else:
            self._lines.release(message)
