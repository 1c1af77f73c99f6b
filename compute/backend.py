"""What a pipeline stage asks of the code that computes its layers.

pipeline.stage.Stage drives a StageBackend and owns everything around it
(the KV bookkeeping, cancellation, batching, results), so the coordinator
and the transports never see which backend computes. The torch backend is
compute.stage_model.StageModel; another (a vLLM or FlashInfer kernel set,
CUDA graphs) implements the same contract and is chosen in Stage.load.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import torch

from compute.options import DeviceError, check_device_name


def torch_device(name: str) -> torch.device:
    """The device a stage named, checked against this machine (a clear error
    rather than a failure deep inside the first forward)."""
    kind, _, index = check_device_name(name).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r}: this torch sees no CUDA device (torch.cuda.is_available() is "
                              f"False; torch {torch.__version__})")
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


class LayerKV(Protocol):
    """Where a forward pass keeps and finds one run's keys/values, per local layer index."""

    @property
    def context_len(self) -> int:
        """Positions before the new tokens (their keys are already cached)."""
        ...

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' k/v [1, kv_heads, n, head_dim] at their
        positions; return the keys/values of every position up to the last
        new one (context + new), on the backend's device."""
        ...


class StageBackend(Protocol):
    """The compute of one stage: decoder layers [layer_start, layer_end) of
    the target, plus the embeddings on the first stage and the final norm
    and head on the last, in one dtype on one device.

    The contract:
    - Hidden states are [1, n, hidden_size] tensors. forward_batch takes them
      on any device and in any dtype the stage may receive from the previous
      one, and returns them on the host (so that every transport can carry
      them); embed's output is the backend's own.
    - forward_batch computes several runs (any sequences, any lengths) in
      one forward; a run of a sequence comes after the runs before it in its
      chain. Between two layers it asks cancelled() and drops the runs that
      answer True (None in their place); before each layer it calls
      before_layer(local_index) where given.
    - Keys and values live where each run's LayerKV puts them; the backend
      only calls extend() once per layer per run, in layer order.
    - Features for a draft head: columns of a hidden state beyond
      hidden_size are carried through unchanged, and the outputs of the
      `capture` layers (local indices) are appended after them, in order.
    - logits returns float32 logits on the host, for the rows asked.
    - The arithmetic does not depend on the batch: a run's outputs are the
      same computed alone or beside others (the lossless suites check it).
    """

    layer_start: int

    @property
    def layer_end(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def is_first(self) -> bool: ...

    @property
    def is_last(self) -> bool: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def parameter_bytes(self) -> int:
        """Bytes of weights held."""
        ...

    def decode_read_bytes(self) -> int:
        """Bytes of weights a one-token forward reads (the bandwidth floor's
        numerator): an embedding table is a row a token."""
        ...

    def weight_format(self) -> dict:
        """How the weights are held (quantization, formats, bytes a weight)."""
        ...

    def decode_timing(self) -> dict:
        """ms a one-token forward spends in matmuls, attention and the rest (compute/stage_model.TimeSplit)."""
        ...

    def embed(self, token_ids: Sequence[int]) -> torch.Tensor: ...

    def forward_batch(self, hiddens: list[torch.Tensor], kvs: list[LayerKV],
                      cancelled: Callable[[], list[bool]] | None = None,
                      before_layer: Callable[[int], None] | None = None,
                      capture: Collection[int] = ()) -> list[torch.Tensor | None]: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
