"""Compute over a contiguous range of decoder layers of a Llama-family model.

A stage holds ONLY its layers (plus the embeddings on the first stage and the
final norm + head on the last): the modules are built on the meta device and
just the needed tensors are read from safetensors. Attention is written here
around the Hugging Face weights so that we own the KV (rollback is a slice)
and the arithmetic is the same whatever the split.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoModelForCausalLM

from compute.backend import LayerKV
from compute.model_source import check_supported, gguf_source, load_config
from compute.options import DTYPE_NAMES, QuantizeError, check_quantize
from compute.quant import QUANTIZED, Int4Linear, Int8Embedding, Int8Linear

# Compute dtypes by name (compute/options.py's DTYPE_NAMES) as torch's.
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class StageModel(nn.Module):
    """The torch StageBackend (compute/backend.py)."""

    def __init__(
        self,
        config,
        layer_start: int,
        layers: nn.ModuleList,
        embed_tokens: nn.Module | None,
        norm: nn.Module | None,
        lm_head: nn.Module | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_start = layer_start
        self.layers = layers
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.rotary_emb: nn.Module | None = None  # set by load(); never on meta
        self.quantize = "none"  # set by load(): gguf | int4 | int8 | none
        self._dtype = torch.float32  # of the hidden states (the residual stream); set by load()
        self.decode_time = TimeSplit()  # where this stage's one-token forwards spend their time
        self._weight_format: dict | None = None  # weight_format(), counted at its first call
        self._parameter_bytes: int | None = None  # parameter_bytes(), likewise
        self._decoding = False  # the last forward was of one token: the head that follows it is decode time
        self._parts: list[_LayerParts] | None = None  # per layer, what its forward reads (built at the first)

    @property
    def layer_end(self) -> int:
        return self.layer_start + len(self.layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_first(self) -> bool:
        return self.embed_tokens is not None

    @property
    def is_last(self) -> bool:
        return self.lm_head is not None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def parameter_bytes(self) -> int:
        """Bytes of weights held (counted once, as weight_format: a stage's
        stats go out after every KV op, and a count walks every module)."""
        if self._parameter_bytes is None:
            held = sum(m.weight_bytes for m in self.modules() if isinstance(m, (PackedLinear, *QUANTIZED)))
            self._parameter_bytes = held + sum(p.numel() * p.element_size() for p in self.parameters())
        return self._parameter_bytes

    def decode_read_bytes(self) -> int:
        """Weight bytes a one-token forward reads: all it holds but an
        embedding table of its own (a token reads one row of it)."""
        embed = self.embed_tokens
        if embed is None or isinstance(embed, Int8Embedding) and embed.table is self.lm_head:
            return self.parameter_bytes()
        table = embed.weight_bytes if isinstance(embed, Int8Embedding) else embed.weight.numel() * embed.weight.element_size()
        return self.parameter_bytes() - table

    def weight_format(self) -> dict:
        """How this stage holds its weights: the quantization, each format's
        matrix count, and bytes a weight over every weight it holds (counted
        once: the weights do not change after pack_weights)."""
        if self._weight_format is None:
            self._weight_format = self._count_weights()
        return self._weight_format

    def _count_weights(self) -> dict:
        formats: dict[str, int] = {}
        num_weights = 0
        for m in self.modules():
            if isinstance(m, (PackedLinear, nn.Linear, *QUANTIZED)):
                name = f"dense {str(m.weight.dtype).removeprefix('torch.')}" if isinstance(m, nn.Linear) else m.format
                formats[name] = formats.get(name, 0) + 1
                num_weights += m.in_features * m.out_features
        num_weights += sum(p.numel() for p in self.parameters() if not _is_linear_weight(self, p))
        return {"quantize": self.quantize, "formats": formats, "weight_bytes": self.parameter_bytes(),
                "num_weights": num_weights, "bytes_per_weight": round(self.parameter_bytes() / max(num_weights, 1), 4)}

    def decode_timing(self) -> dict:
        return self.decode_time.per_forward_ms()

    def pack_weights(self) -> StageModel:
        """Every linear layer (the head too) with its weight packed once for
        oneDNN's matmul, where this build and dtype have it (CPU, float32 or
        bfloat16). Decoding reads every weight once per token, and packed
        weights stream at the machine's memory bandwidth: measured here,
        the 30 layers of the default model in 10 ms against 27 ms unpacked.
        Not for a model that is quantized afterwards (it looks for nn.Linear)."""
        if can_pack(self.dtype) and self.device.type == "cpu":
            pack_linears(self)
        self._weight_format = self._parameter_bytes = self._parts = None
        return self

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        layer_start: int,
        layer_end: int,
        *,
        with_embed: bool,
        with_head: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quantize: str = "none",
    ) -> StageModel:
        """quantize: how the matrices are held (compute/quant.py): `auto` is
        `gguf` for a model converted from a GGUF, `none` otherwise."""
        model_dir = Path(model_dir)
        quantize = resolve_quantize(model_dir, quantize, torch.device(device))
        config = load_config(model_dir)
        check_supported(config)
        num_layers = config.num_hidden_layers
        if not 0 <= layer_start < layer_end <= num_layers:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) outside the model's {num_layers} layers")
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        inner = skeleton.model
        stage = cls(
            config,
            layer_start,
            nn.ModuleList(inner.layers[layer_start:layer_end]),
            inner.embed_tokens if with_embed else None,
            inner.norm if with_head else None,
            skeleton.lm_head if with_head else None,
        )
        stage.quantize, stage._dtype = quantize, dtype
        key_map = stage._checkpoint_keys(config)
        if quantize != "none":  # the matrices come quantized, below: read only the rest
            key_map = {local: ckpt for local, ckpt in key_map.items() if not _is_matrix(local)}
        tensors = read_safetensors(model_dir, set(key_map.values()))
        state = {local: tensors[ckpt].to(device, dtype) for local, ckpt in key_map.items()}
        stage.load_state_dict(state, strict=quantize == "none", assign=True)
        tied = getattr(config, "tie_word_embeddings", False)
        if with_embed and with_head and tied and quantize == "none":
            stage.lm_head.weight = stage.embed_tokens.weight  # one tensor, as in the checkpoint
        source = _MatrixSource(model_dir, config, quantize)
        for local_index, layer in enumerate(stage.layers):
            source.fuse_layer(layer, f"model.layers.{layer_start + local_index}.")
        if quantize != "none":
            # The embedding is a lookup of int8 rows; a tied head is the same
            # Int8Linear in every split (so every split computes one target).
            head = source.linear(["lm_head"], force_int8=tied) if with_head else None
            if with_embed:
                table = head if tied and head is not None else source.linear(["model.embed_tokens"], force_int8=True)
                stage.embed_tokens = Int8Embedding(table)
            stage.lm_head = head
        stage.rotary_emb = type(inner.rotary_emb)(config=config).to(device)
        stage.eval()
        return stage

    def _checkpoint_keys(self, config) -> dict[str, str]:
        """Map this stage's parameter names to the checkpoint's tensor names."""
        mapping = {}
        for name in self.state_dict(keep_vars=True):
            if name.startswith("layers."):
                _, local_idx, rest = name.split(".", 2)
                mapping[name] = f"model.layers.{self.layer_start + int(local_idx)}.{rest}"
            elif name == "lm_head.weight":
                mapping[name] = "lm_head.weight"
            else:
                mapping[name] = f"model.{name}"
        if "lm_head.weight" in mapping and getattr(config, "tie_word_embeddings", False):
            mapping["lm_head.weight"] = "model.embed_tokens.weight"
        return mapping

    # ---- compute -------------------------------------------------------

    @torch.inference_mode()
    def embed(self, token_ids: list[int] | tuple[int, ...]) -> torch.Tensor:
        """-> hidden [1, n, hidden_size]"""
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        return self.embed_tokens(ids).to(self.dtype)

    @torch.inference_mode()
    def forward_layers(
        self,
        hidden: torch.Tensor,
        kv: LayerKV,
        is_cancelled: Callable[[], bool] = lambda: False,
        before_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor | None:
        """hidden [1, n, H] for positions [kv.context_len, +n) -> hidden [1, n, H].

        Returns None if is_cancelled() turns true between two layers.
        """
        return self.forward_batch([hidden], [kv], lambda: [is_cancelled()], before_layer)[0]

    @torch.inference_mode()
    def forward_batch(
        self,
        hiddens: list[torch.Tensor],
        kvs: list[LayerKV],
        cancelled: Callable[[], list[bool]] | None = None,
        before_layer: Callable[[int], None] | None = None,
        capture: Collection[int] = (),
    ) -> list[torch.Tensor | None]:
        """Several runs (any sequences, any lengths) through the layers in one
        forward: their tokens are packed into one [1, sum n, H] so that every
        weight is read once for all of them; only attention is per run.
        hiddens[i] [1, n_i, H] for positions [kvs[i].context_len, +n_i).
        cancelled() -> per run, whether to stop it (asked between layers; a
        stopped run leaves the pack and gets None). Outputs are on the host.
        Columns beyond H are features a draft head reads (draft_models/head.py):
        carried through, and the outputs of the `capture` layers (local
        indices) appended after them."""
        device, dtype = self.device, self.dtype
        width = self.config.hidden_size
        started = time.perf_counter()
        carried = [h[..., width:].cpu() for h in hiddens]
        hiddens = [h[..., :width].to(device, dtype) for h in hiddens]  # (no copy where they already are)
        clock = _OpClock()
        self._decoding = sum(h.shape[1] for h in hiddens) == 1 and device.type != "cuda"
        if device.type != "cuda":
            outs = self._forward_batch(hiddens, kvs, cancelled, before_layer, capture, clock)
            if self._decoding and any(out is not None for out in outs):
                self.decode_time.add(time.perf_counter() - started, clock)
        else:
            # Not cuDNN's attention: its setup is redone for every new key length,
            # i.e. every token (measured on an H100: 3.2 ms a call, 75% of a step).
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                outs = self._forward_batch(hiddens, kvs, cancelled, before_layer, capture, clock)
        return [None if out is None else _joined(out[0], carried[i], out[1:]) for i, out in enumerate(outs)]

    def _forward_batch(self, hiddens, kvs, cancelled, before_layer, capture,
                       clock: _OpClock) -> list[list[torch.Tensor] | None]:
        segments = _packed([_Segment(i, h.shape[1], kv) for i, (h, kv) in enumerate(zip(hiddens, kvs))])
        hidden = (torch.cat(hiddens, dim=1) if len(hiddens) > 1 else hiddens[0])[0]  # [N, H]: the packed rows
        rope = self._rope(hidden, segments)
        captured: list[list[torch.Tensor]] = [[] for _ in hiddens]
        if self._parts is None:
            self._parts = [_LayerParts.of(layer) for layer in self.layers]
        for idx, layer in enumerate(self._parts):
            if before_layer is not None:
                before_layer(idx)
            flags = cancelled() if cancelled is not None else None
            if flags is not None and any(flags[seg.index] for seg in segments):
                keep = [seg for seg in segments if not flags[seg.index]]
                rows = torch.cat([torch.arange(seg.offset, seg.offset + seg.num_new, device=hidden.device)
                                  for seg in keep]) if keep else torch.empty(0, dtype=torch.long)
                hidden, rope = hidden[rows], _Rope(rope.cos[rows], rope.sin_signed[rows])
                segments = _packed(keep)
                if not segments:
                    break
            hidden = _decoder_layer(layer, idx, hidden, rope, segments, clock)
            if idx in capture:
                for seg in segments:
                    captured[seg.index].append(hidden[None, seg.offset:seg.offset + seg.num_new])
        out: list[list[torch.Tensor] | None] = [None] * len(hiddens)
        for seg in segments:  # a run's output, then what it captured
            out[seg.index] = [hidden[None, seg.offset:seg.offset + seg.num_new], *captured[seg.index]]
        return out

    def _rope(self, hidden: torch.Tensor, segments: list[_Segment]) -> _Rope:
        """The packed rows' rotary tables, each row at its run's position."""
        positions = torch.cat([torch.arange(seg.kv.context_len, seg.kv.context_len + seg.num_new)
                               for seg in segments]).to(hidden.device)
        cos, sin = self.rotary_emb(hidden[None], positions[None])  # [1, N, d]
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, d/2) * (-sin[:d/2], sin[d/2:]): one op for its slices, negation and join
        return _Rope(cos[0, :, None], torch.cat([-sin[0, :, None, :half], sin[0, :, None, half:]], dim=-1))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, n, H] -> logits [n, vocab] (float32, on the host)"""
        started = time.perf_counter()
        clock = _OpClock()
        logits = clock.matmul(self.lm_head, self.norm(hidden.to(self.device, self.dtype)))[0].float().cpu()
        if self._decoding:
            self.decode_time.add(time.perf_counter() - started, clock, forwards=0)  # the forward's own head
            self._decoding = False
        return logits


