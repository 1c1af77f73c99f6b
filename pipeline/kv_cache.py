"""Per-stage KV cache, written in place.

Per sequence and layer one buffer indexed by position: a run writes its
positions' keys and values where they belong and attends over the buffer up
to its last position (a view: nothing is concatenated). The committed prefix
is a length; committing a verified run moves it; a cancelled run's positions
are simply overwritten by the next run that covers them. Runs of one
sequence form a chain (each starts where its parent ends) and reach a stage
in that order, so the positions a run attends over were written by its
ancestors, here, before it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compute.line_kv import append_at
from compute.types import FailureCode
from pipeline.types import CommitKV, FreeSequence, KVOp, Run


class KVCacheError(RuntimeError):
    """A run's context is not where it should be (stale or cancelled chain)."""


class KVBudgetExceeded(KVCacheError):
    """A new sequence was refused: the stage's KV budget is used up."""

    failure_code = FailureCode.KV_CACHE_FULL


@dataclass(slots=True)
class RunChunk:
    """Where a live run's positions lie, and how many layers it has written."""

    run_id: int
    parent_run_id: int | None
    start_pos: int
    num_tokens: int
    layers_written: int = 0

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_tokens


class SequenceKV:
    """KV of one sequence on one stage."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.committed_len = 0
        self._keys: list[torch.Tensor | None] = [None] * num_layers  # [1, kv_heads, capacity, d]
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self.chunks: dict[int, RunChunk] = {}

    def begin_run(self, run: Run) -> RunKV:
        ancestors = []
        parent = run.parent_run_id
        while parent is not None and parent in self.chunks:
            ancestors.append(self.chunks[parent])
            parent = self.chunks[parent].parent_run_id
        ancestors.reverse()
        covered = self.committed_len
        for chunk in ancestors:
            if chunk.start_pos != covered:
                raise KVCacheError(f"run {run.run_id}: ancestor {chunk.run_id} starts at {chunk.start_pos}, context ends at {covered}")
            covered = chunk.end_pos
        if covered != run.start_pos:
            raise KVCacheError(f"run {run.run_id} starts at {run.start_pos} but its context ends at {covered}")
        chunk = RunChunk(run.run_id, run.parent_run_id, run.start_pos, len(run.token_ids))
        self.chunks[run.run_id] = chunk
        return RunKV(self, chunk)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [1, kv_heads, n, d] at positions [start, start+n) -> the
        layer's keys and values for positions [0, start+n) (views)."""
        end = start + k.shape[2]
        self._keys[layer] = append_at(self._keys[layer], start, k)
        self._values[layer] = append_at(self._values[layer], start, v)
        return self._keys[layer].narrow(2, 0, end), self._values[layer].narrow(2, 0, end)

    def committed(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.committed_len == 0:
            return None
        n = self.committed_len
        return self._keys[layer][:, :, :n], self._values[layer][:, :, :n]

    def commit(self, run_id: int, num_tokens: int) -> None:
        chunk = self.chunks.pop(run_id, None)
        if chunk is None:
            raise KVCacheError(f"commit of run {run_id}, which this stage does not hold")
        if chunk.start_pos != self.committed_len or not 0 <= num_tokens <= chunk.num_tokens:
            raise KVCacheError(
                f"commit of {num_tokens} tokens of run {run_id} at {chunk.start_pos}, committed length {self.committed_len}"
            )
        if chunk.layers_written < self.num_layers:
            raise KVCacheError(f"commit of run {run_id}, which was not fully computed")
        self.committed_len += num_tokens

    def drop(self, run_id: int) -> None:
        self.chunks.pop(run_id, None)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values) if t is not None)


class RunKV:
    """The LayerKV a stage hands to its layers while computing one run."""

    def __init__(self, seq: SequenceKV, chunk: RunChunk) -> None:
        self._seq = seq
        self._chunk = chunk

    @property
    def context_len(self) -> int:
        return self._chunk.start_pos

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._chunk.layers_written = max(self._chunk.layers_written, layer + 1)
        return self._seq.write(layer, self._chunk.start_pos, k, v)


class StageKVCache:
    """All sequences' KV on one stage.

    Only the stage's compute thread touches the tensors; cancel() may be called
    from any thread and only queues run ids, dropped at the next message.
    """

    def __init__(self, num_layers: int, budget_bytes: int | None = None,
                 beside: Callable[[], int] = lambda: 0) -> None:
        """beside() -> bytes the stage keeps per sequence beside the KV (a
        draft head's lines), counted in the budget too."""
        self.num_layers = num_layers
        self.budget_bytes = budget_bytes
        self._beside = beside
        self.sequences: dict[int, SequenceKV] = {}
        self._run_seq: dict[int, int] = {}
        self._lock = threading.Lock()
        self._to_drop: list[int] = []

    def begin_run(self, run: Run) -> RunKV:
        self.drop_cancelled()
        if run.seq_id not in self.sequences and self.budget_bytes is not None:
            used = self.num_bytes() + self._beside()
            if used >= self.budget_bytes:
                raise KVBudgetExceeded(f"KV cache full: {used} of {self.budget_bytes} bytes in use; "
                                       "new requests are refused until running ones finish")
        seq = self.sequences.setdefault(run.seq_id, SequenceKV(self.num_layers))
        self._run_seq[run.run_id] = run.seq_id
        return seq.begin_run(run)

    def apply(self, op: KVOp) -> None:
        self.drop_cancelled()
        if isinstance(op, CommitKV):
            self.sequences[op.seq_id].commit(op.run_id, op.num_tokens)
            self._run_seq.pop(op.run_id, None)
        elif isinstance(op, FreeSequence):
            seq = self.sequences.pop(op.seq_id, None)
            if seq is not None:
                for run_id in seq.chunks:
                    self._run_seq.pop(run_id, None)
        else:
            raise TypeError(f"unknown KV op {op!r}")

    def cancel(self, run_ids: list[int]) -> None:
        with self._lock:
            self._to_drop.extend(run_ids)

    def drop_cancelled(self) -> None:
        with self._lock:
            run_ids, self._to_drop = self._to_drop, []
        for run_id in run_ids:
            self.drop_run(run_id)

    def drop_run(self, run_id: int) -> None:
        seq_id = self._run_seq.pop(run_id, None)
        if seq_id is not None and seq_id in self.sequences:
            self.sequences[seq_id].drop(run_id)

    def num_bytes(self) -> int:
        return sum(s.num_bytes() for s in self.sequences.values())

    def num_chunks(self) -> int:
        return sum(len(s.chunks) for s in self.sequences.values())
