"""How an engine is assembled: the model, the draft, the stages and where
they run, the speculation settings. Read by the CLI, the YAML spec and the
benchmark before anything loads, so nothing here imports torch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from compute.options import DTYPE_NAMES, check_device_name, check_quantize
from draft_models.spec import parse_draft
from pipeline.partition import StagePlan
from pipeline.sim_profiles import get_profile
from pipeline.speculation import SpeculationConfig
from pipeline.types import Mode

TRANSPORTS = ("local", "ray", "mpi")


@dataclass(frozen=True, slots=True)
class Defaulted:
    """A setting the user left out: what the defaults chose, and why."""

    setting: str
    value: str
    why: str


# What the defaults choose (choose_defaults), measured with `pipeinfer bench`
# on the 2-core CPU machine this project is built on, default model, 64
# tokens, c=1 (README, "What runs when you pass no flags"). Not measured on a GPU.
DEFAULT_DRAFT = "auto"
WHY_DRAFT = ("speculation where it pays: the n-gram lookup where the text copies itself, the model's shipped head "
             "elsewhere (ngram alone for a model without one); each source judged by its own record, and "
             "speculation turns itself off where guesses fail")
WHY_ONE_STAGE = ("one stage: on one machine a split adds hops and leaves each stage fewer cores (2 local stages "
                 "0.78x one, ar); pass --stages N to split a model over machines")
WHY_SYNC = ("sync: with one stage there is no pipeline to keep full, and a run in flight beside another only "
            "competes for its cores")
WHY_PIPEINFER = "pipeinfer: continuous speculation keeps every stage of the pipeline busy"
WHY_AR = "ar: no draft to speculate with"


def choose_defaults(draft: str | None, num_stages: int | None,
                    mode: Mode | None) -> tuple[str, int, Mode, tuple[Defaulted, ...]]:
    """The draft, stage count and mode, each the user's where given (None
    where not), else what measured best (above); with what was chosen."""
    chosen = []
    if draft is None:
        draft = DEFAULT_DRAFT
        chosen.append(Defaulted("draft", draft, WHY_DRAFT))
    if num_stages is None:
        num_stages = 1
        chosen.append(Defaulted("stages", "1", WHY_ONE_STAGE))
    if mode is None:
        mode, why = ((Mode.AR, WHY_AR) if parse_draft(draft).kind == "none" else
                     (Mode.SYNC, WHY_SYNC) if num_stages == 1 else (Mode.PIPEINFER, WHY_PIPEINFER))
        chosen.append(Defaulted("mode", mode.value, why))
    return draft, num_stages, mode, tuple(chosen)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Every setting explicit (a library caller's, a test's); what a user who
    leaves the draft, stages or mode out gets is choose_defaults' to say."""

    model: str = "default"
    draft: str = "none"
    num_stages: int = 1
    dtype: str = "float32"  # float32 on CPU keeps the split exact and is not slower here
    device: str = "cpu"  # every stage's, unless its plan names one: cpu | cuda[:N]
    # How the stages hold the weights (compute/quant.py); one for every stage:
    # they compute one target. auto: a GGUF's own blocks, a safetensors model dense.
    quantize: str = "auto"
    transport: str = "local"  # local | ray | mpi
    ray_address: str | None = None  # ray transport: None starts a local Ray; "auto" or an address joins one
    kv_budget_bytes: int | None = None  # per stage: new sequences are refused beyond it
    # Cores per stage (its torch threads; on one machine, pinned); None: the
    # stages split this machine's cores. Explicit stage_plans say their own.
    stage_cpus: int | None = None
    draft_cpus: int = 1  # cores of a draft that runs beside the coordinator
    draft_resources: dict[str, float] = field(default_factory=dict)  # ray: node resources for the draft's actor
    draft_stage: int | None = 0  # ray: without draft_resources, the draft's actor goes beside this stage
    stage_plans: tuple[StagePlan, ...] | None = None  # explicit layers/resources per stage; None: even split
    placement_strategy: str = "PACK"  # ray: PACK, or STRICT_SPREAD for one stage per node
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    # A sim_profiles name: the real model computes the tokens in simulated time
    # on the cluster the profile describes (its stage count wins).
    simulate: str | None = None
    defaulted: tuple[Defaulted, ...] = ()  # the settings above the defaults chose (choose_defaults), for /health

    def plans(self, model_dir: Path) -> tuple[StagePlan, ...]:
        """The stages' layer ranges: the explicit ones, or a split balancing
        compute (over the simulated cluster's own stage count); with a head
        draft's directory where the draft is one."""
        from draft_models.factory import concrete_draft, head_path
        from pipeline.cores import default_cores_per_stage
        from pipeline.partition import balanced_plans

        spec = parse_draft(concrete_draft(self.draft, model_dir))
        head = str(head_path(spec, model_dir)) if spec.has_head else None
        if self.stage_plans:
            return tuple(dataclasses.replace(plan, device=plan.device or self.device, quantize=self.quantize,
                                             draft_head=head) for plan in self.stage_plans)
        num_stages = get_profile(self.simulate).num_stages if self.simulate else self.num_stages
        cpus = self.stage_cpus or default_cores_per_stage(num_stages)
        return tuple(dataclasses.replace(plan, num_cpus=cpus, device=self.device, quantize=self.quantize,
                                         draft_head=head) for plan in balanced_plans(model_dir, num_stages))

    @property
    def draft_has_worker(self) -> bool:
        """A draft that computes runs on a worker of its own (thread, actor or rank)."""
        return not parse_draft(self.draft).is_free

    @property
    def draft_plan(self) -> StagePlan:
        """Where a draft that computes runs, as a (layerless) plan: its CPUs and resources."""
        return StagePlan(0, 0, num_cpus=self.draft_cpus, resources=dict(self.draft_resources))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}")
        check_device_name(self.device)
        check_quantize(self.quantize)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {self.transport!r}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.stage_cpus is not None and self.stage_cpus < 1 or self.draft_cpus < 1:
            raise ValueError("stage_cpus and draft_cpus must be >= 1")
        if self.simulate is not None:
            get_profile(self.simulate)  # a clear error for an unknown name
            if self.transport != "local":
                raise ValueError("--simulate runs every stage in this process: it needs --transport local")
