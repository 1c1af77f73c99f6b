"""A stage holds only its layer range, and the split does not change the arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from compute.line_kv import DraftKV
from compute.model_source import ModelSourceError, resolve_model
from compute.stage_model import PackedLinear, StageModel, can_pack
from pipeline.partition import balanced_plans
from pipeline.stage import Stage


def even_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous ranges, sizes differing by at most one: any split must compute the same."""
    base, extra = divmod(num_layers, num_stages)
    ends = [sum(base + (i < extra) for i in range(k + 1)) for k in range(num_stages)]
    return list(zip([0, *ends[:-1]], ends))


def load_stages(model_dir, num_stages: int, packed: bool = False) -> list[StageModel]:
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    ranges = even_ranges(num_layers, num_stages)
    stages = [StageModel.load(model_dir, a, b, with_embed=i == 0, with_head=i == len(ranges) - 1)
              for i, (a, b) in enumerate(ranges)]
    return [stage.pack_weights() for stage in stages] if packed else stages


def full_model_bytes(model_dir) -> int:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("num_stages", [1, 2, 3, 4])
def test_stages_hold_only_their_layers_and_sum_to_the_model(tiny_target, num_stages):
    stages = load_stages(tiny_target, num_stages)
    assert sum(s.parameter_bytes() for s in stages) == full_model_bytes(tiny_target)
    for index, (stage, (start, end)) in enumerate(zip(stages, even_ranges(4, num_stages))):
        assert (stage.layer_start, stage.layer_end) == (start, end)
        assert len(stage.layers) == end - start
        assert stage.is_first == (index == 0) and stage.is_last == (index == num_stages - 1)
        assert not any(p.is_meta for p in stage.parameters())


def test_tied_embeddings_are_held_by_both_ends(tiny_targets):
    """With tied embeddings the first stage needs them as input, the last as its head."""
    model_dir = tiny_targets["llama-tied"]
    single = load_stages(model_dir, 1)[0]
    assert single.parameter_bytes() == full_model_bytes(model_dir)
    assert single.lm_head.weight is single.embed_tokens.weight
    first, last = load_stages(model_dir, 2)
    embed_bytes = first.embed_tokens.weight.numel() * 4
    assert first.parameter_bytes() + last.parameter_bytes() == full_model_bytes(model_dir) + embed_bytes


@pytest.mark.parametrize("quantize", ["none", "int4"])
def test_a_decode_forward_reads_all_but_an_embedding_table_of_its_own(tiny_targets, quantize):
    """The bandwidth floor's numerator: a token reads one row of the embedding,
    so a first stage reads its weights less the table, unless the table is
    also its head (a tied model on one stage)."""
    for arch, model_dir in (("llama", tiny_targets["llama"]), ("llama-tied", tiny_targets["llama-tied"])):
        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        whole = StageModel.load(model_dir, 0, layers, with_embed=True, with_head=True, quantize=quantize).pack_weights()
        first = StageModel.load(model_dir, 0, 1, with_embed=True, with_head=False, quantize=quantize).pack_weights()
        last = StageModel.load(model_dir, 1, layers, with_embed=False, with_head=True, quantize=quantize).pack_weights()
        config = json.loads((model_dir / "config.json").read_text())
        table = config["vocab_size"] * config["hidden_size"] * (4 if quantize == "none" else 1)  # int8 rows
        table += 0 if quantize == "none" else config["vocab_size"] * 2  # and their bf16 scales
        assert last.decode_read_bytes() == last.parameter_bytes()
        assert first.decode_read_bytes() == first.parameter_bytes() - table
        shares_table = arch == "llama-tied" and quantize != "none"  # (packed, a dense tied head is a copy)
        assert whole.decode_read_bytes() == whole.parameter_bytes() - (0 if shares_table else table), arch


@pytest.mark.parametrize("arch", ["llama", "llama-tied", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("num_stages", [1, 3])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_chained_stages_reproduce_the_full_forward(tiny_targets, arch, num_stages, packed):
    model_dir = tiny_targets[arch]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = [3, 14, 15, 92, 65, 35, 89, 79]
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    stages = load_stages(model_dir, num_stages, packed)
    caches = [DraftKV(s.num_layers) for s in stages]
    # Prefill 5 tokens, then verify 3 in one forward: the cache path must match too.
    outputs = []
    for chunk in (ids[:5], ids[5:]):
        hidden = stages[0].embed(chunk)
        for stage, kv in zip(stages, caches):
            hidden = stage.forward_layers(hidden, kv)
            kv.advance(len(chunk))
        outputs.append(stages[-1].logits(hidden))
    torch.testing.assert_close(torch.cat(outputs), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(not can_pack(torch.float32), reason="this torch has no oneDNN")
def test_packed_weights_replace_every_linear_and_keep_the_byte_count(tiny_target):
    """Packing (oneDNN's layout, what a pipeline stage and a draft compute
    with) keeps no second copy of a weight and counts the same bytes."""
    unpacked, = load_stages(tiny_target, 1)
    packed = StageModel.load(tiny_target, 0, 4, with_embed=True, with_head=True).pack_weights()
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    # fused q/k/v, o, fused gate/up, down; the head
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * 4 + 1
    assert packed.parameter_bytes() == unpacked.parameter_bytes()
    assert isinstance(Stage.load(tiny_target, balanced_plans(tiny_target, 1), 0, "float32").model.lm_head,
                      PackedLinear)
    half = StageModel.load(tiny_target, 0, 4, with_embed=True, with_head=True, dtype=torch.float16).pack_weights()
    assert isinstance(half.lm_head, torch.nn.Linear)  # no packed float16 on CPU: left as it is


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelSourceError, match=r"unsupported architecture 'gpt2'.*llama, mistral, qwen2, qwen3"):
        resolve_model(tmp_path / "gpt2")


def test_layer_range_outside_the_model_is_refused(tiny_target):
    with pytest.raises(ValueError, match=r"layer range \[2, 9\) outside the model's 4 layers"):
        StageModel.load(tiny_target, 2, 9, with_embed=False, with_head=True)
