"""`pipeinfer bench`: the modes side by side, in one run, on one engine.

One engine serves every mode (the coordinator switches mode between
batches), so all modes share the same stages, weights and processes.
Repetitions interleave the modes (ar sync pipeinfer ar sync pipeinfer ...)
so that a noisy neighbour slows all of them alike. Every request ignores EOS
and generates exactly max_tokens, so every mode does the same work.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from compute.model_source import resolve_model
from compute.stage_model import DTYPES, PackedLinear, can_pack
from compute.threads import on_passing_thread
from compute.types import GenerationRequest, SamplingParams, check_context
from loadtests.bench_config import BenchConfig, Prompt, check_baseline_kind
from loadtests.bench_plots import write_plots
from loadtests.bench_summary import Floor, ModeRecord, head_cost, outputs_match, ratios, summarize
from loadtests.calibrate import calibrate
from loadtests.timing import RequestTiming
from pipeline.cores import machine_cores
from pipeline.engine import Engine
from pipeline.sim_profiles import get_profile
from pipeline.trace import StageSpan
from pipeline.types import FinishEvent, GenerationError, Mode, TokenEvent

log = logging.getLogger(__name__)

@dataclass(slots=True)
class Batch:
    timings: list[RequestTiming]
    duration_s: float
    spans: list[StageSpan]


class Runner(Protocol):
    name: str

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> Batch: ...


class EngineModeRunner:
    """One of our modes, on the shared engine."""

    def __init__(self, engine: Engine, mode: Mode) -> None:
        self.name = mode.value
        self._engine = engine
        self._speculation = dataclasses.replace(engine.speculation, mode=mode)

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> Batch:
        engine = self._engine
        engine.set_speculation(self._speculation)  # handled before the requests below
        engine.stage_spans()  # drop anything recorded before this batch
        clock = engine.clock  # simulated time under --simulate
        started = clock()
        with ThreadPoolExecutor(concurrency) as pool:
            timings = list(pool.map(lambda item: self._one(*item, max_tokens), enumerate(prompts)))
        return Batch(timings, clock() - started, engine.stage_spans())

    def _one(self, index: int, prompt: list[int], max_tokens: int) -> RequestTiming:
        timing = RequestTiming(index)
        request = GenerationRequest(tuple(prompt), max_tokens, SamplingParams(), stop_token_ids=frozenset())
        for event in self._engine.generate(request):
            if isinstance(event, TokenEvent):
                timing.add_chunk(event.at_s, event.token_ids)
            elif isinstance(event, FinishEvent):
                if event.finish_reason == "error":
                    raise GenerationError(dataclasses.replace(event.failure, message=f"{self.name}: {event.failure.message}"))
                timing.stats = dataclasses.asdict(event.stats)
        return timing


class BaselineRunner:
    """A peer on the same target: vLLM (optional extra pipeinfer[vllm]) or
    llama.cpp (its llama-server, on the GGUF the model was converted from),
    by the kind's prefix. threads, slots, ctx, llama_server: llama.cpp's only
    (vLLM takes this process's threads and its own max_num_seqs)."""

    def __init__(self, kind: str, model_dir: Path, dtype: str, llama_server: Path | None = None,
                 threads: int | None = None, slots: int = 1, ctx: int | None = None) -> None:
        from loadtests.llamacpp_baseline import DEFAULT_CTX, LlamaCppBaseline, is_llamacpp_kind

        check_baseline_kind(kind)
        if is_llamacpp_kind(kind):
            self._baseline = LlamaCppBaseline(model_dir, kind, llama_server=llama_server, threads=threads,
                                              slots=slots, ctx=ctx or DEFAULT_CTX)
            self.version = self._baseline.version
        else:
            from loadtests.vllm_baseline import VLLMBaseline

            self._baseline = VLLMBaseline(model_dir, kind, dtype=dtype)
            self.version = self._baseline.info.get("vllm_version")
        self.name = self._baseline.name
        self.info = self._baseline.info

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int) -> Batch:
        started = time.perf_counter()
        timings = self._baseline.run(prompts, max_tokens, concurrency)
        return Batch(timings, time.perf_counter() - started, [])

    def close(self) -> None:
        self._baseline.close()


