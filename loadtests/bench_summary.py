"""From what one mode's batches recorded to the figures in results.json."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from loadtests.timing import RequestTiming
from pipeline.sim_profiles import ClusterProfile
from pipeline.trace import StageSpan, forwards


@dataclass(slots=True)
class ModeRecord:
    """Everything one mode (or baseline) did at one concurrency, all repetitions."""

    name: str
    concurrency: int
    timings: list[RequestTiming] = field(default_factory=list)
    spans: list[StageSpan] = field(default_factory=list)
    duration_s: float = 0.0  # summed over batches, on the engine's clock

    @property
    def key(self) -> str:
        """The name in results.json: MODE at concurrency 1, MODE@cN otherwise."""
        return self.name if self.concurrency == 1 else f"{self.name}@c{self.concurrency}"


@dataclass(frozen=True, slots=True)
class Floor:
    """What the bandwidth floor of a real run needs: the weight bytes each
    stage's one-token forward reads (of an embedding table, a row), the
    memory read bandwidth of each stage's own cores (measured: one core
    reads half what two do here), and the largest run of a decode step
    (longer ones are prompts)."""

    stage_weight_bytes: list[int]
    stage_read_bytes_per_s: list[float]
    max_decode_run_tokens: int


def summarize(record: ModeRecord, profile: ClusterProfile | None = None, floor: Floor | None = None) -> dict:
    timings = record.timings
    num_tokens = sum(len(t.token_ids) for t in timings)
    itl_ms = [1000 * gap for t in timings for gap in t.inter_token_latencies_s()]
    ttft_ms = [1000 * t.ttft_s for t in timings if t.ttft_s is not None]
    stats = [t.stats for t in timings if t.stats is not None]
    summary = {
        "concurrency": record.concurrency,
        "num_requests": len(timings),
        "num_tokens": num_tokens,
        "tokens_per_s": _ratio(num_tokens, record.duration_s),
        "itl_ms_p50": _percentile(itl_ms, 50),
        "itl_ms_p99": _percentile(itl_ms, 99),
        "ttft_ms_p50": _percentile(ttft_ms, 50),
        "ttft_ms_p99": _percentile(ttft_ms, 99),
        "acceptance_rate": None,
        "mean_accepted_len": None,
        "runs_cancelled_frac": None,
        "wasted_stage_compute_frac": None,
        "bytes_per_token": None,
    }
    if stats:  # our engine's own figures; a baseline has none
        summary["acceptance_rate"] = _ratio(sum(s["num_accepted_tokens"] for s in stats),
                                            sum(s["num_draft_tokens"] for s in stats))
        summary["mean_accepted_len"] = _ratio(sum(s["num_generated_tokens"] for s in stats),
                                              sum(s["num_verify_steps"] for s in stats))
        summary["runs_cancelled_frac"] = _ratio(sum(s["num_runs_cancelled"] for s in stats),
                                                sum(s["num_runs"] for s in stats))
    if record.spans:
        cancelled = {run_id for s in stats for run_id in s["cancelled_run_ids"]}
        passes = forwards(record.spans)
        busy = sum(f.duration_s for f in passes)
        wasted = sum(f.share(span) * f.duration_s for f in passes for span in f.spans
                     if span.outcome != "computed" or span.run_id in cancelled)
        summary["wasted_stage_compute_frac"] = _ratio(wasted, busy)
        summary["bytes_per_token"] = _ratio(sum(span.out_bytes for span in record.spans), num_tokens)
        if floor is not None:
            summary["stage_bandwidth_frac"] = _bandwidth_fractions(passes, floor)
    if profile is not None and summary["mean_accepted_len"]:
        # The physical limit: one run's weight reads and hops, per token it yields.
        floor = summary["mean_accepted_len"] / profile.floor_s_per_run()
        summary["floor_tokens_per_s"] = round(floor, 4)
        summary["fraction_of_floor"] = _ratio(summary["tokens_per_s"], floor)
    return summary


def _bandwidth_fractions(passes, floor: Floor) -> list[float | None]:
    """Per stage: its weight bytes over its mean decode forward, as a share
    of the read bandwidth of its cores (1.0: the stage streams its weights
    as fast as its cores can read memory; the rest is compute and overhead)."""
    fractions = []
    for stage, (weight_bytes, read_bytes_per_s) in enumerate(zip(floor.stage_weight_bytes,
                                                                 floor.stage_read_bytes_per_s)):
        times = [f.duration_s for f in passes if f.stage == stage and f.num_tokens and all(
            span.num_tokens <= floor.max_decode_run_tokens for span in f.spans if span.outcome != "skipped")]
        fractions.append(_ratio(weight_bytes * len(times), sum(times) * read_bytes_per_s) if times else None)
    return fractions


def head_cost(stage_stats: list[dict], records: list[ModeRecord]) -> dict:
    """Tail drafting's price: the head's time per guess on the last stage,
    against one target forward of a single token (the sum over the stages of
    their median one-token forward, from ar mode's runs, which draft nothing)."""
    last = stage_stats[-1]
    per_guess = last["draft_head_s"] / last["draft_head_tokens"]
    ar_forwards = forwards(span for record in records if record.key == "ar" for span in record.spans)
    per_stage = [[f.duration_s for f in ar_forwards if f.stage == stage and len(f.spans) == 1
                  and f.spans[0].num_tokens == 1 and f.spans[0].outcome == "computed"] for stage in range(len(stage_stats))]
    forward_s = sum(float(np.median(times)) for times in per_stage) if all(per_stage) else None
    return {"ms_per_guess": round(1000 * per_guess, 4), "guesses": last["draft_head_tokens"],
            "target_forward_ms": None if forward_s is None else round(1000 * forward_s, 3),
            "frac_of_target_forward": None if forward_s is None else _ratio(per_guess, forward_s)}


def ratios(summaries: dict[str, dict], concurrency: int, baselines: list[str]) -> dict[str, float | None]:
    """tokens/s of one mode over another's, at one concurrency."""
    suffix = "" if concurrency == 1 else f"@c{concurrency}"

    def tps(name: str) -> float | None:
        entry = summaries.get(name + suffix)
        return entry["tokens_per_s"] if entry else None

    pairs = [("pipeinfer", "ar"), ("pipeinfer", "sync"), ("sync", "ar")] + [
        (ours, b) for b in baselines for ours in ("pipeinfer", "ar")]
    out = {}
    for a, b in pairs:
        if tps(a) is not None and tps(b):
            out[f"{a}_vs_{b.replace('-', '_')}{suffix}"] = _ratio(tps(a), tps(b))
    return out


def outputs_match(records: list[ModeRecord]) -> dict[str, bool]:
    """Greedy output of every mode against the first one's, prompt by prompt
    (lossless: at temperature 0 they must all be equal)."""
    reference: dict[int, list[int]] = {}
    for timing in records[0].timings:
        reference.setdefault(timing.prompt_index, timing.token_ids)
    return {record.key: all(t.token_ids == reference.get(t.prompt_index, t.token_ids) for t in record.timings)
            for record in records}


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None
