"""Devices: names checked before anything loads; a GPU stage where this
machine has one (the CUDA tests run only there: skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from compute.backend import StageBackend, torch_device
from compute.options import DeviceError, check_device_name
from compute.stage_model import StageModel
from compute.types import GenerationRequest
from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.partition import balanced_plans
from pipeline.speculation import SpeculationConfig
from pipeline.stage import Stage
from pipeline.types import Mode
from tests.helpers import greedy_reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:x", "CUDA", ""])
def test_a_bad_device_name_is_explained(name):
    with pytest.raises(DeviceError, match="expected cpu, cuda or cuda:N"):
        check_device_name(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_a_gpu_this_machine_lacks_is_a_clear_error_before_loading(tiny_target):
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        torch_device("cuda:0")
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        Stage.load(tiny_target, balanced_plans(tiny_target, 1), 0, "float32", device="cuda")


def test_the_torch_stage_model_is_a_stage_backend(tiny_target):
    model = StageModel.load(tiny_target, 0, 4, with_embed=True, with_head=True)
    backend: StageBackend = model  # the contract Stage relies on (typing), and its device and host outputs:
    assert backend.device == torch.device("cpu") and backend.num_layers == 4
    assert backend.logits(backend.embed([1, 2])).device.type == "cpu"


@requires_cuda
@pytest.mark.parametrize("stages", [1, 2])
def test_cuda_stages_are_lossless(tiny_target, stages):
    """float32 on the GPU equals the target's own greedy decoding; every mode
    gives the same tokens in bfloat16 too (its greedy reference is itself)."""
    prompt = (5, 6, 7)
    expected = greedy_reference(tiny_target, list(prompt), 24)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        for mode in Mode:
            config = EngineConfig(model=str(tiny_target), draft=str(tiny_target), num_stages=stages, dtype=dtype,
                                  device="cuda", speculation=SpeculationConfig(mode=mode))
            with Engine.load(config, show_progress=False) as engine:
                assert {s["device"] for s in engine.stage_stats()} == {"cuda:0"}
                outputs[dtype, mode] = engine.complete(GenerationRequest(prompt, 24)).token_ids
    assert all(outputs["float32", mode] == expected for mode in Mode)
    assert len({tuple(outputs["bfloat16", mode]) for mode in Mode}) == 1
