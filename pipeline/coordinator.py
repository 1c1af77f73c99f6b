"""The coordinator: one loop, many requests. launch -> receive -> verify -> commit/cancel.

Each sequence keeps a *chain* of live runs in flight: the first covers the
last verified position, each next one starts where the previous ends. Its
tokens beyond the verified text are the speculation. A result that shows a
guess wrong cancels the rest of the chain on every stage at once.

Modes:
- ar:        a root run of the unverified tip only; wait; repeat.
- sync:      a root run of the tip plus k draft tokens; wait; repeat.
- pipeinfer: a one-token canonical root run, then speculative runs chained
             behind it while the draft is confident and the cap allows, never
             waiting: each result is verified as soon as it arrives.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compute.types import Failure, FailureCode, GenerationRequest, check_context
from draft_models.base import DraftModel
from pipeline.speculation import AdaptiveCutoff, SpeculationConfig
from pipeline.transport import Transport
from pipeline.types import (
    CommitKV,
    Delivery,
    FinishEvent,
    FreeSequence,
    GenerationStats,
    Mode,
    PipelineFailed,
    Run,
    RunResult,
    SequenceFailed,
    TokenEvent,
)
from pipeline.verify import verify

log = logging.getLogger(__name__)

EventSink = Callable[[TokenEvent | FinishEvent], None]
STALL_TIMEOUT_S = 120.0  # no result for a request, and no stage progress, for this long: it is stalled
WATCHDOG_INTERVAL_S = 1.0  # how often the loop checks for dead stages and stalled requests


@dataclass(slots=True)
class SequenceState:
    seq_id: int
    request: GenerationRequest
    sink: EventSink
    cutoff: AdaptiveCutoff
    token_ids: list[int]  # verified: prompt + generated
    committed_len: int = 0  # positions whose KV is committed on every stage
    chain: deque[Run] = field(default_factory=deque)
    results: dict[int, RunResult] = field(default_factory=dict)  # arrived early
    draft_probs: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)  # run_id -> q per token
    generator: torch.Generator | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    started_at: float = 0.0  # on the coordinator's clock
    last_progress_at: float = 0.0  # last result verified

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    def speculated_token_ids(self) -> list[int]:
        """The chain's tokens beyond the verified text."""
        if not self.chain:
            return []
        chain_tokens = [t for run in self.chain for t in run.token_ids]
        return chain_tokens[len(self.token_ids) - self.chain[0].start_pos :]


