"""Quantized weights: a GGUF's blocks decoded exactly, round-to-nearest
quantization within its step, and the lossless guarantee itself, batch
invariance: a position's logits are the same bits whether it is decoded
alone, verified in a run, prefilled in a chunk or packed with other
requests' runs, at any thread count and split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compute.gguf_blocks import FORMATS
from compute.line_kv import DraftKV
from compute.options import QuantizeError
from compute.quant import Int4Linear, Int8Linear
from compute.stage_model import StageModel
from tests.helpers import make_tiny_model

QUANTIZED = ["int4", "int8"]


def random_blocks(name: str, num_rows: int, num_blocks: int, seed: int = 0) -> np.ndarray:
    """Random blocks of a GGML type with finite float16 scales."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    _, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (num_rows, num_blocks, block_bytes), dtype=np.uint8)
    for start in (0,) if name == "Q4_0" else (0, 2):  # d (and m / dmin)
        halves = (rng.standard_normal((num_rows, num_blocks)) * 0.02).astype(np.float16)
        blocks[..., start:start + 2] = halves.view(np.uint8).reshape(num_rows, num_blocks, 2)
    return blocks


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_4bit_gguf_blocks_decode_to_exactly_the_gguf_packages_weights(name):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    blocks = random_blocks(name, 16, 4 if name == "Q4_K" else 16)
    expected = dequantize(blocks.reshape(16, -1), GGMLQuantizationType[name]).reshape(16, -1)
    codes, scales, zeros = (a.reshape(16, -1) for a in FORMATS[name].decode_int4(blocks))
    assert codes.min() >= 0 and codes.max() <= 15
    weights = (codes.astype(np.float64) - 8) * np.repeat(scales, 32, 1) + np.repeat(zeros, 32, 1)
    np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_int4_linear_computes_its_decoded_weights():
    """Int4Linear's op is w = (q - 8) * scale + zero with bf16 scales: compare
    with that product in float32 (the op's output is bfloat16)."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (48, 64))
    scales, zeros = torch.rand(48, 2) * 0.05, torch.randn(48, 2) * 0.05
    linear = Int4Linear(codes, scales, zeros)
    weight = (codes - 8) * scales.bfloat16().float().repeat_interleave(32, 1) + \
        zeros.bfloat16().float().repeat_interleave(32, 1)
    x = torch.randn(5, 64)
    expected = x.bfloat16().float() @ weight.T
    torch.testing.assert_close(linear(x).float(), expected, atol=2e-2 * expected.abs().max().item(), rtol=0)
    assert linear.weight_bytes == 48 * 64 // 2 + 48 * 2 * 2 * 2


@pytest.mark.parametrize("kind", QUANTIZED)
def test_round_to_nearest_stays_within_half_a_step(kind):
    torch.manual_seed(1)
    weight = torch.randn(32, 128)
    linear = Int4Linear.quantize(weight) if kind == "int4" else Int8Linear.quantize(weight)
    identity = torch.eye(128)
    recovered = linear(identity).float().T  # [N, K]: column k of x @ W^T with x = e_k
    groups = weight.reshape(32, -1, 32) if kind == "int4" else weight.reshape(32, 1, 128)
    step = (groups.amax(-1) - groups.amin(-1)) / 15 if kind == "int4" else groups.abs().amax(-1) / 127
    bound = step.repeat_interleave(groups.shape[-1], 1) * 0.5 + 0.01 * weight.abs()  # + bf16 rounding
    assert ((recovered - weight).abs() <= bound).all()


def test_int4_refuses_shapes_its_kernel_cannot_take():
    with pytest.raises(QuantizeError, match="multiple of 16"):
        Int4Linear.quantize(torch.randn(20, 64))


@pytest.mark.parametrize("kind", QUANTIZED)
@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_is_the_same_bits_in_any_batch_and_thread_count(kind, threads):
    torch.manual_seed(2)
    weight = torch.randn(64, 96)
    linear = Int4Linear.quantize(weight) if kind == "int4" else Int8Linear.quantize(weight)
    x = torch.randn(16, 96)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [linear(x[i:i + 1]) for i in range(16)]
        torch.set_num_threads(threads)
        for m in range(1, 17):
            assert torch.equal(linear(x[:m]), torch.cat(alone[:m])), m
    finally:
        torch.set_num_threads(before)


# ---- a whole stage: batch invariance through norm, RoPE, attention and the head ----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("quant") / "m", seed=7, num_layers=3)


def decoded_alone(model: StageModel, tokens: list[int]) -> torch.Tensor:
    """Each position's logits computed a token a forward -> [n, vocab]."""
    kv = DraftKV(model.num_layers)
    rows = []
    for token in tokens:
        hidden = model.forward_layers(model.embed([token]), kv)
        kv.advance(1)
        rows.append(model.logits(hidden))
    return torch.cat(rows)


