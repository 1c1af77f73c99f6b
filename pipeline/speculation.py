"""How far and how eagerly to speculate: from the acceptance measured per
request, not from the draft's word alone.

The chance that a guess becomes a verified token is the product, over it and
every guess before it in the chain, of each one's acceptance probability.
pipeinfer mode launches a guess only while that product stays at least a
threshold: a good draft goes deep, a useless one turns speculation off (a
probing guess, judged by the next result without a run of its own, keeps
measuring it, so it comes back when the text turns predictable: one per
verification where the draft has cores of its own, one every EXPLORE_EVERY
where its compute is taken from a stage).

The thresholds weigh what a guess can win against what it can cost. An
accepted guess saves a pipeline pass, the time of every layer. A run more
that is wasted is cancelled within a layer, so delays the run that needs
its stage next by about one layer's time (its stage would idle otherwise):
a new run's first guess needs a chance of 1 / num_layers. A guess more in a
run makes that run's pass longer by the time of a token, which RunCost
measures: it needs a chance of (token time / pass time). Both grow with the
number of requests running, whose runs a wasted one displaces.
Where a transport puts the runs waiting for a stage through one forward, a
run chained behind one launched with it rides in that forward: its first
guess too costs a token, not a run. Where the draft computes on cores a
stage computes on too (a machine with fewer cores than workers, or a head
on the last stage), every guess also costs the draft's own compute, taken
from that stage: both bars rise by the draft's measured time per guess as a
share of a pass. min_accept_prob sets both bars by hand (0: every guess).

A new request starts from what the engine learnt of its draft on the
requests before it (DraftHistory), so a useless draft is found out once,
not once per request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pipeline.types import Mode

NUM_BINS = 5  # of the draft's confidence, [0, 1]
DEPTH_BINS = (1, 2, 3, 5, 1 << 30)  # upper ends: depth 1, 2, 3, 4-5, 6 and deeper
BIN_WEIGHT = 2.0  # a bin's rate leans on the request's overall rate until it has this many guesses
PRIOR_RATE, PRIOR_WEIGHT = 0.8, 2.0  # the overall rate before any verdict, and its weight in guesses
DEFAULT_TOKEN_COST = 0.1  # a token's share of a pass until RunCost has measured it
EXPLORE_EVERY = 8  # verifications between two probes of a draft that computes on a stage's cores
RUN_COST_SAMPLES = 64  # root runs the pass time is fit over
HISTORY_GUESSES = 256  # judged guesses a new request's starting rate is taken from
DRAFT_COST_BATCHES = 64  # batches of guesses the draft's compute per guess is taken from


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    mode: Mode = Mode.PIPEINFER
    # Most guesses per run (sync: per step; PipeInfer advises < 8). 3: a run of
    # the tip and 3 guesses is 4 rows, and the quantized CPU kernels compute
    # rows in blocks of 4 (a 5th row doubles a forward's matmuls: measured,
    # sync mode on extractive prompts 120 -> 143 tok/s going from 4 to 3).
    draft_len: int = 3
    # Most runs in flight per sequence (pipeinfer); None: one per stage plus
    # one waiting at the first stage, so that no stage idles.
    max_runs_in_flight: int | None = None
    # Launch a guess while P(it and all before it are accepted) >= this; None: measured (the run and
    # token bars: by the pipeline's depth and load, a token's time, the draft's compute).
    min_accept_prob: float | None = None
    # While other requests run, a longer prompt goes through the stages in chunks
    # of this many tokens, one in flight at a time, each sharing its forward with
    # their runs: it holds them up by a chunk, not by its whole length (alone, in
    # chunks 8 times larger). Smaller: less wait for others, a slower long prompt.
    prefill_chunk: int = 32

    def __post_init__(self) -> None:
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
        if self.max_runs_in_flight is not None and self.max_runs_in_flight < 1:
            raise ValueError(f"max_runs_in_flight must be >= 1, got {self.max_runs_in_flight}")
        if self.min_accept_prob is not None and not 0.0 <= self.min_accept_prob <= 1.0:
            raise ValueError(f"min_accept_prob must be in [0, 1], got {self.min_accept_prob}")
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")

    def runs_in_flight(self, num_stages: int) -> int:
        return self.max_runs_in_flight or num_stages + 1


def run_threshold(num_layers: int, num_sequences: int) -> float:
    """What a new run's first guess must be worth: a wasted run costs about
    a layer of each running request's time."""
    return min(1.0, max(1, num_sequences) / num_layers)