class Coordinator:
    """Runs its own loop thread, on the transport's clock; a transport that
    drives the coordinator itself (the simulator) steps it in simulated time
    instead."""

    def __init__(self, transport: Transport, draft: DraftModel, config: SpeculationConfig, max_context: int,
                 stall_timeout_s: float = STALL_TIMEOUT_S) -> None:
        self.transport = transport
        self.stall_timeout_s = stall_timeout_s
        self.draft = draft
        self.config = config
        self.max_context = max_context
        self.clock = transport.clock
        self.is_stopped = False  # the close event was handled
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._seqs: dict[int, SequenceState] = {}
        self._seq_ids = itertools.count()
        self._run_ids = itertools.count()
        self._thread = None
        self._closed = False
        transport.start(lambda result: self._events.put(("result", result)))
        if transport.drives_coordinator:
            transport.drive(self)
        else:
            self._thread = threading.Thread(target=self._loop, name="coordinator", daemon=True)
            self._thread.start()

    # ---- public, thread-safe -------------------------------------------

    def submit(self, request: GenerationRequest, sink: EventSink) -> int:
        if self._closed:
            raise RuntimeError("the coordinator is closed")
        check_context(len(request.prompt_token_ids), request.max_tokens, self.max_context)
        seq_id = next(self._seq_ids)
        self._events.put(("new", (seq_id, request, sink)))
        return seq_id

    def abort(self, seq_id: int) -> None:
        self._events.put(("abort", seq_id))

    def fail_all(self, failure: Failure) -> None:
        """End every running request with this failure (a server shutting down)."""
        self._events.put(("fail_all", failure))

    def set_speculation(self, config: SpeculationConfig) -> None:
        """Switch mode or speculation settings; sequences already running
        follow the new settings from their next launch (every mode is lossless)."""
        self._events.put(("speculation", config))

    def is_alive(self) -> bool:
        loop_alive = self._thread is None or self._thread.is_alive()
        return loop_alive and self.transport.is_alive()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._events.put(("close", None))
            if self._thread is not None:
                self._thread.join(timeout=10)
            self.transport.close()

    # ---- the loop --------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        checked_at = self.clock()
        while not self.is_stopped:
            self.step(WATCHDOG_INTERVAL_S if self._seqs else None)
            if self._seqs and self.clock() - checked_at >= WATCHDOG_INTERVAL_S:  # however busy the loop is
                checked_at = self.clock()
                self.fail_stalled_sequences()

    def step(self, timeout: float | None) -> bool:
        """One turn of the loop: wait up to `timeout` (0: not at all) for an
        event, handle everything that has arrived, then launch. False when
        nothing arrived."""
        try:
            events = [self._events.get(timeout=timeout) if timeout != 0 else self._events.get_nowait()]
        except queue.Empty:
            return False
        while True:  # handle everything that arrived before launching more work
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        for kind, payload in events:
            if kind == "close":
                for seq in list(self._seqs.values()):
                    self._finish(seq, "error", Failure(FailureCode.SHUTTING_DOWN, "the server is shutting down"))
                self.is_stopped = True
                return True
            try:
                self._handle(kind, payload)
            except Exception as exc:  # never let one request kill the loop
                log.exception("coordinator failed on %s", kind)
                self._fail_sequence_of(kind, payload, exc)
        for seq in list(self._seqs.values()):
            try:
                self._launch(seq)
            except Exception as exc:
                log.exception("launch failed for sequence %d", seq.seq_id)
                self._finish(seq, "error", Failure.of(exc, FailureCode.INTERNAL))
        return True

    def fail_stalled_sequences(self) -> None:
        """Never let a request hang on a dead stage or a lost result. A
        request is stalled when it has had no result for stall_timeout_s and
        no stage has made progress for as long: waiting behind other work
        (a long prefill) is not stalling."""
        if not self.transport.is_alive():
            for seq in list(self._seqs.values()):
                self._finish(seq, "error", Failure(FailureCode.STAGE_DOWN, "a pipeline stage stopped"))
            return
        now = self.clock()
        waiting = [seq for seq in self._seqs.values() if seq.chain and now - seq.last_progress_at > self.stall_timeout_s]
        if not waiting or self.transport.idle_s() <= self.stall_timeout_s:
            return
        for seq in waiting:
            self._finish(seq, "error", Failure(
                FailureCode.STALLED, f"no stage made progress for {self.stall_timeout_s:.0f} s"))

    def _handle(self, kind: str, payload) -> None:
        if kind == "new":
            seq_id, request, sink = payload
            self._seqs[seq_id] = self._new_sequence(seq_id, request, sink)
        elif kind == "abort":
            seq = self._seqs.get(payload)
            if seq is not None:
                self._finish(seq, "abort")
        elif kind == "speculation":
            self.config = payload
        elif kind == "fail_all":
            for seq in list(self._seqs.values()):
                self._finish(seq, "error", payload)
        elif kind == "result":
            self._receive(payload)

    def _fail_sequence_of(self, kind: str, payload, exc: Exception) -> None:
        if kind in ("speculation", "fail_all"):
            return
        failure = Failure.of(exc, FailureCode.INTERNAL)
        seq_id = payload.seq_id if kind == "result" else payload[0] if kind == "new" else payload
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self._finish(seq, "error", failure)
        elif kind == "new":
            payload[2](FinishEvent("error", GenerationStats(), failure))

    def _new_sequence(self, seq_id: int, request: GenerationRequest, sink: EventSink) -> SequenceState:
        generator = None
        if not request.sampling.is_greedy and not request.sampling.is_coupled:
            generator = torch.Generator()
            generator.seed()
        now = self.clock()
        seq = SequenceState(seq_id, request, sink, AdaptiveCutoff(self.config), list(request.prompt_token_ids),
                            generator=generator, started_at=now, last_progress_at=now)
        seq.stats.num_prompt_tokens = len(request.prompt_token_ids)
        return seq

    # ---- launch ----------------------------------------------------------

    def _launch(self, seq: SequenceState) -> None:
        mode = self.config.mode
        if not seq.chain:
            drafts = self._propose(seq, seq.token_ids, cutoff=0.0) if mode is Mode.SYNC else None
            self._submit(seq, parent=None, start_pos=seq.committed_len,
                         token_ids=seq.token_ids[seq.committed_len :], drafts=drafts)
        if mode is not Mode.PIPEINFER:
            return
        while len(seq.chain) < self.config.max_runs_in_flight:
            # The emptier the pipeline, the cheaper a guess (its stages would
            # idle otherwise): the cutoff scales with how full the chain is.
            cutoff = seq.cutoff.value * len(seq.chain) / self.config.max_runs_in_flight
            drafts = self._propose(seq, seq.token_ids + seq.speculated_token_ids(), cutoff)
            if drafts is None:
                seq.cutoff.on_idle()
                return
            tip = seq.chain[-1]
            self._submit(seq, parent=tip, start_pos=tip.end_pos, token_ids=[], drafts=drafts)

    def _propose(self, seq: SequenceState, context: list[int], cutoff: float):
        """Draft guesses for the positions after `context`, bounded so that no
        run computes a position whose prediction lies past max_tokens."""
        last_needed = len(seq.request.prompt_token_ids) + seq.request.max_tokens - 1
        budget = min(self.config.draft_len, last_needed - len(context))
        if budget <= 0:
            return None
        proposal = self.draft.propose(seq.seq_id, context, budget, seq.request.sampling, cutoff, seq.generator)
        self.transport.charge_draft(self.draft, len(proposal.token_ids))
        return proposal if proposal.token_ids else None

    def _submit(self, seq: SequenceState, parent: Run | None, start_pos: int, token_ids: list[int], drafts) -> None:
        draft_ids = drafts.token_ids if drafts is not None else []
        run = Run(
            run_id=next(self._run_ids),
            seq_id=seq.seq_id,
            parent_run_id=None if parent is None else parent.run_id,
            start_pos=start_pos,
            token_ids=tuple(token_ids) + tuple(draft_ids),
            is_speculative=bool(draft_ids),
            sampling=seq.request.sampling,
        )
        if draft_ids:
            seq.draft_probs[run.run_id] = [None] * len(token_ids) + list(drafts.probs)
            seq.stats.num_draft_tokens += len(draft_ids)
        seq.chain.append(run)
        seq.stats.num_runs += 1
        self.transport.submit(run)

    # ---- receive, verify, commit/cancel ---------------------------------

    def _receive(self, delivery: Delivery) -> None:
        if isinstance(delivery, PipelineFailed):
            for seq in list(self._seqs.values()):
                self._finish(seq, "error", delivery.failure)
            return
        seq = self._seqs.get(delivery.seq_id)
        if seq is None:
            return  # the sequence already finished
        if isinstance(delivery, SequenceFailed):
            self._finish(seq, "error", delivery.failure)
            return
        result = delivery
        if not any(run.run_id == result.run_id for run in seq.chain):
            return  # cancelled: its result is stale
        if result.failure is not None:
            self._finish(seq, "error", result.failure)
            return
        seq.results[result.run_id] = result
        seq.last_progress_at = self.clock()
        while seq.chain and seq.chain[0].run_id in seq.results and seq.seq_id in self._seqs:
            run = seq.chain.popleft()
            self._verify(seq, run, seq.results.pop(run.run_id))

    def _verify(self, seq: SequenceState, run: Run, result: RunResult) -> None:
        """Accept the longest agreeing prefix plus one target token."""
        first = len(seq.token_ids) - 1 - run.start_pos  # the output predicting the next position
        assert 0 <= first < len(run.token_ids), (run, len(seq.token_ids))
        # The guess for each output's position: the run's next input, and
        # after its last, the next run's first token (if one is in flight).
        after = seq.chain[0] if seq.chain else None
        probs = seq.draft_probs.pop(run.run_id, None) or [None] * len(run.token_ids)
        verdict = verify(
            [*run.token_ids[first + 1:], after.token_ids[0] if after else None],
            [*probs[first + 1:], (seq.draft_probs.get(after.run_id) or [None])[0] if after else None],
            None if result.target_token_ids is None else result.target_token_ids[first:],
            None if result.target_probs is None else result.target_probs[first:],
            seq.generator,
        )
        new_token_ids, finish_reason = [], None
        for token in verdict.token_ids:
            seq.token_ids.append(token)
            new_token_ids.append(token)
            if (finish_reason := self._finish_reason(seq, token)) is not None:
                break
        seq.stats.num_accepted_tokens += min(verdict.num_accepted, len(new_token_ids))
        seq.stats.num_verify_steps += 1
        self._emit(seq, new_token_ids)
        if finish_reason is not None:
            self._finish(seq, finish_reason)
            return
        num_valid_kv = first + len(verdict.token_ids) if verdict.is_rejected else len(run.token_ids)
        self.transport.send_kv_op(CommitKV(seq.seq_id, run.run_id, num_valid_kv))
        seq.committed_len = run.start_pos + num_valid_kv
        if verdict.is_rejected:
            self._cancel_chain(seq)
            seq.cutoff.on_rejection()
        elif run.is_speculative:
            seq.cutoff.on_acceptance()

    def _finish_reason(self, seq: SequenceState, token: int) -> str | None:
        if token in seq.request.stop_token_ids:
            return "stop"
        if seq.num_generated >= seq.request.max_tokens or len(seq.token_ids) >= self.max_context:
            return "length"
        return None

    def _cancel_chain(self, seq: SequenceState) -> None:
        if not seq.chain:
            return
        run_ids = [run.run_id for run in seq.chain]
        self.transport.cancel(seq.seq_id, run_ids)
        for run_id in run_ids:
            seq.results.pop(run_id, None)
            seq.draft_probs.pop(run_id, None)
        seq.stats.num_runs_cancelled += len(run_ids)
        seq.stats.cancelled_run_ids.extend(run_ids)
        seq.chain.clear()

    def _emit(self, seq: SequenceState, token_ids: list[int]) -> None:
        if not token_ids:
            return
        now = self.clock() - seq.started_at
        if seq.stats.first_token_s is None:
            seq.stats.first_token_s = now
        seq.stats.num_generated_tokens = seq.num_generated
        seq.sink(TokenEvent(tuple(token_ids), at_s=now))

    def _finish(self, seq: SequenceState, reason: str, failure: Failure | None = None) -> None:
        self._cancel_chain(seq)
        self.transport.send_kv_op(FreeSequence(seq.seq_id))
        self.draft.release(seq.seq_id)
        self._seqs.pop(seq.seq_id, None)
        seq.stats.num_generated_tokens = seq.num_generated
        seq.stats.elapsed_s = self.clock() - seq.started_at
        seq.sink(FinishEvent(reason, seq.stats, failure))
