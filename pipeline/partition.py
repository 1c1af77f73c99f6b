"""Splitting a model's decoder layers into contiguous stage ranges."""

from __future__ import annotations


def even_split(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """[start, end) per stage, sizes differing by at most one (earlier stages larger)."""
    if num_stages < 1:
        raise ValueError(f"need at least one stage, got {num_stages}")
    if num_stages > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges
