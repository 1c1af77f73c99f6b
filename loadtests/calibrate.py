"""A simulation profile measured from a real benchmark run (`pipeinfer bench
--calibrate`), so that `--simulate profile.json` replays that very cluster:

- each stage's time for a run of n tokens, a + b * n, fit by least squares
  on the decode-sized runs every mode computed (its spans), and for a longer
  run (a prompt) its median time per token over the prompts computed;
- one link latency, such that the autoregressive pass (every stage's
  one-token time plus num_stages + 1 hops, the last one back to the
  coordinator) takes what ar's inter-token latency measured: it folds in the
  coordinator's own time;
- the draft's time per guess, from what the drafter reported (none for a
  draft that costs nothing).
"""

from __future__ import annotations

import numpy as np

from loadtests.bench_summary import ModeRecord
from pipeline.sim_profiles import ClusterProfile
from pipeline.trace import forwards
from pipeline.types import Mode

MEASURED_BANDWIDTH_BPS = 1e15  # links: the measured latency is all there is


def calibrate(records: list[ModeRecord], *, name: str, num_stages: int, num_layers: int, hidden_size: int,
              activation_bytes: int, max_run_tokens: int) -> ClusterProfile:
    """records: the benchmark's, at concurrency 1, with stage spans (local or
    Ray transport) and an ar record (for the pass overhead)."""
    ours = [r for r in records if r.concurrency == 1 and r.name in {m.value for m in Mode}]
    ar = next((r for r in ours if r.name == Mode.AR.value), None)
    if ar is None or not any(r.spans for r in ours):
        raise ValueError("--calibrate needs the ar mode and stage spans (the local or Ray transport)")
    stage_costs = tuple(_fit_stage(ours, stage, max_run_tokens) for stage in range(num_stages))
    prefill_token_s = tuple(_prefill_token_s(ours, stage, max_run_tokens, stage_costs[stage])
                            for stage in range(num_stages))
    ar_gaps = [gap for t in ar.timings for gap in t.inter_token_latencies_s()]
    pass_s = float(np.median(ar_gaps))
    compute_s = sum(a + b for a, b in stage_costs)
    link_s = max(0.0, (pass_s - compute_s) / (num_stages + 1))
    stats = [t.stats for r in ours for t in r.timings if t.stats]
    guesses = sum(s["draft_guesses"] for s in stats)
    draft_token_s = sum(s["draft_s"] for s in stats) / guesses if guesses else 0.0
    return ClusterProfile(
        name=name, description=f"measured on a real run: {num_stages} stage(s), ar pass {1000 * pass_s:.1f} ms",
        num_stages=num_stages, num_layers=num_layers, params_per_layer=0.0, head_params=0.0,
        hidden_size=hidden_size, bytes_per_param=0.0, activation_bytes=activation_bytes,
        memory_bandwidth_Bps=1.0, flops=1.0, run_overhead_s=0.0,
        link_latency_s=link_s, link_bandwidth_Bps=MEASURED_BANDWIDTH_BPS,
        draft_token_s=draft_token_s, draft_call_s=0.0, stage_costs=stage_costs,
        max_decode_tokens=max_run_tokens, prefill_token_s=prefill_token_s,
    )


def _fit_stage(records: list[ModeRecord], stage: int, max_run_tokens: int) -> tuple[float, float]:
    # Per forward (runs that shared one are timed once, at their tokens together).
    points = [(f.num_tokens, f.duration_s) for r in records for f in forwards(r.spans)
              if f.stage == stage and all(s.outcome == "computed" for s in f.spans) and f.num_tokens <= max_run_tokens]
    if not points:
        raise ValueError(f"stage {stage} computed no decode-sized run to calibrate on")
    x, y = np.array(points, dtype=float).T
    if x.min() == x.max():
        return float(np.median(y)), 0.0
    b, a = np.polyfit(x, y, 1)
    if b < 0:  # noise on a flat cost: a constant fits better than a falling line
        return float(np.median(y)), 0.0
    return float(a), float(b)


def _prefill_token_s(records: list[ModeRecord], stage: int, max_run_tokens: int, decode: tuple[float, float]
                     ) -> float:
    """Seconds per token of the runs longer than decode size (prompts); with
    none seen, the decode fit's (a + b * n) / n at the largest decode size."""
    per_token = [f.duration_s / f.num_tokens for r in records for f in forwards(r.spans)
                 if f.stage == stage and all(s.outcome == "computed" for s in f.spans) and f.num_tokens > max_run_tokens]
    if per_token:
        return float(np.median(per_token))
    a, b = decode
    return a / max_run_tokens + b
