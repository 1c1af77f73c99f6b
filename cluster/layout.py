"""From a cluster spec to a stage layout: which layers each stage runs, what
it costs, where it must go, and whether it fits.

The automatic split balances compute per token: every decoder layer costs
its parameter bytes; the last stage also runs the final norm and the head
(for a small-vocabulary model the head alone is several layers' worth); the
stage whose node runs the draft also pays the draft's parameter bytes. Memory
per stage is its parameter bytes (the first stage also holds the embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cluster.spec import ClusterSpec, SpecError
from compute.model_source import gguf_source, resolve_model
from compute.stage_model import DTYPES
from draft_models import parse_draft
from draft_models.factory import concrete_draft, draft_model_dir, head_path
from pipeline.cores import default_cores_per_stage
from pipeline.partition import ModelCosts, StagePlan, balanced_ranges, model_costs

GB = 1024**3
MB = 1024**2


@dataclass(frozen=True, slots=True)
class StageLayout:
    plan: StagePlan
    compute_params: int  # parameters touched per token
    memory_bytes: int
    memory_limit_bytes: int | None


def plan_layout(spec: ClusterSpec, show_progress: bool = False) -> list[StageLayout]:
    model_dir = resolve_model(spec.model, show_progress)
    costs = model_costs(model_dir)
    stages = spec.stage_list()
    extra = {}
    draft_params = _draft_params(spec.chosen()[0], costs, model_dir)
    if spec.draft_stage is not None:
        extra[spec.draft_stage] = draft_params
    if stages[0].layers is not None:
        ranges = [s.layers for s in stages]
        _check_contiguous(ranges, len(costs.layer_params))
    else:
        ranges = balanced_ranges(costs, len(stages), extra)
    # One machine (a private Ray, or local threads): its cores split between the stages.
    cpus = default_cores_per_stage(len(stages)) if spec.transport == "local" or spec.ray.address is None else 1
    layouts = []
    for index, (stage, (start, end)) in enumerate(zip(stages, ranges)):
        dtype = stage.dtype or spec.dtype
        is_first, is_last = index == 0, index == len(stages) - 1
        params = sum(costs.layer_params[start:end])
        params += costs.embed_params if is_first else 0
        if is_last:  # a single stage holds a tied matrix once
            params += costs.head_params - (costs.embed_params if is_first and costs.is_tied else 0)
        memory = int(params * bytes_per_weight(model_dir, spec.quantize, dtype))
        compute = sum(costs.layer_params[start:end]) + (costs.head_params if is_last else 0) + extra.get(index, 0)
        limit = int(stage.memory_gb * GB) if stage.memory_gb else None
        plan = StagePlan(start, end, num_cpus=stage.num_cpus or cpus, resources=dict(stage.resources), dtype=dtype,
                         device=stage.device or spec.device)
        layouts.append(StageLayout(plan, compute, memory, limit))
    too_big = [(i, l) for i, l in enumerate(layouts) if l.memory_limit_bytes and l.memory_bytes > l.memory_limit_bytes]
    if too_big:
        raise SpecError("; ".join(
            f"stage {i} (layers {l.plan.layer_start}-{l.plan.layer_end}) needs {l.memory_bytes / MB:.0f} MB of weights "
            f"but declares memory_gb {l.memory_limit_bytes / GB:g} ({l.memory_limit_bytes / MB:.0f} MB): "
            f"{(l.memory_bytes - l.memory_limit_bytes) / MB:.0f} MB too much"
            for i, l in too_big))
    return layouts


def bytes_per_weight(model_dir: Path, quantize: str, dtype: str) -> float:
    """What a stage holds a weight in, for the memory estimate: a GGUF's own
    average, int4's 4 bits and a bf16 scale and zero per 32, int8's byte."""
    source = gguf_source(model_dir)
    if quantize in ("auto", "gguf") and source is not None:
        costs = model_costs(model_dir)
        return source.stat().st_size / (sum(costs.layer_params) + costs.embed_params + costs.head_params
                                        - (costs.embed_params if costs.is_tied else 0))
    return {"int4": 0.625, "int8": 1.0}.get(quantize, DTYPES[dtype].itemsize)


def _draft_params(text: str, costs: ModelCosts, model_dir: Path) -> int:
    """Compute per token the draft adds to the stage whose node runs it."""
    spec = parse_draft(concrete_draft(text, model_dir))
    if spec.has_head:  # it computes on the last stage; checked here, before anything starts
        head_path(spec, model_dir)
    if spec.is_free or spec.kind == "synthetic":  # synthetic's cost is modelled by --simulate
        return 0
    if spec.kind == "layers":
        spec.check_layers(len(costs.layer_params))
        return sum(costs.layer_params[: spec.num_layers]) + costs.head_params
    if spec.kind == "int8":
        return (sum(costs.layer_params) + costs.head_params) // 4  # int8 weights: a quarter of float32 bytes
    draft_costs = model_costs(draft_model_dir(spec, model_dir))  # a model, run here or by vLLM
    return sum(draft_costs.layer_params) + draft_costs.head_params


def _check_contiguous(ranges: list[tuple[int, int]], num_layers: int) -> None:
    expected = 0
    for index, (start, end) in enumerate(ranges):
        if start != expected:
            raise SpecError(f"stages[{index}].layers starts at {start}, but the previous stage ends at {expected}")
        expected = end
    if expected != num_layers:
        raise SpecError(f"stages cover layers 0-{expected}, but the model has {num_layers}")


def format_layout(layouts: list[StageLayout]) -> str:
    rows = [("stage", "layers", "device", "dtype", "cpus", "weights", "limit", "compute share", "resources")]
    total = sum(l.compute_params for l in layouts)
    for i, l in enumerate(layouts):
        rows.append((str(i), f"{l.plan.layer_start}-{l.plan.layer_end}", l.plan.device or "", l.plan.dtype or "",
                     f"{l.plan.num_cpus:g}",
                     f"{l.memory_bytes / 1e6:.0f} MB",
                     f"{l.memory_limit_bytes / 1e6:.0f} MB" if l.memory_limit_bytes else "-",
                     f"{100 * l.compute_params / total:.0f}%",
                     ",".join(f"{k}={v:g}" for k, v in (l.plan.resources or {}).items()) or "-"))
    return format_table(rows)


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
