"""The engine facade: build stages, transport, draft and coordinator from a
config, and generate. Everything above it (CLI, HTTP) talks only to this."""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig

from draft_models import load_draft
from pipeline.coordinator import Coordinator
from pipeline.local_transport import LayerDelay, LocalTransport
from pipeline.model_source import load_config, resolve_model
from pipeline.partition import StagePlan, even_plans
from pipeline.sim_profiles import get_profile
from pipeline.sim_transport import CostedDraft, SimulatedTransport
from pipeline.speculation import SpeculationConfig
from pipeline.stage import Stage
from pipeline.stage_model import DTYPES, StageModel
from pipeline.trace import StageSpan
from pipeline.transport import Transport
from pipeline.types import (
    Failure,
    FailureCode,
    FinishEvent,
    GenerationRequest,
    GenerationStats,
    SamplingParams,
    TokenEvent,
)

log = logging.getLogger(__name__)

TRANSPORTS = ("local", "ray", "mpi")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str = "default"
    draft: str = "none"
    num_stages: int = 1
    dtype: str = "float32"  # float32 on CPU keeps the split exact and is not slower here
    transport: str = "local"  # local | ray | mpi
    ray_address: str | None = None  # ray transport: None starts a local Ray; "auto" or an address joins one
    kv_budget_bytes: int | None = None  # per stage: new sequences are refused beyond it
    stage_plans: tuple[StagePlan, ...] | None = None  # explicit layers/resources per stage; None: even split
    placement_strategy: str = "PACK"  # ray: PACK, or STRICT_SPREAD for one stage per node
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    # A sim_profiles name: the real model computes the tokens in simulated time
    # on the cluster the profile describes (its stage count wins).
    simulate: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.simulate is not None:
            get_profile(self.simulate)  # a clear error for an unknown name
            if self.transport != "local":
                raise ValueError("--simulate runs every stage in this process: it needs --transport local")


@dataclass(slots=True)
class GenerationOutput:
    token_ids: list[int]
    text: str | None
    finish_reason: str
    stats: GenerationStats