@pytest.mark.parametrize("quantize", QUANTIZED + ["none"])
def test_logits_are_bit_identical_alone_in_runs_in_chunks_and_packed(tiny_model, quantize):
    model = StageModel.load(tiny_model, 0, 3, with_embed=True, with_head=True, quantize=quantize).pack_weights()
    tokens = [int(t) for t in torch.randint(2, 96, (16,), generator=torch.Generator().manual_seed(3))]
    expected = decoded_alone(model, tokens)
    for chunk in (2, 3, 5, 16):  # a prefill or verify run of `chunk` tokens at a time
        kv, rows = DraftKV(3), []
        for start in range(0, 16, chunk):
            hidden = model.forward_layers(model.embed(tokens[start:start + chunk]), kv)
            kv.advance(hidden.shape[1])
            rows.append(model.logits(hidden))
        assert torch.equal(torch.cat(rows), expected), chunk
    # Packed: the same sequence's runs beside other sequences' runs of other lengths.
    other_tokens = [[5, 6, 7, 8], [9], [10, 11]]
    kvs, others = DraftKV(3), [DraftKV(3) for _ in other_tokens]
    rows = []
    for start in range(0, 16, 4):
        hiddens = [model.embed(tokens[start:start + 4])] + [model.embed(t) for t in other_tokens]
        outs = model.forward_batch(hiddens, [kvs, *others])
        for kv, out in zip([kvs, *others], outs):
            kv.advance(out.shape[1])
        rows.append(model.logits(outs[0]))
    assert torch.equal(torch.cat(rows), expected)


@pytest.mark.parametrize("quantize", QUANTIZED)
def test_logits_are_bit_identical_at_any_split_and_thread_count(tiny_model, quantize):
    whole = StageModel.load(tiny_model, 0, 3, with_embed=True, with_head=True, quantize=quantize)
    tokens = [4, 40, 41, 4, 40, 90, 2, 3]
    expected = decoded_alone(whole, tokens)
    first = StageModel.load(tiny_model, 0, 1, with_embed=True, with_head=False, quantize=quantize)
    last = StageModel.load(tiny_model, 1, 3, with_embed=False, with_head=True, quantize=quantize)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            kv0, kv1 = DraftKV(1), DraftKV(2)
            hidden = first.forward_layers(first.embed(tokens), kv0)
            assert torch.equal(last.logits(last.forward_layers(hidden, kv1)), expected), threads
    finally:
        torch.set_num_threads(before)


def test_a_stage_reports_how_it_holds_its_weights(tiny_model):
    int4 = StageModel.load(tiny_model, 0, 3, with_embed=True, with_head=True, quantize="int4").weight_format()
    dense = StageModel.load(tiny_model, 0, 3, with_embed=True, with_head=True).pack_weights().weight_format()
    assert int4["quantize"] == "int4" and int4["formats"] == {"int4 g32 (int4)": 3 * 4, "int8 per-row (int8)": 2}
    assert dense["formats"] == {"dense float32": 3 * 4 + 1} and dense["bytes_per_weight"] == 4.0
    assert int4["num_weights"] == dense["num_weights"]
    assert int4["bytes_per_weight"] < 1.1  # embedding and head in int8, the layers in int4


@pytest.mark.parametrize("quantize,match", [("gguf", "not converted from a GGUF"), ("int3", "must be one of")])
def test_a_quantization_the_model_cannot_have_is_a_clear_error(tiny_model, quantize, match):
    with pytest.raises(QuantizeError, match=match):
        StageModel.load(tiny_model, 0, 3, with_embed=True, with_head=True, quantize=quantize)


# ---- the default model's GGUF, held as its own blocks ----


def gguf_bytes(reader, layer_start: int, layer_end: int, with_embed: bool, with_head: bool) -> int:
    """Bytes the GGUF file holds for a stage's tensors (a tied matrix once)."""
    names = {t.name for t in reader.tensors}
    total = 0
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk."):
            keep = layer_start <= int(name.split(".")[1]) < layer_end
        else:
            keep = (name == "token_embd.weight" and (with_embed or with_head and "output.weight" not in names)
                    or name in ("output.weight", "output_norm.weight") and with_head)
        total += tensor.n_bytes if keep else 0
    return total


@pytest.mark.slow
def test_default_model_stages_hold_the_ggufs_bytes_and_are_batch_invariant(default_model):
    from gguf import GGUFReader

    from compute.model_source import gguf_source

    reader = GGUFReader(str(gguf_source(default_model)))
    splits = [(0, 30, True, True), (0, 15, True, False), (15, 30, False, True)]
    for layer_start, layer_end, with_embed, with_head in splits:
        model = StageModel.load(default_model, layer_start, layer_end, with_embed=with_embed, with_head=with_head,
                                quantize="auto")
        held = model.weight_format()
        assert held["quantize"] == "gguf" and held["formats"]["int4 g32 (Q4_1)"] == 4 * (layer_end - layer_start)
        assert held["weight_bytes"] <= 1.15 * gguf_bytes(reader, layer_start, layer_end, with_embed, with_head)
    tokens = [504, 3575, 282, 4649, 314, 253, 1345, 30, 378, 3575]
    expected = decoded_alone(model_whole := StageModel.load(default_model, 0, 30, with_embed=True, with_head=True,
                                                            quantize="gguf"), tokens)
    kv = DraftKV(30)
    prefilled = model_whole.logits(model_whole.forward_layers(model_whole.embed(tokens[:7]), kv))
    kv.advance(7)
    verified = model_whole.logits(model_whole.forward_layers(model_whole.embed(tokens[7:]), kv))
    assert torch.equal(torch.cat([prefilled, verified]), expected)
