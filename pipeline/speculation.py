"""How far and how eagerly to speculate (PipeInfer's adaptive speculation)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.types import Mode


@dataclass(frozen=True, slots=True)
class SpeculationConfig:
    mode: Mode = Mode.PIPEINFER
    draft_len: int = 4  # k: most draft tokens per run (PipeInfer advises < 8)
    max_runs_in_flight: int = 4  # per sequence, pipeinfer mode
    # pipeinfer mode drafts only while the draft's top probability >= cutoff.
    confidence_cutoff: float = 0.4
    cutoff_recovery: float = 0.05  # lowered by this each time the pipeline waits with room to spare
    cutoff_decay: float = 0.1  # raised by this after each rejected speculation

    def __post_init__(self) -> None:
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
        if self.max_runs_in_flight < 1:
            raise ValueError(f"max_runs_in_flight must be >= 1, got {self.max_runs_in_flight}")
        for name in ("confidence_cutoff", "cutoff_recovery", "cutoff_decay"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")


class AdaptiveCutoff:
    """cutoff = base + adjust, clamped to [0, 1]: relaxes while the pipeline
    waits, tightens after rejections, back to base after an acceptance."""

    __slots__ = ("_config", "_adjust")

    def __init__(self, config: SpeculationConfig) -> None:
        self._config = config
        self._adjust = 0.0

    @property
    def value(self) -> float:
        return min(1.0, max(0.0, self._config.confidence_cutoff + self._adjust))

    def on_idle(self) -> None:
        self._adjust = max(self._adjust - self._config.cutoff_recovery, -1.0)

    def on_rejection(self) -> None:
        self._adjust = min(self._adjust + self._config.cutoff_decay, 1.0)

    def on_acceptance(self) -> None:
        self._adjust = 0.0
