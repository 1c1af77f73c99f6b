"""The cluster spec: one YAML file describes a deployment (pydantic-validated).

Unknown keys are refused; every error names the field and its line. The
defaults make a two-line file work:

    model: default
    stages: 2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from compute.options import DEVICE_HELP, DTYPE_NAMES, QUANTIZE_CHOICES, QUANTIZE_HELP, check_device_name
from draft_models import DRAFT_HELP, parse_draft
from pipeline.config import DEFAULT_DRAFT, Defaulted, EngineConfig, choose_defaults
from pipeline.speculation import SpeculationConfig
from pipeline.types import Mode
from server.settings import DEFAULT_HOST, DEFAULT_PORT, ServerSettings

DEFAULT_NAME = "pipeinfer"  # a deployment's name when its spec gives none (up, status, down)


class SpecError(ValueError):
    """A cluster spec that cannot be used; the message names field and line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_SPECULATION = SpeculationConfig()  # the defaults live there
_ENGINE = EngineConfig()
DType = Literal[DTYPE_NAMES]


class SpeculationSpec(_Strict):
    mode: Mode | None = Field(None, description=(
        "ar, sync or pipeinfer; absent: sync on one stage, pipeinfer on several, ar without a draft."))
    draft_len: int = Field(_SPECULATION.draft_len, ge=1, description="Most draft tokens per run.")
    max_runs_in_flight: int | None = Field(_SPECULATION.max_runs_in_flight, ge=1, description=(
        "Most runs in flight per request (pipeinfer); absent: one per stage plus one."))
    min_accept_prob: float | None = Field(_SPECULATION.min_accept_prob, ge=0, le=1, description=(
        "pipeinfer launches a guess while the measured chance that it and every guess before it are accepted "
        "stays at least this; absent: 1 / the model's layers, times the requests running."))
    prefill_chunk: int = Field(_SPECULATION.prefill_chunk, ge=1, description=(
        "A longer prompt goes through the stages in chunks of this many tokens, sharing each forward with the "
        "other requests (smaller: less wait for them, a slower long prompt)."))

    def to_config(self, mode: Mode) -> SpeculationConfig:
        return SpeculationConfig(**{**self.model_dump(), "mode": mode})


class StageSpec(_Strict):
    layers: tuple[int, int] | None = Field(None, description="[start, end) decoder layers; omit to split automatically.")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="Ray node resources this stage needs, e.g. {node_a: 1}.")
    num_cpus: float | None = Field(None, gt=0, description=(
        "Cores of the stage: its torch threads, reserved for its actor. Default: on a private Ray (one "
        "machine) its cores split between the stages, each pinned to its own; joining a cluster, 1."))
    memory_gb: float | None = Field(None, gt=0, description="Memory the stage may use; the split must fit it.")
    dtype: DType | None = Field(None, description="Overrides the top-level dtype.")
    device: str | None = Field(None, description=f"Where the stage computes: {DEVICE_HELP}; overrides the top-level "
                                                 "device. A GPU stage's Ray actor asks for one GPU.")

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        return value if value is None else check_device_name(value)

    @field_validator("layers")
    @classmethod
    def _ordered(cls, value):
        if value is not None and not 0 <= value[0] < value[1]:
            raise ValueError(f"layers must be [start, end) with 0 <= start < end, got {list(value)}")
        return value


class RaySpec(_Strict):
    address: str | None = Field(None, description="'auto', HOST:PORT, or absent to start a private local Ray.")
    placement: Literal["pack", "spread"] = Field("pack", description="spread = STRICT_SPREAD: one stage per node.")


_LIMITS = ServerSettings(served_model_name="")  # the gateway's defaults live there


