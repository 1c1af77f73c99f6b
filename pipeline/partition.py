"""Splitting a model's decoder layers into contiguous stage ranges."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage: its layers [layer_start, layer_end), and what it needs where it runs."""

    layer_start: int
    layer_end: int
    num_cpus: float = 1.0  # logical CPUs reserved for a stage actor
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray node resources, e.g. {"node_a": 1}
    dtype: str | None = None  # None: the engine's dtype


def even_plans(num_layers: int, num_stages: int) -> tuple[StagePlan, ...]:
    """Contiguous ranges whose sizes differ by at most one (earlier stages larger)."""
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    plans, start = [], 0
    for stage in range(num_stages):
        end = start + base + (1 if stage < extra else 0)
        plans.append(StagePlan(start, end))
        start = end
    return tuple(plans)