def encode_prompt(engine: Engine, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        return engine.encode(prompt)
    return engine.encode_chat([{"role": role, "content": content} for role, content in prompt])


def run_bench(config: BenchConfig, show_progress: bool = True) -> dict:
    """Run everything, write results.json, the plots and the trace; -> the results."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    # Before the weights take memory, on a passing thread: a thread that ran parallel
    # torch ops keeps its OpenMP pool spinning beside the stages (compute/threads.py).
    # Per stage with its own cores' threads, and with every core (the machine's figure).
    cores_per_stage = [min(len(machine_cores()), max(1, int(plan.num_cpus)))
                       for plan in config.engine.plans(resolve_model(config.engine.model, show_progress))]
    bandwidths = {} if config.engine.simulate else {
        n: on_passing_thread(lambda n=n: read_bandwidth(threads=n)) for n in {*cores_per_stage, len(machine_cores())}}
    engine = Engine.load(config.engine, show_progress=show_progress)
    runners: list[Runner] = [EngineModeRunner(engine, mode) for mode in config.modes]
    try:
        floor = None if not bandwidths else Floor([s["decode_read_bytes"] for s in engine.stage_stats()],
                                                  [bandwidths[n] for n in cores_per_stage],
                                                  config.engine.speculation.draft_len + 1)
        prompts = [encode_prompt(engine, p) for p in config.prompts]
        check_context(max(len(p) for p in prompts), config.max_tokens, engine.max_context, "--max-tokens")
        # llama.cpp: our stages' cores, a slot per request in flight, each slot the longest request's context
        threads = stage_threads(config.engine.num_stages, config.engine.stage_cpus)
        ctx = _round_up(max(len(p) for p in prompts) + config.max_tokens + 8, 256)
        for kind in config.baselines:  # one by one: those started are closed below should a later one fail
            runners.append(BaselineRunner(kind, engine.model_dir, config.engine.dtype, llama_server=config.llama_server,
                                          threads=threads, slots=max(max(config.concurrency), 1), ctx=ctx))
        for runner in runners:  # warm up: first-call costs (allocation, compilation) stay out of the figures
            runner.run(prompts[:1], min(4, config.max_tokens), 1)
        hops = None if config.engine.simulate else engine.transport.measure_hops()
        records = _measure(config, runners, prompts, show_progress)
        during_long = _short_during_long(engine, prompts[0], config.long_prompt) if config.long_prompt else None
        stage_stats = engine.stage_stats()  # before close: Ray's and MPI's stages answer only while they run
    finally:
        for runner in runners:
            if isinstance(runner, BaselineRunner):
                runner.close()
        engine.close()
    results = _results(config, engine, records, floor, stage_stats,
                       {r.name: r.version for r in runners if isinstance(r, BaselineRunner)},
                       bandwidths.get(len(machine_cores())), hops)
    if during_long is not None:
        results["long_prompt"] = during_long
    results["files"] = write_plots(results, records, config.out_dir)
    if config.calibrate:
        profile = calibrate(records, name=f"measured:{config.out_dir.name}", num_stages=engine.transport.num_stages,
                            num_layers=engine.transport.num_layers, hidden_size=engine.model_config.hidden_size,
                            activation_bytes=DTYPES[config.engine.dtype].itemsize,
                            max_run_tokens=2 * config.engine.speculation.draft_len + 2)
        (config.out_dir / "profile.json").write_text(json.dumps(profile.as_dict(), indent=2) + "\n")
        results["files"]["profile"] = "profile.json"
    (config.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def stage_threads(num_stages: int, stage_cpus: int | None) -> int:
    """The cores our stages compute on, in all: every core of this process
    unless --stage-cpus sets fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if stage_cpus is None else max(1, min(cores, num_stages * stage_cpus))


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def read_bandwidth(num_bytes: int = 1 << 29, repeats: int = 5, threads: int | None = None) -> float:
    """This machine's memory read bandwidth (bytes/s) with `threads` torch
    threads (default: as many as there are): the best of a few passes over a
    buffer far larger than any cache, read by a sum and, where oneDNN is
    here, by the packed matrix-vector product the stages decode with (it
    streams faster: 42 GB/s against 38 measured here)."""
    if threads is not None:
        torch.set_num_threads(threads)  # (the caller's passing thread's)
    buffer = torch.ones(num_bytes // 4)
    reads = [buffer.sum]
    if can_pack(torch.float32):
        weight = PackedLinear(torch.nn.Linear(8192, num_bytes // 4 // 8192, bias=False))
        vector = torch.ones(1, 8192)
        reads.append(lambda: weight(vector))
    best = float("inf")
    for read in reads * repeats:
        started = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - started)
    return num_bytes / best


SHORT_TOKENS = 4  # the short request's answer, alone and during the long prompt


def _short_during_long(engine: Engine, prompt: list[int], long_tokens: int) -> dict:
    """A short request (the first prompt, SHORT_TOKENS tokens) alone, then
    sent while a prompt of long_tokens tokens (the first prompt repeated) is
    being prefilled: how long it waits behind it, against 3x its time alone
    plus one chunk's forward (chunks: --prefill-chunk)."""
    check_context(long_tokens, 1, engine.max_context, "--long-prompt")
    engine.set_speculation(dataclasses.replace(engine.speculation, mode=Mode.AR))
    short = GenerationRequest(tuple(prompt), SHORT_TOKENS, SamplingParams(), stop_token_ids=frozenset())
    engine.complete(short)
    started = time.monotonic()
    engine.complete(short)
    alone_s = time.monotonic() - started
    long = GenerationRequest(tuple((prompt * (long_tokens // len(prompt) + 1))[:long_tokens]), 1, SamplingParams(),
                             stop_token_ids=frozenset())
    engine.stage_spans()  # drop what came before
    first_token_at: list[float] = []
    long_started = time.monotonic()
    thread = threading.Thread(target=lambda: first_token_at.append(
        engine.complete(long).stats.first_token_s or 0.0), name="long-prompt")
    thread.start()
    time.sleep(min(1.0, alone_s * 5))  # the long prompt is well under way
    started = time.monotonic()
    engine.complete(short)
    during_s = time.monotonic() - started
    thread.join()
    chunk = engine.speculation.prefill_chunk
    spans = [s for s in engine.stage_spans() if s.num_tokens == chunk and s.outcome == "computed"]
    chunk_s = 0.0  # a chunk's forward through every stage: the median at each, summed
    for stage in {s.stage for s in spans}:
        times = sorted(s.duration_s for s in spans if s.stage == stage)
        chunk_s += times[len(times) // 2]
    return {"mode": "ar", "long_prompt_tokens": long_tokens, "prefill_chunk": chunk, "short_tokens": SHORT_TOKENS,
            "short_alone_ms": round(alone_s * 1000, 1), "short_during_ms": round(during_s * 1000, 1),
            "chunk_forward_ms": round(chunk_s * 1000, 1),
            "bound_ms": round((3 * alone_s + chunk_s) * 1000, 1),
            "long_first_token_s": round(first_token_at[0] if first_token_at else time.monotonic() - long_started, 2)}


def _measure(config: BenchConfig, runners: list[Runner], prompts: list[list[int]],
             show_progress: bool) -> list[ModeRecord]:
    records: dict[tuple[str, int], ModeRecord] = {}
    total = len(config.concurrency) * config.repeat * len(runners)
    with tqdm(total=total, desc="bench", unit="batch", disable=not show_progress) as progress:
        for concurrency in config.concurrency:
            for _ in range(config.repeat):
                for runner in runners:  # interleaved: A B C A B C ...
                    progress.set_postfix_str(f"{runner.name} x{concurrency}")
                    # At least `concurrency` requests, so that that many are in flight (prompts repeat).
                    filled = [prompts[i % len(prompts)] for i in range(max(len(prompts), concurrency))]
                    batch = runner.run(filled, config.max_tokens, concurrency)
                    for timing in batch.timings:
                        timing.prompt_index %= len(prompts)
                    record = records.setdefault((runner.name, concurrency), ModeRecord(runner.name, concurrency))
                    record.timings += batch.timings
                    record.spans += batch.spans
                    record.duration_s += batch.duration_s
                    progress.update()
    return list(records.values())


def _results(config: BenchConfig, engine: Engine, records: list[ModeRecord], floor: Floor | None,
             stage_stats: list[dict], baseline_versions: dict[str, str | None] | None = None,
             machine_read_bytes_per_s: float | None = None, hops: dict | None = None) -> dict:
    profile = get_profile(config.engine.simulate) if config.engine.simulate else None
    modes = {record.key: summarize(record, profile, floor) for record in records}
    baseline_names = sorted({r.name for r in records if r.name not in {m.value for m in Mode}})
    all_ratios: dict[str, float | None] = {}
    for concurrency in config.concurrency:
        all_ratios.update(ratios(modes, concurrency, baseline_names))
    setup = _setup(config, engine, profile)
    if baseline_versions:
        setup["baseline_versions"] = baseline_versions
    setup["weights"] = [stats["weight_format"] for stats in stage_stats if "weight_format" in stats]
    if floor is not None:
        setup["machine"]["read_gb_per_s"] = round(machine_read_bytes_per_s / 1e9, 2)  # every core
        setup["stage_read_gb_per_s"] = [round(b / 1e9, 2) for b in floor.stage_read_bytes_per_s]
        setup["stage_weight_bytes"] = floor.stage_weight_bytes
    results = {
        "setup": setup,
        "modes": modes,
        "ratios": all_ratios,
        "outputs_equal_first_mode": outputs_match(records),
        # per stage, a one-token forward (every mode's decoding): its matmuls, attention and the rest
        "decode_timing": [{"stage": stats["stage"], **stats["decode_timing"]}
                          for stats in stage_stats if "decode_timing" in stats],
        # per stage: runs computed over forwards computed, every mode and concurrency (runs that shared forwards)
        "runs_per_forward": [round(stats["num_runs_computed"] / max(stats["num_forwards"], 1), 3)
                             for stats in stage_stats if "num_forwards" in stats],
        # measured: pings through the idle pipeline (a hop's cost); links: per link into a stage
        # (Ray's data plane), its messages, bytes and time from send to the stage taking it
        "hops": {"measured": hops, "links": [{"into_stage": stats["stage"], **stats["hop_in"]}
                                             for stats in stage_stats if "hop_in" in stats]},
    }
    if any(stats.get("draft_head_tokens") for stats in stage_stats):
        results["draft_head"] = head_cost(stage_stats, records)
    return results


def _setup(config: BenchConfig, engine: Engine, profile) -> dict:
    engine_config = config.engine
    return {
        "model": engine_config.model,
        "model_dir": str(engine.model_dir),
        "draft": engine_config.draft,
        "num_stages": profile.num_stages if profile else engine_config.num_stages,
        "transport": "simulated" if profile else engine_config.transport,
        "dtype": engine_config.dtype,
        "speculation": {k: v for k, v in dataclasses.asdict(engine_config.speculation).items() if k != "mode"},
        "modes": [m.value for m in config.modes],
        "baselines": list(config.baselines),
        "num_prompts": len(config.prompts),
        "max_tokens": config.max_tokens,
        "repeat": config.repeat,
        "concurrency": list(config.concurrency),
        "simulated_profile": profile.as_dict() if profile else None,
        "clock": "simulated seconds" if profile else "wall seconds",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
