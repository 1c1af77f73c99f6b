"""KV of one sequence on one line of positions, for a model that runs whole
(a draft): rollback is a truncation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MIN_CAPACITY = 16  # positions of a new buffer; buffers grow by doubling


def with_room(buffer: torch.Tensor | None, needed: int, like: torch.Tensor) -> torch.Tensor:
    """`buffer` [1, h, capacity, d], or a larger one holding its contents,
    with room for `needed` positions along dim 2 (shaped and typed like `like`)."""
    if buffer is not None and buffer.shape[2] >= needed:
        return buffer
    capacity = max(needed, MIN_CAPACITY, 2 * (0 if buffer is None else buffer.shape[2]))
    grown = like.new_empty((*like.shape[:2], capacity, like.shape[3]))
    if buffer is not None:
        grown[:, :, :buffer.shape[2]] = buffer
    return grown


def append_at(buffer: torch.Tensor | None, length: int, new: torch.Tensor) -> torch.Tensor:
    """Write new [1, h, n, d] at [length, length+n) along dim 2, growing by doubling."""
    buffer = with_room(buffer, length + new.shape[2], new)
    buffer.narrow(2, length, new.shape[2]).copy_(new)  # (narrow: a third of indexing's cost, once a layer a token)
    return buffer


@dataclass(slots=True)
class DraftKV:
    """A draft model's own cache for one sequence: one line, rollback = truncate."""

    num_layers: int
    length: int = 0
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers

    @property
    def context_len(self) -> int:
        return self.length

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer] = append_at(self.keys[layer], self.length, k)
        self.values[layer] = append_at(self.values[layer], self.length, v)
        end = self.length + k.shape[2]
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