class GatewaySpec(_Strict):
    host: str = Field(DEFAULT_HOST, description="Bind address.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    served_model_name: str | None = Field(None, description="Name clients send; default from the model.")
    api_key_envs: list[str] = Field(default_factory=list,
                                    description="Environment variables holding accepted API keys.")
    max_running: int = Field(_LIMITS.max_running_requests, ge=1, description="Requests generating at once.")
    max_waiting: int = Field(_LIMITS.max_waiting_requests, ge=0, description="Requests queued beyond that before 429.")
    max_body_bytes: int = Field(_LIMITS.max_body_bytes, ge=1024, description="Larger request bodies get 413.")
    max_header_bytes: int = Field(_LIMITS.max_header_bytes, ge=1024,
                                  description="A larger request head (request line + headers) gets 431.")
    max_headers: int = Field(_LIMITS.max_headers, ge=8, description="More request headers get 431.")
    shutdown_grace_s: float = Field(_LIMITS.shutdown_grace_s, ge=0, description=(
        "After SIGTERM (pipeinfer down), running requests may finish for this long, then end with an error."))


class ClusterSpec(_Strict):
    name: str = Field(DEFAULT_NAME, pattern=r"^[A-Za-z0-9_.-]+$", description="Names this deployment (for down/status).")
    model: str = Field(_ENGINE.model, description="'default', a Hugging Face directory, or a .gguf file.")
    draft: str | None = Field(None, description=f"The draft; absent: {DEFAULT_DRAFT}. {DRAFT_HELP}.")
    dtype: DType = Field(_ENGINE.dtype, description="Default compute dtype (bfloat16 or float16 on a GPU).")
    device: str = Field(_ENGINE.device, description=f"Default device of the stages: {DEVICE_HELP}.")
    quantize: Literal[QUANTIZE_CHOICES] = Field(_ENGINE.quantize, description=(
        f"How every stage holds the weights: {QUANTIZE_HELP.removeprefix('weights as the stages hold them: ')}."))
    speculation: SpeculationSpec = Field(default_factory=SpeculationSpec)
    stages: int | list[StageSpec] | None = Field(None, description=(
        "A count (split automatically) or one entry per stage; absent: 1."))
    stage_memory_gb: float | None = Field(None, gt=0, description="With a stage count: memory each stage may use.")
    draft_stage: int | None = Field(_ENGINE.draft_stage, ge=0, description=(
        "The stage whose node also runs the draft: it takes fewer layers, and the draft's actor goes beside it "
        "when that node has draft_cpus free (else on any node that has)."))
    draft_cpus: int = Field(_ENGINE.draft_cpus, ge=1, description=(
        "Cores of a draft that computes: it runs in a Ray actor (a bundle) of its own."))
    draft_resources: dict[str, float] = Field(default_factory=dict, description=(
        "Ray node resources the draft's actor needs, e.g. {draft_node: 1}: a node of its own, as PipeInfer "
        "runs it (a bundle of its own). Default: none, beside draft_stage."))
    transport: Literal["local", "ray"] = Field("ray", description="Where stages run.")
    ray: RaySpec = Field(default_factory=RaySpec)
    kv_budget_bytes: int | None = Field(_ENGINE.kv_budget_bytes, ge=1,
                                        description="Per stage: refuse new requests beyond this KV.")
    gateway: GatewaySpec = Field(default_factory=GatewaySpec)

    @field_validator("stages")
    @classmethod
    def _some_stages(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("stages must be >= 1")
        if isinstance(value, list) and not value:
            raise ValueError("stages must list at least one stage")
        return value

    @field_validator("draft")
    @classmethod
    def _draft_syntax(cls, value):
        if value is not None:
            parse_draft(value)  # a DraftSpecError is a ValueError: reported with the field and line
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value):
        return check_device_name(value)  # a DeviceError is a ValueError too

    @model_validator(mode="after")
    def _consistent(self):
        stages = self.stage_list()
        explicit = [s.layers is not None for s in stages]
        if any(explicit) and not all(explicit):
            raise ValueError("stages: give layers for every stage or for none")
        if self.draft_stage is not None and self.draft_stage >= len(stages):
            raise ValueError(f"draft_stage {self.draft_stage} does not exist ({len(stages)} stages)")
        return self

    def stage_list(self) -> list[StageSpec]:
        if not isinstance(self.stages, list):
            return [StageSpec(memory_gb=self.stage_memory_gb) for _ in range(self.chosen()[1])]
        return list(self.stages)

    def chosen(self) -> tuple[str, int, Mode, tuple[Defaulted, ...]]:
        """The draft, stage count and mode: the spec's, or where it has none,
        the defaults' (pipeline/config.py: choose_defaults), with what they chose."""
        count = len(self.stages) if isinstance(self.stages, list) else self.stages
        return choose_defaults(self.draft, count, self.speculation.mode)


def load_spec(path: str | Path) -> ClusterSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(f"{path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a mapping of fields at the top level")
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_describe(path, exc, root)) from None


def _describe(path: Path, exc: ValidationError, root) -> str:
    lines = []
    for error in exc.errors():
        location = [part for part in error["loc"] if not (isinstance(part, str) and part in ("int", "list[StageSpec]"))]
        field = ".".join(str(p) for p in location) or "(top level)"
        line = _line_of(root, location)
        where = f"line {line}" if line else "top level"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{path}:{where}: {field}: {message}")
    return "\n".join(lines)


def _line_of(node, location: list[Any]) -> int | None:
    """1-based line of the YAML node at `location` (or of its nearest parent)."""
    line = None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


