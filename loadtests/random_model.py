"""A random Llama of a named shape, for speed figures on models larger than
memory holds in float32 (speed does not depend on the weight values).

It is written a tensor at a time in bfloat16, one safetensors shard per
decoder layer with the usual index, so no more than a layer is ever in
memory; serve it quantized with `--quantize int4` (or int8): each stage
reads only its layers and rounds them as it loads.

    pipeinfer make-model --shape 8b --tokenizer-from default --out /tmp/llama-8b
    pipeinfer bench --model /tmp/llama-8b --quantize int4 --stages 2 --modes ar
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from loadtests.pair import TOKENIZER_FILES, _tokenizer_special_ids
from loadtests.shapes import PairShape

INDEX_NAME = "model.safetensors.index.json"


def make_random_model(out_dir: Path, shape: PairShape, *, seed: int = 0, tokenizer_from: Path | None = None,
                      show_progress: bool = True) -> dict:
    """Write the model to out_dir (bfloat16, normal(0, initializer_range)
    matrices, unit norms) -> {"num_params", "bytes", "elapsed_s"}."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    special_ids = _tokenizer_special_ids(Path(tokenizer_from), shape) if tokenizer_from is not None else {}
    config = shape.config(**special_ids)
    config.dtype = "bfloat16"
    config.save_pretrained(out_dir)
    generator = torch.Generator().manual_seed(seed)
    shards = [_layer_tensors(shape, i, generator) for i in range(shape.num_layers)] + [_end_tensors(shape, generator)]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, num_bytes = {}, 0
    for make, name in tqdm(list(zip(shards, names)), desc="writing random weights", unit="shard",
                           disable=not show_progress):
        tensors = make()  # only this shard's tensors are in memory
        save_file(tensors, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        num_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": num_bytes},
                                                  "weight_map": weight_map}, indent=1))
    if tokenizer_from is not None:
        for file in TOKENIZER_FILES:
            if (Path(tokenizer_from) / file).exists():
                shutil.copy(Path(tokenizer_from) / file, out_dir / file)
    return {"num_params": shape.num_params, "bytes": num_bytes, "elapsed_s": round(time.monotonic() - started, 1)}


def _random(shape: tuple[int, ...], std: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)


def _layer_tensors(shape: PairShape, index: int, generator: torch.Generator):
    h, std = shape.hidden_size, shape.initializer_range
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    matrices = {"self_attn.q_proj": (q_dim, h), "self_attn.k_proj": (kv_dim, h), "self_attn.v_proj": (kv_dim, h),
                "self_attn.o_proj": (h, q_dim), "mlp.gate_proj": (shape.intermediate_size, h),
                "mlp.up_proj": (shape.intermediate_size, h), "mlp.down_proj": (h, shape.intermediate_size)}

    def make() -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{index}."
        tensors = {f"{prefix}{name}.weight": _random(dims, std, generator) for name, dims in matrices.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}{norm}.weight"] = torch.ones(h, dtype=torch.bfloat16)
        return tensors
    return make


def _end_tensors(shape: PairShape, generator: torch.Generator):
    def make() -> dict[str, torch.Tensor]:
        dims = (shape.vocab_size, shape.hidden_size)
        tensors = {"model.embed_tokens.weight": _random(dims, shape.initializer_range, generator),
                   "model.norm.weight": torch.ones(shape.hidden_size, dtype=torch.bfloat16)}
        if not shape.tie_word_embeddings:
            tensors["lm_head.weight"] = _random(dims, shape.initializer_range, generator)
        return tensors
    return make