class _OpClock:
    """Seconds one forward spends in its matmuls and in attention. On the CPU
    an op has finished when it returns, so two clock reads time it (about a
    microsecond a layer); on a GPU the figures are not kept."""

    __slots__ = ("matmul_s", "attention_s")

    def __init__(self) -> None:
        self.matmul_s = self.attention_s = 0.0

    def matmul(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """module(x), x [N, K] -> [N, out]; forward called directly: no hooks
        are ever set on a stage's linears, and __call__'s own overhead is a
        sixth of a small quantized matmul."""
        started = time.perf_counter()
        out = module.forward(x)
        self.matmul_s += time.perf_counter() - started
        return out


@dataclass(slots=True)
class TimeSplit:
    """Where a stage's one-token forwards (decoding) spent their time, summed:
    the matmuls (weight reads), attention, and the rest (norms, RoPE, casts,
    Python), the head included on the last stage."""

    forwards: int = 0
    total_s: float = 0.0
    matmul_s: float = 0.0
    attention_s: float = 0.0

    def add(self, total_s: float, clock: _OpClock, forwards: int = 1) -> None:
        self.forwards += forwards
        self.total_s += total_s
        self.matmul_s += clock.matmul_s
        self.attention_s += clock.attention_s

    def per_forward_ms(self) -> dict:
        """-> ms a one-token forward: matmul, attention, rest, total (and how many were timed)."""
        n = max(self.forwards, 1)
        rest_s = self.total_s - self.matmul_s - self.attention_s
        return {"forwards": self.forwards, "matmul_ms": round(1000 * self.matmul_s / n, 3),
                "attention_ms": round(1000 * self.attention_s / n, 3), "rest_ms": round(1000 * rest_s / n, 3),
                "total_ms": round(1000 * self.total_s / n, 3)}


def resolve_quantize(model_dir: Path, quantize: str, device: torch.device) -> str:
    """auto -> gguf or none; a clear error for what this model or device cannot have."""
    is_gguf = gguf_source(model_dir) is not None
    quantize = check_quantize(quantize)
    if quantize == "auto":
        quantize = "gguf" if is_gguf else "none"
    if quantize == "gguf" and not is_gguf:
        raise QuantizeError(f"--quantize gguf: {model_dir} was not converted from a GGUF file")
    if quantize in ("int4", "int8") and is_gguf:
        raise QuantizeError(f"--quantize {quantize}: a GGUF model keeps its own quantization (gguf, or none for "
                            "its dequantized float copy)")
    if quantize != "none" and device.type != "cpu":
        raise QuantizeError(f"--quantize {quantize}: quantized stages compute on the CPU; on {device} use "
                            "--quantize none")
    return quantize


_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_matrix(local_name: str) -> bool:
    """A weight matrix that a quantized stage holds quantized (a bias or a norm is not)."""
    parts = local_name.split(".")
    return parts[-1] == "weight" and (parts[-2] in _MATRICES or local_name in ("embed_tokens.weight",
                                                                                "lm_head.weight"))


def _is_linear_weight(stage: nn.Module, param: torch.Tensor) -> bool:
    return any(isinstance(m, nn.Linear) and m.weight is param for m in stage.modules())


class _MatrixSource:
    """Where a stage's matrices come from and in what form: the loaded dense
    modules (none), a GGUF's blocks (gguf), or the float checkpoint rounded
    as it is read (int4, int8). Fuses q/k/v and gate/up along N: one weight
    read, one op."""

    def __init__(self, model_dir: Path, config, quantize: str) -> None:
        self.model_dir, self.quantize = model_dir, quantize
        self.tied = getattr(config, "tie_word_embeddings", False)
        self.gguf = None
        if quantize == "gguf":
            from compute.gguf_blocks import GGUFWeights

            self.gguf = GGUFWeights(gguf_source(model_dir), config.num_attention_heads,
                                    config.num_key_value_heads)

    def fuse_layer(self, layer: nn.Module, prefix: str) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = self.linear([prefix + "self_attn." + n for n in ("q_proj", "k_proj", "v_proj")],
                                    (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.o_proj = self.linear([prefix + "self_attn.o_proj"], (attn.o_proj,))
        mlp.gate_up_proj = self.linear([prefix + "mlp." + n for n in ("gate_proj", "up_proj")],
                                       (mlp.gate_proj, mlp.up_proj))
        mlp.down_proj = self.linear([prefix + "mlp.down_proj"], (mlp.down_proj,))
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj

    def linear(self, names: list[str], dense: tuple[nn.Linear, ...] = (), force_int8: bool = False) -> nn.Module:
        """The matrices `names` (checkpoint names without .weight) as one
        module; `dense`: the stage's modules they replace (their biases are loaded)."""
        bias = None if not dense or dense[0].bias is None else torch.cat([d.bias.detach() for d in dense])
        if self.quantize == "none":
            if len(dense) == 1:
                return dense[0]
            weight = torch.cat([d.weight.detach() for d in dense])
            fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                              dtype=weight.dtype)
            fused.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                fused.bias = nn.Parameter(bias, requires_grad=False)
            return fused
        if self.gguf is not None:
            module = self.gguf.linear(names, force_int8)
        else:
            weight = torch.cat([self._float(name) for name in names])
            is_int8 = self.quantize == "int8" or force_int8 or names == ["lm_head"]
            module = Int8Linear.quantize(weight) if is_int8 else Int4Linear.quantize(weight)
        module.bias = bias
        return module

    def _float(self, name: str) -> torch.Tensor:
        key = name + ".weight"
        if name == "lm_head" and self.tied:
            key = "model.embed_tokens.weight"
        return read_safetensors(self.model_dir, [key])[key]


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN packs float32 weights on any x86 CPU; bfloat16 ones only where
    the CPU computes in it (AVX-512 BF16 or AVX-NE-CONVERT: not an AVX2-only one)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_linears(module: nn.Module) -> None:
    """Every nn.Linear inside module (a tied head too) swapped for its PackedLinear, in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is kept only in oneDNN's packed layout
    (the op torch's own CPU compiler uses for frozen linear layers)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_bytes = weight.numel() * weight.element_size()
        self.format = f"dense {str(weight.dtype).removeprefix('torch.')}"
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.input_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _joined(hidden: torch.Tensor, carried: torch.Tensor, captured: list[torch.Tensor]) -> torch.Tensor:
    """A run's output on the host: its hidden states, then the features it carried, then those it captured."""
    if not carried.shape[-1] and not captured:
        return hidden.cpu()
    return torch.cat([hidden.cpu(), carried, *(c.cpu() for c in captured)], dim=-1)


class _Segment:
    """One run's rows in a packed forward."""

    __slots__ = ("index", "num_new", "kv", "offset")

    def __init__(self, index: int, num_new: int, kv: LayerKV) -> None:
        self.index, self.num_new, self.kv = index, num_new, kv
        self.offset = 0


class _Rope(NamedTuple):
    """Rotary tables of the packed rows: cos [N, 1, d] and sin with its first
    half negated [N, 1, d] (broadcast over heads)."""

    cos: torch.Tensor
    sin_signed: torch.Tensor


def _packed(segments: list[_Segment]) -> list[_Segment]:
    """The segments, each given its rows in the pack, in order."""
    offset = 0
    for seg in segments:
        seg.offset = offset
        offset += seg.num_new
    return segments


@dataclass(slots=True)
class _LayerParts:
    """What a decoder layer's forward reads, as plain attributes: an
    nn.Module attribute lookup costs about as much as a small op, and a
    one-token forward does some thirty per layer."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: nn.Module
    o: nn.Module
    gate_up: nn.Module
    down: nn.Module
    qkv_dtype: torch.dtype  # what each linear takes in
    o_dtype: torch.dtype
    gate_up_dtype: torch.dtype
    down_dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    qk_norms: tuple[nn.Module, nn.Module] | None  # Qwen3 normalises q and k per head

    @classmethod
    def of(cls, layer: nn.Module) -> _LayerParts:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   layer.input_layernorm.variance_epsilon, attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                   mlp.down_proj, _input_dtype(attn.qkv_proj), _input_dtype(attn.o_proj),
                   _input_dtype(mlp.gate_up_proj), _input_dtype(mlp.down_proj), attn.config.num_attention_heads,
                   attn.config.num_key_value_heads, attn.head_dim, attn.scaling,
                   (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else None)


def _input_dtype(linear: nn.Module) -> torch.dtype:
    """What a linear layer computes with: a quantized one bfloat16, a dense
    one its weight's dtype (a dynamically quantized one, float32)."""
    dtype = getattr(linear, "input_dtype", None)
    if dtype is None:
        weight = linear.weight
        dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    return dtype


def _decoder_layer(p: _LayerParts, idx, hidden, rope: _Rope, segments: list[_Segment],
                   clock: _OpClock) -> torch.Tensor:
    """One decoder layer over the packed rows hidden [N, H]. Every op
    computes a row the same whatever rows are beside it (batch invariance):
    the matmuls and norms reduce within a row, and attention runs a row at a
    time over exactly the keys its position sees. Few ops: at one token a
    forward, each op's fixed cost (a microsecond or two) is most of a layer."""
    num_new, dtype = hidden.shape[0], hidden.dtype
    num_heads, num_kv_heads, head_dim = p.num_heads, p.num_kv_heads, p.head_dim

    x = F.rms_norm(hidden, hidden.shape[-1:], p.input_norm, p.eps).to(p.qkv_dtype)
    qkv = clock.matmul(p.qkv, x).to(dtype).view(num_new, num_heads + 2 * num_kv_heads, head_dim)
    qk, v = qkv[:, :num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]  # [N, heads, d]
    if p.qk_norms is not None:
        qk = torch.cat([p.qk_norms[0](qk[:, :num_heads]), p.qk_norms[1](qk[:, num_heads:])], dim=1)
    qk = torch.addcmul(qk * rope.cos, qk.roll(head_dim // 2, -1), rope.sin_signed).transpose(0, 1)[None]
    q, k, v = qk[:, :num_heads], qk[:, num_heads:], v.transpose(0, 1)[None]  # [1, heads, N, d]
    started = time.perf_counter()
    if len(segments) == 1 and num_new == 1:  # decoding: the one row over every key
        seg = segments[0]
        k_all, v_all = seg.kv.extend(idx, k, v)
        out = F.scaled_dot_product_attention(q, k_all, v_all, scale=p.scaling, enable_gqa=True)
    else:
        outs = []
        for seg in segments:  # a child run after its parent: its keys are written first
            k_all, v_all = seg.kv.extend(idx, k[:, :, seg.offset:seg.offset + seg.num_new],
                                         v[:, :, seg.offset:seg.offset + seg.num_new])  # [1, kv_heads, context+n, d]
            context = seg.kv.context_len
            for row in range(seg.offset, seg.offset + seg.num_new):
                end = context + row - seg.offset + 1  # this position and every one before it
                outs.append(F.scaled_dot_product_attention(q[:, :, row:row + 1], k_all[:, :, :end],
                                                           v_all[:, :, :end], scale=p.scaling, enable_gqa=True))
        out = torch.cat(outs, dim=2)  # [1, heads, N, d]
    clock.attention_s += time.perf_counter() - started
    joined = out.new_empty((num_new, num_heads, head_dim), dtype=p.o_dtype)
    joined.copy_(out[0].transpose(0, 1))  # the heads side by side, cast on the way: one op
    hidden = hidden + clock.matmul(p.o, joined.view(num_new, -1))
    x = F.rms_norm(hidden, hidden.shape[-1:], p.post_norm, p.eps).to(p.gate_up_dtype)
    gate, up = clock.matmul(p.gate_up, x).chunk(2, dim=-1)
    return hidden + clock.matmul(p.down, (F.silu(gate) * up).to(p.down_dtype))


def read_safetensors(model_dir: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read only the named tensors, from a single file or a sharded checkpoint."""
    keys = set(keys)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {model_dir / weight_map[k] for k in keys if k in weight_map}
    else:
        files = set(model_dir.glob("*.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(files):
        with safe_open(file, framework="pt") as f:
            for key in keys & set(f.keys()):
                tensors[key] = f.get_tensor(key)
    missing = keys - tensors.keys()
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {sorted(missing)[:5]}")
    return tensors
