"""The engine facade: stages, transport, draft and coordinator assembled (from
a config, or by hand), and generation. Everything above it (CLI, HTTP, the
benchmark) talks only to this."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm
from transformers import AutoTokenizer, GenerationConfig

from compute.model_source import load_config, resolve_model
from compute.types import Failure, FailureCode, GenerationRequest, SamplingParams
from draft_models.factory import concrete_draft
from pipeline.config import EngineConfig
from pipeline.coordinator import STALL_TIMEOUT_S, Coordinator
from pipeline.cores import split_cores
from pipeline.drafter import Drafter
from pipeline.local_transport import LayerDelay, LocalTransport
from pipeline.partition import StagePlan
from pipeline.sim_profiles import get_profile
from pipeline.sim_transport import SimulatedTransport
from pipeline.speculation import SpeculationConfig
from pipeline.stage import Stage
from pipeline.trace import StageSpan
from pipeline.transport import Transport
from pipeline.types import FinishEvent, GenerationError, GenerationStats, TokenEvent

log = logging.getLogger(__name__)

@dataclass(slots=True)
class GenerationOutput:
    token_ids: list[int]
    text: str | None
    finish_reason: str
    stats: GenerationStats


class Engine:
    """Generation over assembled parts: a transport (with its stages), a
    drafter (the draft, where it runs) and the speculation settings.
    Engine.load(config) assembles them from a config; a test or a tool may
    assemble its own."""

    def __init__(self, model_dir: Path, transport: Transport, drafter: Drafter, speculation: SpeculationConfig,
                 *, stall_timeout_s: float = STALL_TIMEOUT_S, tail_drafting: bool = False) -> None:
        """tail_drafting: the last stage runs a draft head and returns its guesses with each result."""
        self.model_dir = Path(model_dir)
        self.config: EngineConfig | None = None  # what Engine.load assembled it from (`auto` made concrete)
        self.model_config = load_config(model_dir)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.eos_token_ids = _eos_token_ids(self.model_dir, self.model_config)
        self.transport = transport
        self.speculation = speculation
        self._coordinator = Coordinator(transport, drafter, speculation, self.model_config.max_position_embeddings,
                                        stall_timeout_s, tail_drafting)

    @classmethod
    def load(cls, config: EngineConfig, *, layer_delay: LayerDelay | None = None, show_progress: bool = True,
             stall_timeout_s: float = STALL_TIMEOUT_S) -> Engine:
        model_dir = resolve_model(config.model, show_progress)
        config = dataclasses.replace(config, draft=concrete_draft(config.draft, model_dir))  # what `auto` means here
        plans = config.plans(model_dir)
        transport = _make_transport(config, model_dir, plans, layer_delay, show_progress)
        try:
            engine = cls(model_dir, transport, transport.drafter(config.draft, model_dir, config.dtype),
                         config.speculation, stall_timeout_s=stall_timeout_s,
                         tail_drafting=plans[-1].draft_head is not None)
        except BaseException:
            transport.close()  # stages, and the private Ray they run on
            raise
        engine.config = config
        stats = engine.stage_stats()  # (MPI ranks report theirs with their first heartbeat: maybe none yet)
        weights = plans[0].quantize
        if stats:
            held = stats[0]["weight_format"]
            weights = f"{held['quantize']}: {', '.join(held['formats'])}, {held['bytes_per_weight']:.2f} bytes a weight"
        log.info("engine ready: %s, %d %s stage(s) %s, weights %s, draft %s (%s), mode %s", model_dir, len(plans),
                 config.transport, [(p.layer_start, p.layer_end) for p in plans], weights, config.draft,
                 engine.draft_where()["runs_on"], config.speculation.mode.value)
        for chosen in config.defaulted:
            log.info("by default, %s %s: %s", chosen.setting, chosen.value, chosen.why)
        return engine

    def configuration(self) -> dict:
        """What runs and what the defaults chose, for /health."""
        config = self.config
        if config is None:
            return {}
        return {"draft": config.draft, "stages": self.transport.num_stages, "mode": config.speculation.mode.value,
                "transport": config.transport,
                "defaults": [dataclasses.asdict(chosen) for chosen in config.defaulted]}

    @property
    def stages(self) -> list[Stage]:
        """The Stage objects, where they live in this process (local and simulated transports)."""
        return getattr(self.transport, "stages", [])

    @property
    def max_context(self) -> int:
        return self._coordinator.max_context

    @property
    def clock(self) -> Callable[[], float]:
        """The coordinator's clock: simulated seconds on a simulated cluster."""
        return self.transport.clock

    def generate(self, request: GenerationRequest) -> EventStream:
        """The request's events, to iterate from this thread; closing early aborts it."""
        return EventStream(self._coordinator, request)

    def stream(self, request: GenerationRequest) -> EventStream:
        """The same, for asyncio (call from a running loop)."""
        return EventStream(self._coordinator, request, asyncio.get_running_loop())

    def set_speculation(self, speculation: SpeculationConfig) -> None:
        """Running requests follow the new settings from their next launch (every mode is lossless)."""
        self.speculation = speculation
        self._coordinator.set_speculation(speculation)

    def is_alive(self) -> bool:
        return self._coordinator.is_alive()

    def fail_all(self, failure: Failure) -> None:
        """End every running request with this failure."""
        self._coordinator.fail_all(failure)

    def stage_stats(self) -> list[dict]:
        return self.transport.stage_stats()

    def draft_where(self) -> dict:
        """Where the draft runs ({"runs_on": ...}), for /health."""
        return self._coordinator.drafter.where()

    def stage_spans(self) -> list[StageSpan]:
        return self.transport.stage_spans()

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

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation, through the model's chat template, ready for the assistant's turn."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise GenerationError(Failure(FailureCode.BAD_REQUEST, f"{self.model_dir} has no chat template",
                                          param="messages"))
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def close(self) -> None:
        self._coordinator.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EventStream:
    """One request's events: TokenEvents, then one FinishEvent. Iterate it
    from a thread, or, made with the running loop, from asyncio. abort()
    stops generation (the stream then ends with FinishEvent("abort") and the
    stats); close()/aclose() abort it if it has not finished."""

    def __init__(self, coordinator: Coordinator, request: GenerationRequest,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._coordinator = coordinator
        if loop is None:
            self._events: queue.SimpleQueue | asyncio.Queue = queue.SimpleQueue()
            sink = self._events.put
        else:
            self._events = asyncio.Queue()
            sink = lambda event: loop.call_soon_threadsafe(self._events.put_nowait, event)  # noqa: E731
        self.is_finished = True  # until submitted: nothing to abort
        self._seq_id = coordinator.submit(request, sink)
        self.is_finished = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> TokenEvent | FinishEvent:
        if self.is_finished:
            raise StopIteration
        return self._took(self._events.get())

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent | FinishEvent:
        if self.is_finished:
            raise StopAsyncIteration
        return self._took(await self._events.get())

    def _took(self, event: TokenEvent | FinishEvent) -> TokenEvent | FinishEvent:
        self.is_finished = isinstance(event, FinishEvent)
        return event

    def abort(self) -> None:
        self._coordinator.abort(self._seq_id)

    def close(self) -> None:
        if not self.is_finished:
            self.abort()

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:  # an abandoned stream, as a dropped generator would, stops its request
        self.close()


def _make_transport(config: EngineConfig, model_dir: Path, plans: tuple[StagePlan, ...],
                    layer_delay: LayerDelay | None, show_progress: bool) -> Transport:
    if config.transport == "ray":
        from pipeline.ray_cluster import RayCluster
        from pipeline.ray_transport import RayTransport

        cluster = RayCluster.connect(config.ray_address)
        try:
            draft_plan = config.draft_plan if config.draft_has_worker else None
            return RayTransport(str(model_dir), plans, config.dtype, config.placement_strategy,
                                config.kv_budget_bytes, cluster=cluster, draft_plan=draft_plan,
                                draft_stage=config.draft_stage)
        except BaseException:
            cluster.stop()
            raise
    if config.transport == "mpi":
        from pipeline.mpi_transport import MPITransport

        return MPITransport(plans, has_draft_rank=config.draft_has_worker)
    stages = [Stage.load(model_dir, plans, index, config.dtype, config.kv_budget_bytes)
              for index in tqdm(range(len(plans)), desc="loading stages", unit="stage", disable=not show_progress)]
    if config.simulate:
        return SimulatedTransport(stages, get_profile(config.simulate))
    return LocalTransport(stages, layer_delay, split_cores([int(p.num_cpus) for p in plans] + [config.draft_cpus]))


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
