"""Splitting a model's decoder layers into contiguous stage ranges, balanced
by compute: each decoder layer costs its parameters, the last stage also
pays for the head (for a small-vocabulary model several layers' worth)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from compute.model_source import load_config


@dataclass(frozen=True, slots=True)
class StagePlan:
    """One stage: its layers [layer_start, layer_end), and what it needs where it runs."""

    layer_start: int
    layer_end: int
    num_cpus: float = 1.0  # logical CPUs reserved for a stage actor
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray node resources, e.g. {"node_a": 1}
    dtype: str | None = None  # None: the engine's dtype
    device: str | None = None  # cpu | cuda[:N]; None: the engine's device
    quantize: str | None = None  # compute/quant.py QUANTIZE_CHOICES; None: the engine's (every stage has one)
    # A draft head's directory (--draft head:...): every stage captures the
    # head's feature layers it holds, and the last stage runs the head.
    draft_head: str | None = None


@dataclass(frozen=True, slots=True)
class ModelCosts:
    layer_params: list[int]  # [num_layers]
    embed_params: int
    head_params: int  # final norm + lm_head (tied or not, the head computes it)
    is_tied: bool  # lm_head is the embedding matrix


def model_costs(model_dir: Path) -> ModelCosts:
    """Parameter counts per layer, read from the checkpoint headers (no weights loaded)."""
    config = load_config(model_dir)
    layer_params = [0] * config.num_hidden_layers
    embed = head = 0
    files = sorted(model_dir.glob("*.safetensors"))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                numel = 1
                for dim in f.get_slice(key).get_shape():
                    numel *= dim
                if key.startswith("model.layers."):
                    layer_params[int(key.split(".")[2])] += numel
                elif key == "model.embed_tokens.weight":
                    embed += numel
                else:  # model.norm.weight, lm_head.weight
                    head += numel
    is_tied = bool(getattr(config, "tie_word_embeddings", False))
    if is_tied:
        head += embed  # the head multiplies by the embedding matrix
    return ModelCosts(layer_params, embed, head, is_tied)


def balanced_ranges(costs: ModelCosts, num_stages: int, extra_cost: dict[int, int]) -> list[tuple[int, int]]:
    """Contiguous ranges minimising the largest stage cost (exact, by dynamic programming)."""
    n = len(costs.layer_params)
    if num_stages > n:
        raise ValueError(f"cannot split {n} layers over {num_stages} stages")
    prefix = [0]
    for p in costs.layer_params:
        prefix.append(prefix[-1] + p)

    def stage_cost(stage: int, start: int, end: int) -> int:
        cost = prefix[end] - prefix[start] + extra_cost.get(stage, 0)
        return cost + (costs.head_params if stage == num_stages - 1 else 0)

    inf = float("inf")
    # best[s][i]: the smallest max cost placing layers [0, i) on stages [0, s)
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], stage_cost(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges, end = [], n
    for s in range(num_stages, 0, -1):
        start = cut[s][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


def balanced_plans(model_dir: Path, num_stages: int) -> tuple[StagePlan, ...]:
    """The default split: contiguous ranges balancing compute per token, the
    last stage also paying for the final norm and the head."""
    return tuple(StagePlan(start, end) for start, end in balanced_ranges(model_costs(model_dir), num_stages, {}))
