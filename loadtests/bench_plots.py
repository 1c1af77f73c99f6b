"""The benchmark's pictures: tokens/s per mode, the ITL distribution, and
one request's runs per stage (PNG, and a Chrome-trace/Perfetto JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from loadtests.bench_summary import ModeRecord  # noqa: E402
from pipeline.trace import StageSpan, forwards  # noqa: E402

RUN_COLOURS = {"canonical": "#2b8a3e", "speculative": "#1c7ed6", "cancelled": "#e03131"}
HOP_COLOUR = "#868e96"  # a run between two stages: the hop, and any wait for the next stage


def write_plots(results: dict, records: list[ModeRecord], out_dir: Path) -> dict[str, str]:
    """-> file names (relative to out_dir) by kind."""
    files = {"tokens_per_s": "tokens_per_s.png", "itl": "itl.png"}
    title = _title(results["setup"])
    _tokens_per_s(results, out_dir / files["tokens_per_s"], title)
    _itl(records, out_dir / files["itl"], title)
    spans = one_request_spans(records)
    if spans:
        files["timeline"] = "timeline.png"
        files["trace"] = "trace.json"
        cancelled = {run_id for r in records for t in r.timings if t.stats for run_id in t.stats["cancelled_run_ids"]}
        _timeline(spans, cancelled, out_dir / files["timeline"], title, results["setup"]["clock"],
                  {t["stage"]: t for t in results.get("decode_timing", []) if t["forwards"]})
        (out_dir / files["trace"]).write_text(json.dumps(chrome_trace(spans, cancelled)))
    return files


def one_request_spans(records: list[ModeRecord]) -> list[StageSpan]:
    """The first request of PipeInfer mode (or else the first mode with
    spans) at the lowest concurrency: its runs on every stage."""
    with_spans = sorted((r for r in records if r.spans), key=lambda r: (r.name != "pipeinfer", r.concurrency))
    if not with_spans:
        return []
    spans = with_spans[0].spans
    first_seq = min(span.seq_id for span in spans)
    return [span for span in spans if span.seq_id == first_seq]


def run_kind(span: StageSpan, cancelled: set[int]) -> str:
    if span.outcome != "computed" or span.run_id in cancelled:
        return "cancelled"
    return "speculative" if span.is_speculative else "canonical"


def chrome_trace(spans: list[StageSpan], cancelled: set[int]) -> dict:
    """Chrome trace event format (chrome://tracing, ui.perfetto.dev): one
    thread per stage, one complete event per run."""
    origin = min(span.start_s for span in spans)
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "pipeline stages"}}]
    for stage in sorted({span.stage for span in spans}):
        events.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": stage, "args": {"name": f"stage {stage}"}})
    for span in spans:
        kind = run_kind(span, cancelled)
        events.append({
            "ph": "X", "pid": 1, "tid": span.stage, "cat": kind,
            "name": f"run {span.run_id} ({kind})",
            "ts": round((span.start_s - origin) * 1e6, 3), "dur": round(span.duration_s * 1e6, 3),
            "args": {"run_id": span.run_id, "seq_id": span.seq_id, "tokens": span.num_tokens,
                     "outcome": span.outcome, "out_bytes": span.out_bytes},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _title(setup: dict) -> str:
    where = (f"simulated {setup['simulated_profile']['name']}" if setup["simulated_profile"]
             else f"{setup['transport']} transport")
    return f"{setup['model']} · draft {setup['draft']} · {setup['num_stages']} stages · {where}"


def _tokens_per_s(results: dict, path: Path, title: str) -> None:
    modes = results["modes"]
    names = list(dict.fromkeys(key.split("@")[0] for key in modes))
    levels = results["setup"]["concurrency"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names) * len(levels)), 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [(modes.get(name if c == 1 else f"{name}@c{c}") or {}).get("tokens_per_s") or 0 for c in levels]
        bars = ax.bar(np.arange(len(levels)) + i * width, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(levels)) + width * (len(names) - 1) / 2, [f"concurrency {c}" for c in levels])
    ax.set_ylabel("tokens/s (all requests)")
    ratios = ", ".join(f"{k} {v:.2f}x" for k, v in results["ratios"].items() if v is not None and "@" not in k)
    ax.set_title(f"{title}\n{ratios}", fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)


def _itl(records: list[ModeRecord], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lowest = min(r.concurrency for r in records)
    for record in records:
        if record.concurrency != lowest:
            continue
        gaps = np.sort([1000 * g for t in record.timings for g in t.inter_token_latencies_s()])
        if len(gaps):
            ax.step(gaps, np.arange(1, len(gaps) + 1) / len(gaps), where="post", label=record.name)
    ax.set_xscale("log")
    ax.set_xlabel("inter-token latency, ms (gap between output chunks)")
    ax.set_ylabel("fraction of gaps ≤ x")
    ax.set_title(f"{title}\nITL distribution, concurrency {lowest}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _timeline(spans: list[StageSpan], cancelled: set[int], path: Path, title: str, clock: str,
              decode_timing: dict[int, dict]) -> None:
    """decode_timing: per stage, where its one-token forward's time goes (written beside its row)."""
    origin = min(span.start_s for span in spans)
    stages = sorted({span.stage for span in spans})
    fig, ax = plt.subplots(figsize=(11, 1 + 0.45 * len(stages)))
    for forward in forwards(spans):  # runs that shared a forward split its bar by their share of its tokens
        at = 1000 * (forward.start_s - origin)
        for span in forward.spans:
            width = 1000 * forward.duration_s * forward.share(span)
            if width > 0:
                ax.broken_barh([(at, max(width, 1e-3))], (span.stage - 0.4, 0.8),
                               facecolors=RUN_COLOURS[run_kind(span, cancelled)], edgecolor="white", linewidth=0.3)
            at += width
    for start, end, stage in _hops(spans):  # a thin bar between the two rows
        ax.broken_barh([(1000 * (start - origin), max(1000 * (end - start), 1e-3))], (stage + 0.4, 0.2),
                       facecolors=HOP_COLOUR)
    ax.set_yticks(stages, [f"stage {s}" + (_split_label(decode_timing[s]) if s in decode_timing else "")
                           for s in stages], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ms since the request's first run ({clock})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in (*RUN_COLOURS.values(), HOP_COLOUR)]
    ax.legend(handles, [*RUN_COLOURS, "hop"], fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{title}\nruns of one request per stage (runs sharing a forward split its bar by their tokens)",
                 fontsize=9)
    _save(fig, path)


def _hops(spans: list[StageSpan]) -> list[tuple[float, float, int]]:
    """(left stage i, reached stage i + 1, i) for every run computed on two
    consecutive stages: what crossing the link took, waits included."""
    by_run = {(span.run_id, span.stage): span for span in spans if span.outcome == "computed"}
    return [(span.end_s, by_run[span.run_id, span.stage + 1].start_s, span.stage)
            for (run_id, stage), span in by_run.items() if (run_id, stage + 1) in by_run]


def _split_label(timing: dict) -> str:
    return (f"\ntoken {timing['total_ms']:.1f} ms: matmul {timing['matmul_ms']:.1f}"
            f"\nattention {timing['attention_ms']:.1f}, rest {timing['rest_ms']:.1f}")


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
