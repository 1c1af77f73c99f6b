"""A GGUF's weight matrices as the stage computes with them, read straight
from the file's quantized blocks (memory-mapped; no float32 copy of a
matrix that stays 4-bit).

One row per GGML type says what it becomes (llama.cpp's type traits are the
model: adding a format touches one place):
- Q4_0, Q4_1 and Q4_K are 4-bit codes with a scale and an offset per 32
  weights: exactly Int4Linear's form, with the scales and zeros rounded to
  bfloat16 (Q4_1's d*q + m is scale d, zero m + 8d).
- Every other type (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K, F16, BF16, F32) is
  dequantized by the gguf package and requantized to int8 per row
  (Int8Linear): torch's CPU ops have no 5-, 6- or group-wise 8-bit kernel,
  so these round (an int8 step of the row's largest weight / 127).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compute.quant import INT4_GROUP, Int4Linear, Int8Linear

# A matrix decoded from its blocks: 4-bit codes, scales, zeros [N, K / 32]
# (rows in the Hugging Face order), or dense float32 weights to requantize.
Int4Parts = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True, slots=True)
class BlockFormat:
    name: str
    decode_int4: Callable[[np.ndarray], Int4Parts] | None  # blocks [N, num_blocks, block_bytes] -> parts


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block -> [N, num_blocks] float32."""
    return blocks[..., start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles, then the high ones (ggml's order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _q4_0(blocks: np.ndarray) -> Int4Parts:
    # 18 bytes: d (f16), 16 bytes of codes; w = d * (q - 8)
    d = _f16(blocks, 0)
    return _nibbles(blocks[..., 2:18]), d, np.zeros_like(d)


def _q4_1(blocks: np.ndarray) -> Int4Parts:
    # 20 bytes: d, m (f16), 16 bytes of codes; w = d * q + m = (q - 8) * d + (m + 8 d)
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return _nibbles(blocks[..., 4:20]), d, m + 8 * d


def _q4_k(blocks: np.ndarray) -> Int4Parts:
    # 144 bytes per 256 weights: d, dmin (f16), 12 bytes of eight 6-bit (scale, min) pairs,
    # 128 bytes of codes; sub-block j: w = d * sc_j * q - dmin * m_j
    n, num_blocks, _ = blocks.shape
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    s = blocks[..., 4:16].astype(np.uint16)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:144].reshape(n, num_blocks, 4, 32)  # 4 chunks of 64 weights
    codes = np.stack([qs & 15, qs >> 4], axis=3)  # [n, nb, chunk, low/high, 32]: sub-block 2c, 2c+1
    scales = d * sc.astype(np.float32)
    return codes.reshape(n, num_blocks * 256), scales.reshape(n, -1), (8 * scales - dmin * mn).reshape(n, -1)


FORMATS = {fmt.name: fmt for fmt in (
    BlockFormat("Q4_0", _q4_0),
    BlockFormat("Q4_1", _q4_1),
    BlockFormat("Q4_K", _q4_k),
)}

# Hugging Face parameter names (within a layer, or the model) -> GGUF tensor names.
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class GGUFWeights:
    """The weight matrices of one GGUF file, by Hugging Face name."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int) -> None:
        from gguf import GGUFReader  # imported here: only a GGUF-backed stage needs it

        self.path = Path(path)
        self.reader = GGUFReader(str(path))
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads

    @cached_property
    def _tensors(self) -> dict:
        return {t.name: t for t in self.reader.tensors}

    @cached_property
    def architecture(self) -> str:
        field = self.reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()

    def gguf_name(self, hf_name: str) -> str:
        """model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight; lm_head -> output (token_embd when tied)."""
        if hf_name == "model.embed_tokens":
            return "token_embd.weight"
        if hf_name == "lm_head":
            return "output.weight" if "output.weight" in self._tensors else "token_embd.weight"
        _, _, index, rest = hf_name.split(".", 3)
        return f"blk.{index}.{_LAYER_NAMES[rest]}.weight"

    def type_name(self, hf_name: str) -> str:
        return self._tensors[self.gguf_name(hf_name)].tensor_type.name

    def decoded(self, hf_name: str, as_int4: bool = True) -> tuple[Int4Parts | np.ndarray, str]:
        """The matrix `hf_name` [N, K] -> (its Int4Parts where its type is
        4-bit and as_int4, else its float32 weights; the GGUF type's name)."""
        from gguf.quants import dequantize

        tensor = self._tensors[self.gguf_name(hf_name)]
        qtype = tensor.tensor_type.name
        rows = np.asarray(tensor.data)  # [N, bytes] for blocks, [N, K] for floats
        fmt = FORMATS.get(qtype)
        if fmt is not None and as_int4:
            from gguf.constants import GGML_QUANT_SIZES

            block_bytes = GGML_QUANT_SIZES[tensor.tensor_type][1]
            parts = fmt.decode_int4(rows.reshape(rows.shape[0], -1, block_bytes))
            parts = tuple(self._hf_rows(hf_name, a.reshape(rows.shape[0], -1)) for a in parts)
            return parts, qtype
        return self._hf_rows(hf_name, dequantize(rows, tensor.tensor_type).astype(np.float32)), qtype

    def _hf_rows(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """llama.cpp's converter permutes the rows of a Llama's q and k projections
        (its rotary pairs halves, not neighbours): undo it, as transformers does."""
        if self.architecture != "llama" or not hf_name.endswith(("q_proj", "k_proj")):
            return rows
        heads = self.num_heads if hf_name.endswith("q_proj") else self.num_kv_heads
        return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def linear(self, hf_names: list[str], force_int8: bool = False) -> nn.Module:
        """The matrices hf_names fused along N into one module where their
        formats allow (q/k/v, gate/up); force_int8: an int8 one (a tied head,
        whose rows are the embedding too)."""
        decoded = [self.decoded(name, as_int4=not force_int8) for name in hf_names]
        if all(isinstance(parts, tuple) for parts, _ in decoded):
            codes, scales, zeros = (np.concatenate(arrays) for arrays in zip(*(parts for parts, _ in decoded)))
            return Int4Linear(torch.from_numpy(codes.astype(np.int32)), torch.from_numpy(scales),
                              torch.from_numpy(zeros), INT4_GROUP, _source(decoded))
        if not any(isinstance(parts, tuple) for parts, _ in decoded):
            weight = torch.from_numpy(np.concatenate([parts for parts, _ in decoded]))
            return Int8Linear.quantize(weight, f"{_source(decoded)} requantized")
        from compute.quant import Concat  # mixed formats (a K-quant mix): one module each

        return Concat([self.linear([name], force_int8) for name in hf_names])


def _source(decoded) -> str:
    return "+".join(sorted({qtype for _, qtype in decoded}))
