"""What each stage spent its time on, run by run: the benchmark's timeline,
its wasted-compute figure and its bytes per token come from these spans."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

MAX_SPANS = 200_000  # per stage; oldest dropped beyond it, so a long-lived server never grows


@dataclass(frozen=True, slots=True)
class StageSpan:
    stage: int
    seq_id: int
    run_id: int
    is_speculative: bool
    num_tokens: int
    start_s: float  # wall clock (time.time) for real stages, simulated seconds for the simulator
    end_s: float
    outcome: str  # "computed" | "stopped" (cancelled mid-forward) | "skipped" (cancelled before it started)
    out_bytes: int  # sent on: hidden states to the next stage, or the result to the coordinator

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class SpanRecorder:
    """Thread-safe bounded log of spans; drain() hands them over once."""

    def __init__(self, max_spans: int = MAX_SPANS) -> None:
        self._spans: deque[StageSpan] = deque(maxlen=max_spans)
        self._lock = threading.Lock()

    def record(self, span: StageSpan) -> None:
        with self._lock:
            self._spans.append(span)

    def drain(self) -> list[StageSpan]:
        with self._lock:
            spans = list(self._spans)
            self._spans.clear()
        return spans


@dataclass(frozen=True, slots=True)
class Forward:
    """One pass of a stage through its layers, and the runs that shared it
    (batched runs record one span each, all with the forward's times)."""

    stage: int
    start_s: float
    end_s: float
    spans: tuple[StageSpan, ...]

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def num_tokens(self) -> int:
        return sum(span.num_tokens for span in self.spans if span.outcome != "skipped")

    def share(self, span: StageSpan) -> float:
        """The part of this forward's time that was `span`'s run's: its share
        of the tokens computed (a run skipped before the layers has none)."""
        if not self.num_tokens:
            return 1 / len(self.spans)
        return 0.0 if span.outcome == "skipped" else span.num_tokens / self.num_tokens


def forwards(spans: Iterable[StageSpan]) -> list[Forward]:
    """The spans grouped into the forwards they shared."""
    groups: dict[tuple[int, float, float], list[StageSpan]] = {}
    for span in spans:
        groups.setdefault((span.stage, span.start_s, span.end_s), []).append(span)
    return [Forward(stage, start, end, tuple(group)) for (stage, start, end), group in groups.items()]
