"""Prometheus metrics; names follow vLLM's (vllm:* -> pipeinfer:*) where one exists."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from pipeline.types import GenerationStats

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, stage_stats: Callable[[], list[dict]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_running = Gauge("pipeinfer:num_requests_running", "Requests in the engine.", registry=r)
        self.requests_waiting = Gauge("pipeinfer:num_requests_waiting", "Requests queued for admission.", registry=r)
        self.request_success = Counter("pipeinfer:request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.requests_rejected = Counter("pipeinfer:request_rejected", "Requests refused before generation, by HTTP status.",
                                         ["status"], registry=r)
        self.ttft = Histogram("pipeinfer:time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pipeinfer:inter_token_latency_seconds", "Time between two streamed tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pipeinfer:e2e_request_latency_seconds", "Request latency.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pipeinfer:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("pipeinfer:generation_tokens", "Tokens generated.", registry=r)
        self.draft_tokens = Counter("pipeinfer:spec_decode_num_draft_tokens", "Draft tokens verified.", registry=r)
        self.accepted_tokens = Counter("pipeinfer:spec_decode_num_accepted_tokens", "Draft tokens accepted.", registry=r)
        self.runs = Counter("pipeinfer:runs", "Runs submitted to the pipeline.", registry=r)
        self.runs_cancelled = Counter("pipeinfer:runs_cancelled", "Runs cancelled (early inference cancellation).",
                                      registry=r)
        r.register(_StageCollector(stage_stats))

    def count_rejected(self, status: int) -> None:
        self.requests_rejected.labels(status=str(status)).inc()

    def record_finish(self, reason: str, stats: GenerationStats) -> None:
        self.request_success.labels(finished_reason=reason).inc()
        self.e2e.observe(stats.elapsed_s)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generated_tokens)
        self.draft_tokens.inc(stats.num_draft_tokens)
        self.accepted_tokens.inc(stats.num_accepted_tokens)
        self.runs.inc(stats.num_runs)
        self.runs_cancelled.inc(stats.num_runs_cancelled)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StageCollector:
    """KV use and run counters per stage, read at scrape time."""

    def __init__(self, stage_stats: Callable[[], list[dict]]) -> None:
        self._stage_stats = stage_stats

    def collect(self):
        kv = GaugeMetricFamily("pipeinfer:kv_cache_usage_bytes", "KV cache bytes held per stage.", labels=["stage"])
        seqs = GaugeMetricFamily("pipeinfer:kv_cache_sequences", "Sequences with KV per stage.", labels=["stage"])
        stopped = GaugeMetricFamily("pipeinfer:stage_runs_stopped_mid_forward",
                                    "Runs a stage stopped between two layers.", labels=["stage"])
        for stats in self._stage_stats():
            label = [str(stats["stage"])]
            kv.add_metric(label, stats["kv_bytes"])
            seqs.add_metric(label, stats["num_sequences"])
            stopped.add_metric(label, stats["num_runs_stopped_mid_forward"])
        yield from (kv, seqs, stopped)
