"""Weight-only quantized linear layers, one module per format (gpt-fast's
quantize.py is the model): the weight is packed once at load, and forward is
one call of a stock PyTorch CPU op with bfloat16 activations around it.

- Int4Linear: 4-bit codes in groups along K, each group with a scale and a
  zero, w = (q - 8) * scale + zero (torch's `_weight_int4pack_mm_for_cpu`).
  A GGUF's Q4_0, Q4_1 and Q4_K blocks are this form exactly (compute/gguf.py);
  scales and zeros are held in bfloat16 (the op's), which rounds them.
- Int8Linear: int8 codes, one scale per output row, w = q * scale
  (`_weight_int8pack_mm`); its rows double as an embedding table.

Neither op splits a reduction by the number of rows (measured: the rows of an
M-row product are bit-identical to the same rows alone, M = 1..16, any thread
count): a position's output does not depend on what it is computed beside,
which is what makes speculation lossless by construction. With float32 or
float16 activations both ops fall to a scalar loop (10x slower), hence bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from compute.options import QuantizeError

INT4_GROUP = 32  # GGUF's block size; the op also takes 64, 128, 256
class Int4Linear(nn.Module):
    """y = x @ W^T with W [N, K] in 4-bit groups of `group_size` along K."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int = INT4_GROUP, source: str = "int4") -> None:
        """codes [N, K] integers in 0..15, scales and zeros [N, K / group_size]:
        w[n, k] = (codes[n, k] - 8) * scales[n, k // g] + zeros[n, k // g]."""
        super().__init__()
        out_features, in_features = codes.shape
        if out_features % 16 or in_features % group_size:
            raise QuantizeError(f"int4 needs N a multiple of 16 and K of {group_size}: got [{out_features}, "
                                f"{in_features}]")
        self.in_features, self.out_features, self.group_size, self.source = in_features, out_features, group_size, source
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        # [K / g, N, 2]: the op's layout
        self.scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.weight_bytes = self.packed.numel() + self.scales_zeros.numel() * 2
        self.bias: torch.Tensor | None = None  # [N], added to the bfloat16 output

    input_dtype = torch.bfloat16  # the op's (with float32 it falls to a scalar loop)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = INT4_GROUP) -> Int4Linear:
        """Round to nearest, asymmetric per group: 16 levels from the group's min to its max."""
        n, k = weight.shape
        groups = weight.float().reshape(n, k // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scales = ((high - low) / 15).clamp_min(1e-10)
        codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).reshape(n, k)
        return cls(codes, scales, low + 8 * scales, group_size)

    @property
    def format(self) -> str:
        return f"int4 g{self.group_size} ({self.source})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in bfloat16 (float32 with a bias)."""
        return _rows_through(x, self.out_features, lambda rows: _biased(torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed, self.group_size, self.scales_zeros), self.bias))


class Int8Linear(nn.Module):
    """y = x @ W^T with W [N, K] = codes * scale per row."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, source: str = "int8") -> None:
        """codes [N, K] int8, scales [N]."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.source = source
        self.codes = codes.to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16).contiguous()
        self.weight_bytes = self.codes.numel() + self.scales.numel() * 2
        self.bias: torch.Tensor | None = None  # [N], added to the bfloat16 output

    input_dtype = torch.bfloat16

    @classmethod
    def quantize(cls, weight: torch.Tensor, source: str = "int8") -> Int8Linear:
        """Round to nearest, symmetric per row: 127 is the row's largest magnitude."""
        weight = weight.float()
        scales = (weight.abs().amax(-1) / 127).clamp_min(1e-10)
        return cls((weight / scales[:, None]).round().clamp(-127, 127), scales, source)

    @property
    def format(self) -> str:
        return f"int8 per-row ({self.source})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in bfloat16 (float32 with a bias)."""
        return _rows_through(x, self.out_features, lambda rows: _biased(
            torch._weight_int8pack_mm(rows, self.codes, self.scales), self.bias))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The weight's rows `ids` [n] -> [n, K] float32 (as an embedding table)."""
        return self.codes[ids].float() * self.scales[ids].float()[:, None]


def _rows_through(x: torch.Tensor, out_features: int, op) -> torch.Tensor:
    """op over x [..., K] as rows [M, K] in bfloat16 -> [..., out_features]
    (a 2-D bfloat16 x, a stage's packed rows, goes through with no op more)."""
    if x.dim() == 2 and x.dtype == torch.bfloat16:
        return op(x)
    return op(x.reshape(-1, x.shape[-1]).to(torch.bfloat16)).view(*x.shape[:-1], out_features)


def _biased(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out.float() + bias


class Int8Embedding(nn.Module):
    """An embedding table looked up from an Int8Linear's rows (the head's, when
    the model ties them: one copy of the weight serves both)."""

    def __init__(self, table: Int8Linear) -> None:
        super().__init__()
        self.table = table

    @property
    def weight_bytes(self) -> int:
        return self.table.weight_bytes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, n] -> [1, n, K] float32."""
        return self.table.rows(ids.reshape(-1)).unsqueeze(0)


class Concat(nn.Module):
    """Linear layers over the same input, outputs joined along the last dim
    (a fused q/k/v or gate/up whose parts are not of one format)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    input_dtype = torch.bfloat16  # (its parts are quantized)

    @property
    def weight_bytes(self) -> int:
        return sum(part.weight_bytes for part in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


QUANTIZED = (Int4Linear, Int8Linear)
