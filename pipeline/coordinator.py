"""The coordinator: one loop, many requests. launch -> receive -> verify -> commit/cancel.

Each sequence keeps a *chain* of live runs in flight: the first covers the
last verified position, each next one starts where the previous ends. Its
tokens beyond the verified text are the speculation. A result that shows a
guess wrong cancels the rest of the chain on every stage at once. Guesses
come from a Drafter (pipeline/drafter.py) that works off this thread: the
coordinator keeps those it has not launched yet (`pending`) and never waits
for more, except in sync mode.

Modes:
- ar:        a root run of the unverified tip only; wait; repeat.
- sync:      a root run of the tip plus k guesses; wait; repeat.
- pipeinfer: a root run of the tip, then runs chained behind it, one per
             stage (plus one waiting), each with the guesses worth launching
             (pipeline/speculation.py); every result is verified on arrival.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading

import torch

from compute.types import Failure, FailureCode, GenerationRequest, check_context
from pipeline.drafter import Drafter, DraftRequest, Guesses
from pipeline.sequence import EventSink, Guess, Launched, SequenceState
from pipeline.speculation import (
    DRAFT,
    EXPLORE_EVERY,
    HEAD,
    AcceptanceModel,
    DraftHistory,
    RunCost,
    SpeculationConfig,
    run_threshold,
)
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

STALL_TIMEOUT_S = 120.0  # no result for a request, and no stage progress, for this long: it is stalled
WATCHDOG_INTERVAL_S = 1.0  # how often the loop checks for dead stages and stalled requests
# A request running alone sends its prompt in chunks this many times larger:
# nobody waits behind them but a newcomer, for one chunk at most.
ALONE_CHUNKS = 8


class Coordinator:
    """Runs its own loop thread, on the transport's clock; a transport that
    drives the coordinator itself (the simulator) steps it in simulated time
    instead."""

    def __init__(self, transport: Transport, drafter: Drafter, config: SpeculationConfig, max_context: int,
                 stall_timeout_s: float = STALL_TIMEOUT_S, tail_drafting: bool = False) -> None:
        """tail_drafting: the last stage drafts (a head) and its guesses come with the results."""
        self.transport = transport
        self.tail_drafting = tail_drafting
        self.stall_timeout_s = stall_timeout_s
        self.drafter = drafter
        self.config = config
        self.max_context = max_context
        self.clock = transport.clock
        self.is_stopped = False  # the close event was handled
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._seqs: dict[int, SequenceState] = {}
        self.run_cost = RunCost()  # a pipeline pass by run size, as measured
        self.draft_history = DraftHistory()  # the draft's acceptance and compute, over the requests so far
        self._seq_ids = itertools.count()
        self._run_ids = itertools.count()
        self._thread = None
        self._closed = False
        self._launching_on: int | None = None  # the thread in the launch phase of step(), if any
        self._outbox: list[Run] = []  # the runs of the sequence being launched, submitted together
        transport.start(lambda result: self._events.put(("result", result)))
        drafter.start(self._guesses_arrived)
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
            self.drafter.close()
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

    def _guesses_arrived(self, guesses: Guesses) -> None:
        """An event; but from an inline drafter answering while we launch,
        taken at once, so that the run about to be launched carries them."""
        if self._launching_on == threading.get_ident():
            self._handle("guesses", guesses)
        else:
            self._events.put(("guesses", guesses))

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
        self._launching_on = threading.get_ident()
        try:
            for seq in list(self._seqs.values()):
                try:
                    self._launch(seq)
                except Exception as exc:
                    log.exception("launch failed for sequence %d", seq.seq_id)
                    self._finish(seq, "error", Failure.of(exc, FailureCode.INTERNAL))
        finally:
            self._launching_on = None
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
        elif kind == "guesses":
            seq = self._seqs.get(payload.seq_id)
            if seq is not None:
                self._take_guesses(seq, payload)

    def _take_guesses(self, seq: SequenceState, guesses: Guesses) -> None:
        seq.stats.draft_calls += 1
        seq.stats.draft_guesses += len(guesses.token_ids)
        seq.stats.draft_s += guesses.seconds
        self.draft_history.observe_compute(len(guesses.token_ids), guesses.seconds, guesses.source)
        seq.add_guesses(guesses)

    def _take_tail_offer(self, seq: SequenceState) -> None:
        """The head's guesses from the last result, where the drafter has
        none (a head alone: its drafter never has any) or where the request's
        record says the head's first guess is likelier to be accepted than
        the drafter's (ngram+head: each source judged by its own record, by
        its confidence: the lookup's long matches on copied text, the head's
        guesses where the lookup has only a short match)."""
        offer, seq.tail_offer = seq.tail_offer, None
        if offer is None or not offer.token_ids:
            # Unasked while the drafter won (below), or with nothing: ask the head again once the drafter has none.
            seq.head_passed = seq.head_passed + 1 if seq.pending else 0
            return
        if seq.pending:
            depth = seq.streak + seq.num_guesses_in_flight + 1
            mine, theirs = seq.pending[0], offer.confidences[0]
            if seq.acceptance.probability(theirs, depth, HEAD) < seq.acceptance.probability(
                    mine.confidence, depth, mine.source):
                seq.head_passed += 1
                return
            seq.new_line()  # the drafter's guesses give way (it rolls back when next asked)
            offer = dataclasses.replace(offer, epoch=seq.epoch)
        seq.head_passed = 0
        self._take_guesses(seq, offer)

    def _fail_sequence_of(self, kind: str, payload, exc: Exception) -> None:
        if kind in ("speculation", "fail_all"):
            return
        failure = Failure.of(exc, FailureCode.INTERNAL)
        seq_id = payload.seq_id if kind in ("result", "guesses") else payload[0] if kind == "new" else payload
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
        seq = SequenceState(seq_id, request, sink, list(request.prompt_token_ids), generator=generator,
                            acceptance=AcceptanceModel(self.draft_history), started_at=now, last_progress_at=now)
        seq.stats.num_prompt_tokens = len(request.prompt_token_ids)
        return seq

    # ---- launch ----------------------------------------------------------

    def _launch(self, seq: SequenceState) -> None:
        """The sequence's new runs, entered into the pipeline together at the end."""
        self._outbox = []
        try:
            self._launch_runs(seq)
        finally:
            if self._outbox:
                self.transport.submit_together(self._outbox)

    def _launch_runs(self, seq: SequenceState) -> None:
        if self._prefill(seq):
            return
        mode = self.config.mode
        if mode is Mode.AR:
            if not seq.chain:
                self._submit(seq, [])
        elif mode is Mode.SYNC:
            if not seq.chain:
                k = self._budget(seq, self.config.draft_len)
                self._ask_draft(seq, seq.chain_end + k)  # (an inline drafter answers at once)
                self._take_tail_offer(seq)
                if len(seq.pending) >= k or seq.is_draft_exhausted:
                    self._submit(seq, [seq.pending.popleft() for _ in range(min(k, len(seq.pending)))], value=0.0)
                # else: the one mode that waits for its guesses
        else:
            cap = self.config.runs_in_flight(self.transport.num_stages)
            self._ask_draft(seq, self._wanted_upto(seq, cap))  # an inline drafter answers at once
            self._take_tail_offer(seq)
            in_pipeline = len(seq.chain)  # runs submitted before this launch
            while len(seq.chain) < cap:
                # A run chained behind one launched now rides in its forward where the transport
                # shares forwards and there is one stage: its guesses cost tokens of that run, not a
                # run. With several, the first stage computes it next, overlapping its parent (stage_loop.py).
                rides = (self.transport.shares_forwards and self.transport.num_stages == 1
                         and len(seq.chain) > in_pipeline)
                guesses, value = self._worth_launching(seq, rides)
                if seq.chain and not guesses:
                    break
                self._submit(seq, guesses, value)
            self._ask_draft(seq, self._wanted_upto(seq, cap))

    def _prefill(self, seq: SequenceState) -> bool:
        """Send a long prompt a chunk at a time (SpeculationConfig.prefill_chunk;
        ALONE_CHUNKS times that while no other request runs), until what is
        left fits in the root run. A prompt no longer than an alone-chunk goes
        whole: chunking it would hold up its own first token, for a wait of
        others no longer than one long prompt's alone-chunk.
        -> whether the sequence is prefilling."""
        if seq.chain:
            return seq.chain[-1].end_pos < len(seq.token_ids)  # a chunk is in flight
        if len(seq.request.prompt_token_ids) <= self.config.prefill_chunk * ALONE_CHUNKS:
            return False
        chunk = self.config.prefill_chunk * (1 if len(self._seqs) > 1 else ALONE_CHUNKS)
        if len(seq.token_ids) - seq.committed_len <= chunk:
            return False
        self._submit(seq, [], chunk=chunk)
        return True

    def _budget(self, seq: SequenceState, most: int) -> int:
        """Guesses that fit after the chain: no run computes a position whose
        prediction lies past max_tokens."""
        return max(0, min(most, seq.max_useful_position - seq.chain_end))

    def _worth_launching(self, seq: SequenceState, rides: bool = False) -> tuple[list[Guess], float]:
        """The leading pending guesses for a run, each while its chance of
        being accepted, with every guess before it, pays for it: a new run's
        first guess pays for a run (the run threshold), any other for a token
        more in its run (the token threshold; a root run goes anyway). A run
        that rides in the forward of the run before it (`rides`) costs
        tokens only: its first guess too is judged by the token threshold.
        -> the guesses and the run's own chance. (While none is worth it,
        the drafter's probing guesses are judged without a run: _wanted_upto.)"""
        chain_value = seq.chain_value
        value, taken = 1.0, []
        depth = seq.streak + seq.num_guesses_in_flight
        bars: dict[str, tuple[float, float]] = {}  # per source, once a launch (not once a guess)
        for guess in list(seq.pending)[: self._budget(seq, self.config.draft_len)]:
            depth += 1
            if guess.source not in bars:
                bars[guess.source] = self._bars(guess.source)
            run_bar, token_bar = bars[guess.source]
            p = seq.acceptance.probability(guess.confidence, depth, guess.source)
            if chain_value * value * p < (run_bar if seq.chain and not taken and not rides else token_bar):
                break
            value *= p
            taken.append(guess)
        for _ in taken:
            seq.pending.popleft()
        return taken, value

    def _bars(self, source: str = DRAFT) -> tuple[float, float]:
        """What a new run's first guess, and a guess more in a run, must be
        worth (speculation.py): both set by hand, or measured and raised by
        the source's share of the stages' cores."""
        if self.config.min_accept_prob is not None:
            return self.config.min_accept_prob, self.config.min_accept_prob
        draft = self._draft_share(source)
        run_bar = run_threshold(self.transport.num_layers, len(self._seqs))
        return min(1.0, run_bar + draft), self.run_cost.token_share() * len(self._seqs) + draft

    def _draft_share(self, source: str = DRAFT) -> float:
        """A guess's compute as a share of the pass it can save, where it is
        computed on a stage's cores (a head's, on the last stage, always is;
        the drafter's where it has no cores of its own; else it is free)."""
        pass_s = self.run_cost.pass_seconds(1)
        on_stage = self.tail_drafting if source == HEAD else self.transport.draft_shares_cores
        if not on_stage or not pass_s:
            return 0.0
        return min(1.0, self.draft_history.seconds_per_guess(source) / pass_s)

    def _wanted_upto(self, seq: SequenceState, cap: int) -> int:
        """How far to ask the drafter to guess: enough to fill the room in the
        chain, and one run more for when a result frees a place, while
        guesses are worth it; one probing guess when they are not."""
        if seq.chain_value * seq.acceptance.overall(DRAFT) >= self._bars(DRAFT)[0]:
            want = (cap - len(seq.chain) + 1) * self.config.draft_len
        else:
            # A probe is free where the draft has cores of its own: one per verification.
            want = 1 if seq.since_judged >= (EXPLORE_EVERY if self._draft_share() else 1) else 0
        return seq.chain_end + max(len(seq.pending), self._budget(seq, want))

    def _ask_draft(self, seq: SequenceState, upto: int) -> None:
        """Tell the drafter what is newly verified and how far to guess (when either changed)."""
        if seq.told_len == len(seq.token_ids) and seq.asked_upto == upto:
            return
        self.drafter.request(DraftRequest(seq.seq_id, seq.epoch, seq.told_len, tuple(seq.token_ids[seq.told_len:]),
                                          upto, seq.request.sampling))
        seq.told_len, seq.asked_upto = len(seq.token_ids), upto

    def _submit(self, seq: SequenceState, guesses: list[Guess], value: float = 1.0, chunk: int | None = None) -> None:
        """A run of the unverified tip (a root run, when the chain is empty)
        or of the positions after the chain, then the guesses. chunk: a root
        run of only the tip's first `chunk` tokens, a piece of a long prompt
        whose outputs nobody needs (_prefill)."""
        parent = seq.chain[-1] if seq.chain else None
        start_pos = parent.end_pos if parent else seq.committed_len
        tip = [] if parent else seq.token_ids[seq.committed_len:][:chunk]
        tail = 0 if chunk is not None else self._tail_guesses(seq, start_pos + len(tip) + len(guesses))
        run = Run(
            run_id=next(self._run_ids),
            seq_id=seq.seq_id,
            parent_run_id=None if parent is None else parent.run_id,
            start_pos=start_pos,
            token_ids=(*tip, *(g.token_id for g in guesses)),
            is_speculative=bool(guesses),
            sampling=seq.request.sampling,
            # A root run's outputs before its last verified token are known (a chunk's, all of them).
            logits_from=len(tip) if chunk is not None else max(0, len(tip) - 1),
            tail_guesses=tail,
            tail_floor=self._bars(HEAD)[1] if tail else 0.0,
        )
        seq.launched[run.run_id] = Launched([None] * len(tip) + list(guesses), value,
                                            submitted_at=None if parent else self.clock())
        seq.stats.num_draft_tokens += len(guesses)
        for guess in guesses:
            seq.stats.guesses_by_source.setdefault(guess.source, [0, 0])[0] += 1
        seq.chain.append(run)
        seq.stats.num_runs += 1
        self._outbox.append(run)

    def _tail_guesses(self, seq: SequenceState, end_pos: int) -> int:
        """How many guesses the last stage's head adds to a run's result: a
        run's worth (sync), two (pipeinfer: one for a run chained behind the
        next); none in ar mode, for unseeded sampling (where verification
        ends is drawn at the coordinator), past max_tokens, or while the
        drafter's guesses keep winning over the head's (ngram+head: one
        verification in EXPLORE_EVERY still asks the head, to notice it
        doing better)."""
        sampling = seq.request.sampling
        if not self.tail_drafting or self.config.mode is Mode.AR or not (sampling.is_greedy or sampling.is_coupled):
            return 0
        if seq.head_passed % EXPLORE_EVERY:  # the drafter's guesses won of late: the head's compute would be lost
            return 0
        runs = 2 if self.config.mode is Mode.PIPEINFER else 1
        return max(0, min(runs * self.config.draft_len, seq.max_useful_position - end_pos))

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
        if run.end_pos < len(seq.token_ids):  # a chunk of the prompt: nothing to verify
            seq.launched.pop(run.run_id)
            self.transport.send_kv_op(CommitKV(seq.seq_id, run.run_id, len(run.token_ids)))
            seq.committed_len = run.end_pos
            return
        first = len(seq.token_ids) - 1 - run.start_pos  # the output predicting the next position
        assert 0 <= first < len(run.token_ids), (run, len(seq.token_ids))
        # The guess for each output's position: the run's next input, and
        # after its last, the next run's first token, or else the first
        # guess not launched yet (judged here for free).
        after = seq.launched[seq.chain[0].run_id].guesses[0] if seq.chain else (
            seq.pending[0] if seq.pending else None)
        is_after_pending = not seq.chain and after is not None
        launched = seq.launched.pop(run.run_id)
        if launched.submitted_at is not None and len(run.token_ids) <= self.config.draft_len + 2:
            self.run_cost.observe(len(run.token_ids), self.clock() - launched.submitted_at)  # a root run of decode size
        guesses = [*launched.guesses[first + 1:], after]
        verdict = verify(
            [None if g is None else g.token_id for g in guesses],
            [None if g is None else g.q for g in guesses],
            None if result.target_token_ids is None else result.target_token_ids[first - run.logits_from:],
            None if result.target_probs is None else result.target_probs[first - run.logits_from:],
            seq.generator,
        )
        self._learn(seq, guesses, verdict)
        # A pending guess judged by the last output taught us something but
        # was never launched: it counts in no speculation figure.
        is_pending_accepted = is_after_pending and not verdict.is_rejected and verdict.num_accepted == len(guesses)
        new_token_ids, finish_reason = [], None
        for token in verdict.token_ids:
            seq.token_ids.append(token)
            new_token_ids.append(token)
            if (finish_reason := self._finish_reason(seq, token)) is not None:
                break
        accepted = min(verdict.num_accepted - is_pending_accepted, len(new_token_ids))
        seq.stats.num_accepted_tokens += accepted
        for guess in guesses[:accepted]:  # (launched guesses: a pending one, judged here, was last)
            seq.stats.guesses_by_source[guess.source][1] += 1
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
            seq.new_line()
        elif is_after_pending:
            seq.pending.popleft()  # the pending guess just accepted is verified text now
        if result.guesses:  # tail drafting: the head drafted from where this verification ended
            seq.tail_offer = Guesses(seq.seq_id, seq.epoch, result.guesses_start, list(result.guesses),
                                     [None] * len(result.guesses), list(result.guess_confidences),
                                     is_exhausted=True, seconds=result.guesses_s, source=HEAD)

    @staticmethod
    def _learn(seq: SequenceState, guesses: list[Guess | None], verdict) -> None:
        """Feed the acceptance model the guesses this verdict judged, each at
        its depth (the accepted guesses before it since a token the target
        chose itself)."""
        judged = guesses[: verdict.num_accepted + verdict.is_rejected]
        for i, guess in enumerate(judged):
            if guess is not None:
                seq.acceptance.observe(guess.confidence, i < verdict.num_accepted, seq.streak + i + 1, guess.source)
        all_accepted = verdict.num_accepted == len(verdict.token_ids)
        seq.streak = seq.streak + verdict.num_accepted if all_accepted else 0
        seq.since_judged = 0 if any(g is not None for g in judged) else seq.since_judged + 1

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
            seq.launched.pop(run_id, None)
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
        self.drafter.release(seq.seq_id)
        self._seqs.pop(seq.seq_id, None)
        seq.stats.num_generated_tokens = seq.num_generated
        seq.stats.elapsed_s = self.clock() - seq.started_at
        seq.sink(FinishEvent(reason, seq.stats, failure))
