"""One request's state in the coordinator: its verified text, the chain of
runs in flight, and the guesses it holds but has not launched."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from compute.types import GenerationRequest
from pipeline.drafter import Guesses
from pipeline.speculation import DRAFT, AcceptanceModel
from pipeline.types import FinishEvent, GenerationStats, Run, RunResult, TokenEvent

EventSink = Callable[[TokenEvent | FinishEvent], None]


@dataclass(frozen=True, slots=True)
class Guess:
    token_id: int
    q: torch.Tensor | None  # [vocab]: the distribution it was drawn from (unseeded sampling); None: deterministic
    confidence: float  # the draft's own, calibrated by AcceptanceModel
    source: str = DRAFT  # who guessed it (speculation.py: DRAFT or HEAD)


@dataclass(slots=True)
class Launched:
    """What the coordinator remembers of a run in flight."""

    guesses: list[Guess | None]  # per input token; None where it is verified text
    value: float  # the estimated chance that every guess in it is accepted
    submitted_at: float | None = None  # root runs: when (for measuring a pass)


@dataclass(slots=True)
class SequenceState:
    seq_id: int
    request: GenerationRequest
    sink: EventSink
    token_ids: list[int]  # verified: prompt + generated
    committed_len: int = 0  # positions whose KV is committed on every stage
    chain: deque[Run] = field(default_factory=deque)
    launched: dict[int, Launched] = field(default_factory=dict)  # run_id -> its guesses
    results: dict[int, RunResult] = field(default_factory=dict)  # arrived before the runs ahead of them
    pending: deque[Guess] = field(default_factory=deque)  # guesses for the positions after the chain
    tail_offer: Guesses | None = None  # the head's, with the last result: taken where the drafter's are worse
    head_passed: int = 0  # launches since the head's guesses were last taken, while the drafter's won
    epoch: int = 0  # bumped when a guess is refuted: later guesses of the old line cannot be checked
    is_draft_exhausted: bool = False  # the drafter has no more guesses for this line
    told_len: int = 0  # how much of the verified text the drafter has been told
    asked_upto: int = 0  # the last position the drafter was asked to guess up to
    since_judged: int = 0  # verifications since a guess was last judged (for exploring)
    streak: int = 0  # accepted guesses since the last token the target chose itself
    acceptance: AcceptanceModel = field(default_factory=AcceptanceModel)
    generator: torch.Generator | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    started_at: float = 0.0  # on the coordinator's clock
    last_progress_at: float = 0.0  # last result verified

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    @property
    def chain_end(self) -> int:
        """The position after the last token in flight (the verified length when idle)."""
        return self.chain[-1].end_pos if self.chain else len(self.token_ids)

    @property
    def num_guesses_in_flight(self) -> int:
        return sum(g is not None for run in self.chain for g in self.launched[run.run_id].guesses)

    @property
    def chain_value(self) -> float:
        value = 1.0
        for run in self.chain:
            value *= self.launched[run.run_id].value
        return value

    @property
    def max_useful_position(self) -> int:
        """No run needs a position whose prediction lies past max_tokens."""
        return len(self.request.prompt_token_ids) + self.request.max_tokens - 1

    def known_token_ids(self, start: int, end: int) -> list[int]:
        """Positions [start, end) as far as they are known: verified, in flight, pending."""
        verified = self.token_ids[start:end]
        beyond = [t for run in self.chain for t in run.token_ids][max(0, len(self.token_ids) - self.chain[0].start_pos)
                                                                   :] if self.chain else []
        beyond += [g.token_id for g in self.pending]
        return verified + beyond[max(0, start - len(self.token_ids)) : max(0, end - len(self.token_ids))]

    def add_guesses(self, guesses: Guesses) -> None:
        """Keep the guesses beyond what is known, if the drafter's line agrees
        with what is known (a line the verified text has left is dropped; the
        drafter rolls back when it hears of the new tokens)."""
        if guesses.epoch != self.epoch:
            return  # made before a refuted guess: positions past it cannot be checked
        known = self.known_token_ids(guesses.start, guesses.start + len(guesses.token_ids))
        if not self._judge_late(guesses):
            return  # the verified text refutes the line: the drafter rolls back when it hears of it
        is_gap = guesses.start > len(self.token_ids) + len(self.known_token_ids(len(self.token_ids), guesses.start))
        if is_gap or guesses.token_ids[: len(known)] != known:
            self.new_line()  # out of step with the drafter: start both afresh from the verified text
            return
        self.pending.extend(Guess(t, q, c, guesses.source) for t, q, c in list(zip(
            guesses.token_ids, guesses.probs, guesses.confidences))[len(known):])
        self.is_draft_exhausted = guesses.is_exhausted

    def _judge_late(self, guesses: Guesses) -> bool:
        """Guesses for positions already verified are judged at no cost: up
        to and including the first that the verified text refutes.
        -> False if one is refuted."""
        late = self.token_ids[guesses.start : guesses.start + len(guesses.token_ids)]
        for depth, (guess, truth, confidence) in enumerate(zip(guesses.token_ids, late, guesses.confidences), 1):
            self.acceptance.observe(confidence, guess == truth, depth, guesses.source)
            self.since_judged = 0
            if guess != truth:
                return False
        return True

    def new_line(self) -> None:
        """A guess was refuted: forget the drafter's line."""
        self.epoch += 1
        self.pending.clear()
        self.is_draft_exhausted = False