class GenerationError(RuntimeError):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Engine:
    def __init__(self, config: EngineConfig, model_dir: Path, coordinator: Coordinator) -> None:
        self.config = config
        self.model_dir = model_dir
        self.coordinator = coordinator
        self.model_config = load_config(model_dir)
        self.tokenizer = _load_tokenizer(model_dir)
        self.eos_token_ids = _eos_token_ids(model_dir, self.model_config)

    @classmethod
    def load(cls, config: EngineConfig, *, layer_delay: LayerDelay | None = None, show_progress: bool = True) -> Engine:
        model_dir = resolve_model(config.model, show_progress)
        model_config = load_config(model_dir)
        dtype = DTYPES[config.dtype]
        num_stages = get_profile(config.simulate).num_stages if config.simulate else config.num_stages
        plans = config.stage_plans or even_plans(model_config.num_hidden_layers, num_stages)
        transport = _make_transport(config, model_dir, plans, dtype, layer_delay, show_progress)
        try:
            draft = load_draft(config.draft, model_dir, dtype=dtype, show_progress=show_progress)
            max_context = model_config.max_position_embeddings
            if isinstance(transport, SimulatedTransport):
                coordinator = Coordinator(transport, CostedDraft(draft, transport), config.speculation, max_context,
                                          clock=transport.clock, own_thread=False)
                transport.drive(coordinator)
            else:
                coordinator = Coordinator(transport, draft, config.speculation, max_context)
        except BaseException:
            transport.close()  # stages, and the private Ray they run on
            raise
        log.info("engine ready: %s, %d %s stage(s) %s, draft %s, mode %s", model_dir, len(plans), config.transport,
                 [(p.layer_start, p.layer_end) for p in plans], config.draft, config.speculation.mode.value)
        return cls(config, model_dir, coordinator)

    @property
    def stages(self) -> list[Stage]:
        """The Stage objects, for the local transport (in this process)."""
        return getattr(self.coordinator.transport, "stages", [])

    def generate(self, request: GenerationRequest) -> Iterator[TokenEvent | FinishEvent]:
        """Blocking stream of events; closing the iterator early aborts the request."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        seq_id = self.coordinator.submit(request, events.put)
        finished = False
        try:
            while not finished:
                event = events.get()
                finished = isinstance(event, FinishEvent)
                yield event
        finally:
            if not finished:
                self.coordinator.abort(seq_id)

    def stream(self, request: GenerationRequest) -> EventStream:
        """The same stream for asyncio (call from a running loop)."""
        return EventStream(self.coordinator, request, asyncio.get_running_loop())

    @property
    def max_context(self) -> int:
        return self.coordinator.max_context

    def is_alive(self) -> bool:
        return self.coordinator.is_alive()

    def fail_all(self, failure: Failure) -> None:
        """End every running request with this failure."""
        self.coordinator.fail_all(failure)

    def stage_stats(self) -> list[dict]:
        return self.coordinator.transport.stage_stats()

    def stage_spans(self) -> list[StageSpan]:
        return self.coordinator.transport.stage_spans()

    def complete(self, request: GenerationRequest) -> GenerationOutput:
        token_ids: list[int] = []
        for event in self.generate(request):
            if isinstance(event, TokenEvent):
                token_ids.extend(event.token_ids)
            elif event.finish_reason == "error":
                raise GenerationError(event.failure)
            else:
                text = self.decode(token_ids) if self.tokenizer is not None else None
                return GenerationOutput(token_ids, text, event.finish_reason, event.stats)
        raise GenerationError(Failure(FailureCode.INTERNAL, "the stream ended without a finish event"))

    def complete_text(self, prompt: str, max_tokens: int, sampling: SamplingParams = SamplingParams(),
                      ignore_eos: bool = False) -> GenerationOutput:
        stop = frozenset() if ignore_eos else self.eos_token_ids
        return self.complete(GenerationRequest(tuple(self.encode(prompt)), max_tokens, sampling, stop))

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise GenerationError(Failure(FailureCode.BAD_REQUEST, f"{self.model_dir} has no tokenizer: give token ids"))
        return self.tokenizer.encode(text, add_special_tokens=False) or [self.tokenizer.bos_token_id]

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        self.coordinator.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventStream:
    """Async iterator over one request's events. abort() stops generation and
    the stream then ends with FinishEvent("abort") carrying the stats;
    aclose() (also on cancellation) aborts if not finished."""

    def __init__(self, coordinator: Coordinator, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self._coordinator = coordinator
        self._events: asyncio.Queue = asyncio.Queue()
        self._seq_id = coordinator.submit(request, lambda e: loop.call_soon_threadsafe(self._events.put_nowait, e))
        self.is_finished = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent | FinishEvent:
        if self.is_finished:
            raise StopAsyncIteration
        event = await self._events.get()
        self.is_finished = isinstance(event, FinishEvent)
        return event

    def abort(self) -> None:
        self._coordinator.abort(self._seq_id)

    async def aclose(self) -> None:
        if not self.is_finished:
            self.abort()


def _make_transport(config: EngineConfig, model_dir: Path, plans: tuple[StagePlan, ...], dtype: torch.dtype,
                    layer_delay: LayerDelay | None, show_progress: bool) -> Transport:
    if config.transport == "ray":
        from pipeline.ray_cluster import RayCluster
        from pipeline.ray_transport import RayTransport

        cluster = RayCluster.connect(config.ray_address)
        try:
            return RayTransport(str(model_dir), list(plans), dtype, config.placement_strategy,
                                config.kv_budget_bytes, cluster=cluster)
        except BaseException:
            cluster.stop()
            raise
    if config.transport == "mpi":
        from pipeline.mpi_transport import MPITransport

        return MPITransport(len(plans))
    stages = []
    for index, plan in enumerate(tqdm(plans, desc="loading stages", unit="stage", disable=not show_progress)):
        model = StageModel.load(model_dir, plan.layer_start, plan.layer_end, with_embed=index == 0,
                                with_head=index == len(plans) - 1, dtype=DTYPES.get(plan.dtype, dtype))
        stages.append(Stage(model, index, config.kv_budget_bytes))
    if config.simulate:
        return SimulatedTransport(stages, get_profile(config.simulate))
    return LocalTransport(stages, layer_delay)


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _eos_token_ids(model_dir: Path, model_config) -> frozenset[int]:
    eos = None
    if (model_dir / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id
    if eos is None:
        eos = model_config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