class _Rates:
    """Acceptance counts in bins, each bin's rate leaning on an overall rate
    until it has BIN_WEIGHT guesses of its own."""

    __slots__ = ("accepted", "tried")

    def __init__(self, num_bins: int) -> None:
        self.accepted = [0] * num_bins
        self.tried = [0] * num_bins

    def rate(self, b: int, overall: float) -> float:
        return (self.accepted[b] + BIN_WEIGHT * overall) / (self.tried[b] + BIN_WEIGHT)

    def observe(self, b: int, is_accepted: bool) -> None:
        self.tried[b] += 1
        self.accepted[b] += is_accepted


# Where a guess came from: the drafter (its own worker, or inline), or the
# head on the last stage (tail drafting). ngram+head has both; each source is
# judged by its own record.
DRAFT, HEAD = "draft", "head"


class _SourceHistory:
    """One source's recent verdicts and compute (DraftHistory)."""

    __slots__ = ("verdicts", "batches", "num_guesses", "seconds", "is_warm")

    def __init__(self) -> None:
        self.verdicts: deque[bool] = deque(maxlen=HISTORY_GUESSES)
        self.batches: deque[tuple[int, float]] = deque(maxlen=DRAFT_COST_BATCHES)  # (guesses, seconds)
        self.num_guesses, self.seconds = 0, 0.0  # their totals (read at every launch)
        self.is_warm = False  # past the source's first batch


class DraftHistory:
    """What the engine learnt of each source of guesses across requests:
    the acceptance of its last HISTORY_GUESSES judged guesses (a new
    request's starting rate, PRIOR_RATE before any), and its compute per guess."""

    __slots__ = ("_sources",)

    def __init__(self) -> None:
        self._sources: dict[str, _SourceHistory] = {}

    def _of(self, source: str) -> _SourceHistory:
        return self._sources.setdefault(source, _SourceHistory())

    def observe(self, is_accepted: bool, source: str = DRAFT) -> None:
        self._of(source).verdicts.append(is_accepted)

    def rate(self, source: str = DRAFT) -> float:
        verdicts = self._of(source).verdicts
        return (sum(verdicts) + PRIOR_RATE * PRIOR_WEIGHT) / (len(verdicts) + PRIOR_WEIGHT)

    def observe_compute(self, num_guesses: int, seconds: float, source: str = DRAFT) -> None:
        """A batch of guesses and its compute. A source's first batch is not
        counted: it pays one-time costs (lazy initialisation, first
        allocations; 25 forwards' worth seen), which would price the source
        out of speculation for good."""
        if not num_guesses:
            return
        history = self._of(source)
        if not history.is_warm:
            history.is_warm = True
            return
        if len(history.batches) == history.batches.maxlen:
            old_guesses, old_seconds = history.batches[0]  # about to fall out
            history.num_guesses -= old_guesses
            history.seconds -= old_seconds
        history.batches.append((num_guesses, seconds))
        history.num_guesses += num_guesses
        history.seconds += seconds

    def seconds_per_guess(self, source: str = DRAFT) -> float:
        """The source's compute per guess over its recent batches (0 before any)."""
        history = self._of(source)
        return history.seconds / history.num_guesses if history.num_guesses else 0.0


class _SourceAcceptance:
    """One source's rates in a request (AcceptanceModel)."""

    __slots__ = ("by_depth", "by_confidence", "prior")

    def __init__(self, prior: float) -> None:
        self.by_depth = _Rates(len(DEPTH_BINS))
        self.by_confidence = _Rates(NUM_BINS)
        self.prior = prior

    @property
    def overall(self) -> float:
        counts = self.by_depth
        return (sum(counts.accepted) + self.prior * PRIOR_WEIGHT) / (sum(counts.tried) + PRIOR_WEIGHT)


