"""Messages that travel through the pipeline, and what a request reports back.

Internal messages are small slotted dataclasses; pydantic lives only at the
edges (HTTP, YAML).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from compute.types import Failure, SamplingParams

if TYPE_CHECKING:  # (annotations only: the CLI reads Mode before torch is imported)
    import torch


class Mode(str, Enum):
    AR = "ar"  # one token per run: the autoregressive pipeline baseline
    SYNC = "sync"  # standard speculative decoding: draft k, verify, repeat
    PIPEINFER = "pipeinfer"  # continuous asynchronous speculation


@dataclass(frozen=True, slots=True)
class Run:
    """One micro-batch entering the pipeline. Immutable once submitted.

    The run computes the KV of positions [start_pos, start_pos + len(token_ids))
    and the target's prediction for the position after each of them. Its
    context is the committed prefix plus the chain of its ancestors.
    """

    run_id: int
    seq_id: int
    parent_run_id: int | None  # None: extends the committed prefix directly
    start_pos: int
    token_ids: tuple[int, ...]
    is_speculative: bool
    sampling: SamplingParams
    # The outputs verification needs start at this index: the last stage runs
    # the head (21% of a small model's weights, per position) only from there.
    logits_from: int = 0
    # Guesses a draft head on the last stage adds to the result (tail drafting;
    # greedy and seeded requests), drafted from where verification will stop.
    tail_guesses: int = 0
    # The head stops guessing once its own chance that all its guesses so far
    # hold falls below this (a chain worth less is not launched anyway).
    tail_floor: float = 0.0

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(slots=True)
class RunResult:
    """What the last stage sends back: only what verification needs.

    Greedy and seeded (coupled) requests get one target token per position;
    unseeded sampling gets the target's probabilities (for the min(1, p/q) rule).
    """

    run_id: int
    seq_id: int
    target_token_ids: list[int] | None = None  # [num_tokens - logits_from]
    target_probs: torch.Tensor | None = None  # [num_tokens - logits_from, vocab]
    failure: Failure | None = None  # set when a stage failed on this run
    # Tail drafting: the head's guesses for the positions from guesses_start
    # on (right after the target token verification ends with), and its
    # probability of each.
    guesses: list[int] = field(default_factory=list)
    guess_confidences: list[float] = field(default_factory=list)
    guesses_start: int = 0
    guesses_s: float = 0.0  # the head's compute for them, on the last stage


@dataclass(frozen=True, slots=True)
class SequenceFailed:
    """A stage could not apply a KV op of this sequence: it cannot go on."""

    seq_id: int
    failure: Failure


@dataclass(frozen=True, slots=True)
class PipelineFailed:
    """Every sequence's state is lost (a stage process died)."""

    failure: Failure


Delivery = RunResult | SequenceFailed | PipelineFailed  # what comes back to the coordinator


@dataclass(frozen=True, slots=True)
class CommitKV:
    """Fold the first num_tokens positions of run_id's chunk into the committed KV."""

    seq_id: int
    run_id: int
    num_tokens: int


@dataclass(frozen=True, slots=True)
class FreeSequence:
    """Drop every KV entry of a finished or aborted sequence."""

    seq_id: int


KVOp = CommitKV | FreeSequence


class GenerationError(RuntimeError):
    """A request that failed, as the engine's blocking calls raise it."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class Ping:
    """Goes through every stage and back, touching nothing: a round trip
    through an idle pipeline times its hops (Transport.measure_hops)."""

    ping_id: int


@dataclass(slots=True)
class GenerationStats:
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_runs: int = 0
    num_runs_cancelled: int = 0
    num_draft_tokens: int = 0  # draft tokens submitted for verification
    num_accepted_tokens: int = 0  # of those, accepted by the target
    num_verify_steps: int = 0  # results that produced tokens
    draft_calls: int = 0  # batches of guesses the drafter made for it
    draft_guesses: int = 0  # guesses in them
    draft_s: float = 0.0  # the draft's compute for them
    elapsed_s: float = 0.0
    first_token_s: float | None = None
    cancelled_run_ids: list[int] = field(default_factory=list)  # for the benchmark's wasted-compute figure
    # per source of guesses (speculation.py: draft, head): [launched, accepted]
    guesses_by_source: dict[str, list[int]] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mean_accepted_len(self) -> float:
        """Tokens produced per verifying result (1.0 = no speculation gain)."""
        return self.num_generated_tokens / self.num_verify_steps if self.num_verify_steps else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "tokens_per_s": round(self.tokens_per_s, 3),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_len": round(self.mean_accepted_len, 4),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "num_runs": self.num_runs,
            "num_runs_cancelled": self.num_runs_cancelled,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "guesses_by_source": {source: list(counts) for source, counts in self.guesses_by_source.items()},
            "elapsed_s": round(self.elapsed_s, 4),
            "ttft_s": None if self.first_token_s is None else round(self.first_token_s, 4),
        }


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_ids: tuple[int, ...]  # newly verified tokens, in order
    at_s: float = 0.0  # seconds since the request started, on the coordinator's clock


@dataclass(frozen=True, slots=True)
class FinishEvent:
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    stats: GenerationStats
    failure: Failure | None = None  # set when finish_reason is "error"
