"""pipeinfer make-model: a random model written a layer at a time, served quantized."""

from __future__ import annotations

import json

from cluster.cli import main
from compute.types import GenerationRequest
from loadtests.shapes import SHAPES
from tests.helpers import greedy_reference, load_engine


def test_a_random_model_is_written_a_layer_a_shard_and_serves_quantized(tmp_path):
    out = tmp_path / "m"
    assert main(["make-model", "--shape", "tiny", "--out", str(out)]) == 0
    shape = SHAPES["tiny"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == shape.num_layers + 1  # a shard per layer, one for the ends
    assert index["metadata"]["total_size"] == 2 * shape.num_params  # bfloat16
    with load_engine(out, "ngram", 2, "pipeinfer", quantize="int4") as engine:
        held = engine.stage_stats()
        out_ids = engine.complete(GenerationRequest((5, 6, 7, 5, 6), 8)).token_ids
    assert all(s["weight_format"]["quantize"] == "int4" for s in held)
    assert out_ids == greedy_reference(out, [5, 6, 7, 5, 6], 8, quantize="int4")