class AcceptanceModel:
    """Per request and per source of guesses: the probability that a guess
    is accepted, learnt from the verdicts so far, by its *depth* (1 for the
    first guess after a token the target chose itself, d for one following
    d - 1 accepted guesses: copying runs long, so the rate rises with depth)
    and by the draft's confidence (how informative it is, the verdicts tell).
    The two combine as factors on the source's overall rate in the request,
    which starts at PRIOR_RATE (optimistic, so that the first pipeline pass
    is speculated: a useless draft is found out after a handful of guesses).
    An uninformative confidence (a synthetic draft's constant, a model's flat
    top probability) so changes nothing, while an informative one keeps
    unlikely guesses out of the pipeline. Given the engine's DraftHistory, a
    source starts from its rate on the requests before, and its verdicts go
    there too. Sources never pool: ngram+head's lookup, right in long
    stretches, and its head, right half the time, each get their own bars."""

    __slots__ = ("_sources", "_history")

    def __init__(self, history: DraftHistory | None = None) -> None:
        self._sources: dict[str, _SourceAcceptance] = {}
        self._history = history

    def _of(self, source: str) -> _SourceAcceptance:
        rates = self._sources.get(source)
        if rates is None:
            prior = self._history.rate(source) if self._history is not None else PRIOR_RATE
            rates = self._sources[source] = _SourceAcceptance(prior)
        return rates

    @staticmethod
    def _confidence_bin(confidence: float) -> int:
        return min(NUM_BINS - 1, max(0, int(confidence * NUM_BINS)))

    @staticmethod
    def _depth_bin(depth: int) -> int:
        return next(i for i, top in enumerate(DEPTH_BINS) if depth <= top)

    def overall(self, source: str = DRAFT) -> float:
        return self._of(source).overall

    def probability(self, confidence: float, depth: int = 1, source: str = DRAFT) -> float:
        rates = self._of(source)
        overall = rates.overall
        by_depth = rates.by_depth.rate(self._depth_bin(depth), overall)
        by_confidence = rates.by_confidence.rate(self._confidence_bin(confidence), overall)
        return min(1.0, by_depth * by_confidence / overall)

    def observe(self, confidence: float, is_accepted: bool, depth: int = 1, source: str = DRAFT) -> None:
        rates = self._of(source)
        rates.by_depth.observe(self._depth_bin(depth), is_accepted)
        rates.by_confidence.observe(self._confidence_bin(confidence), is_accepted)
        if self._history is not None:
            self._history.observe(is_accepted, source)


_STALE = object()  # RunCost's fit, before it is computed for the current samples


class RunCost:
    """How long a pipeline pass takes for a run of n tokens, a + b * n, fit
    by least squares over the last RUN_COST_SAMPLES root runs of decode size
    (a root run is launched into an idle chain: nothing of its own queues
    before it). b / a is what a guess more in a run costs, as a share of the
    pass it can save."""

    def __init__(self) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=RUN_COST_SAMPLES)
        self._fitted: tuple[float, float] | None | object = _STALE  # the fit of the samples as they are

    def observe(self, num_tokens: int, seconds: float) -> None:
        self._samples.append((num_tokens, seconds))
        self._fitted = _STALE

    def _fit(self) -> tuple[float, float] | None:
        """(a, b) by least squares, once runs of two sizes were seen; fit
        once per new sample (the coordinator asks at every launch)."""
        if self._fitted is _STALE:
            self._fitted = self._least_squares()
        return self._fitted

    def _least_squares(self) -> tuple[float, float] | None:
        n = len(self._samples)
        xs = [x for x, _ in self._samples]
        if n < 4 or min(xs) == max(xs):
            return None
        mean_x = sum(xs) / n
        mean_y = sum(y for _, y in self._samples) / n
        b = sum((x - mean_x) * (y - mean_y) for x, y in self._samples) / sum((x - mean_x) ** 2 for x in xs)
        return mean_y - b * mean_x, b

    def pass_seconds(self, num_tokens: int) -> float | None:
        """A pass for a run of this size (the mean pass while only one size
        was seen; None before any)."""
        fit = self._fit()
        if fit is not None:
            return fit[0] + fit[1] * num_tokens
        return sum(y for _, y in self._samples) / len(self._samples) if self._samples else None

    def token_share(self) -> float:
        """b / a, once runs of two sizes were seen (else DEFAULT_TOKEN_COST)."""
        fit = self._fit()
        if fit is None or fit[0] <= 0:
            return DEFAULT_TOKEN_COST
        return min(1.0, max(0.0, fit[1] / fit[0]))
