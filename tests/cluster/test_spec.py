"""The YAML cluster spec: good files load; every error names the field and its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.layout import plan_layout
from cluster.spec import SpecError, load_spec
from cluster.up import engine_config, plan
from compute.model_source import gguf_source
from draft_models import DraftSpecError
from draft_models.spec import DRAFT_KINDS
from pipeline.partition import balanced_ranges, model_costs
from pipeline.types import Mode
from tests.compute.test_stage_model import full_model_bytes
from tests.helpers import make_tiny_head

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_two_lines_are_enough(tmp_path):
    spec = load_spec(write(tmp_path, "model: default\nstages: 2\n"))
    draft, _, mode, defaulted = spec.chosen()  # several stages, no draft or mode: speculate, continuously
    assert spec.transport == "ray" and (draft, mode.value) == ("auto", "pipeinfer")
    assert [d.setting for d in defaulted] == ["draft", "mode"]
    assert len(spec.stage_list()) == 2 and spec.gateway.host == "127.0.0.1" and spec.gateway.port == 8000


def test_a_spec_with_no_draft_stages_or_mode_gets_the_measured_best(tmp_path, tiny_text_model):
    """What `up` serves: the defaults' choice, and each choice with its reason (for /health)."""
    config = engine_config(load_spec(write(tmp_path, f"model: {tiny_text_model}\ntransport: local\n")))
    assert (config.draft, config.num_stages, config.speculation.mode.value) == ("auto", 1, "sync")
    assert [(d.setting, d.value) for d in config.defaulted] == [("draft", "auto"), ("stages", "1"), ("mode", "sync")]
    explicit = load_spec(write(tmp_path, "draft: ngram\nstages: 2\nspeculation:\n  mode: ar\n"))
    assert explicit.chosen()[:3] == ("ngram", 2, Mode.AR) and explicit.chosen()[3] == ()


@pytest.mark.parametrize("name", ["local.yaml", "multi-node.yaml"])
def test_examples_are_valid(name):
    spec = load_spec(EXAMPLES / name)
    assert spec.model == "default"


@pytest.mark.parametrize("text,expected", [
    ("model: default\nstagez: 2\n", "line 2: stagez: unknown field"),
    ("model: default\nstages: 0\n", "line 2: stages: stages must be >= 1"),
    ("stages: 2\nspeculation:\n  mode: turbo\n", "line 3: speculation.mode: Input should be 'ar', 'sync' or 'pipeinfer'"),
    ("stages: 2\nspeculation:\n  draft_len: 0\n", "line 3: speculation.draft_len: Input should be greater than or equal to 1"),
    ("stages:\n  - layers: [0, 10]\n  - layers: [10, 30]\n    resourcez: {a: 1}\n", "line 4: stages.1.resourcez: unknown field"),
    ("stages:\n  - layers: [5, 2]\n", "line 2: stages.0.layers: layers must be [start, end)"),
    ("stages:\n  - layers: [0, 10]\n  - {}\n", "stages: give layers for every stage or for none"),
    ("gateway:\n  port: 99999\n", "line 2: gateway.port: Input should be less than or equal to 65535"),
    ("ray:\n  placement: everywhere\n", "line 2: ray.placement: Input should be 'pack' or 'spread'"),
    ("stages: 2\ndraft_stage: 5\n", "draft_stage 5 does not exist (2 stages)"),
    ("dtype: float64\n", "line 1: dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("device: gpu\n", "line 1: device: device 'gpu': expected cpu, cuda or cuda:N"),
    ("stages:\n  - device: cuda:x\n", "line 2: stages.0.device: device 'cuda:x'"),
    ("- just\n- a list\n", "expected a mapping of fields at the top level"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_files_name_the_field_and_line(tmp_path, text, expected):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert expected in str(info.value)
    assert str(tmp_path / "spec.yaml") in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="No such file"):
        load_spec(tmp_path / "absent.yaml")


@pytest.mark.slow
def test_automatic_split_balances_compute_with_head_and_draft(default_model):
    costs = model_costs(default_model)
    assert len(costs.layer_params) == 30 and costs.is_tied
    plain = balanced_ranges(costs, 2, {})
    assert plain[0][0] == 0 and plain[-1][1] == 30
    # The head (a 49152 x 576 matrix) weighs ~8 layers: the last stage gets fewer layers.
    assert plain[1][1] - plain[1][0] < plain[0][1] - plain[0][0]
    with_draft = balanced_ranges(costs, 2, {0: 3 * costs.layer_params[0]})
    assert with_draft[0][1] < plain[0][1]  # the draft's node takes fewer layers


@pytest.mark.slow
def test_a_split_that_does_not_fit_says_by_how_much(tmp_path, default_model):
    dense = "model: default\nquantize: none\nstages: 2\n"
    spec = load_spec(write(tmp_path, dense + "stage_memory_gb: 0.2\n"))
    with pytest.raises(SpecError, match=r"stage 0 \(layers 0-19\) needs 365 MB of weights but declares memory_gb 0\.2 \(205 MB\): 160 MB too much"):
        plan_layout(spec)
    layouts = plan_layout(load_spec(write(tmp_path, dense + "stage_memory_gb: 1\n")))
    # Both ends hold the tied embedding matrix: the first as input, the last as its head.
    assert sum(layout.memory_bytes for layout in layouts) == full_model_bytes(default_model) + 4 * 49152 * 576
    # As its GGUF's blocks (the default) the same split fits in a fifth of a GB.
    quantized = plan_layout(load_spec(write(tmp_path, "model: default\nquantize: gguf\nstages: 2\nstage_memory_gb: 0.2\n")))
    gguf_file_bytes = gguf_source(default_model).stat().st_size
    assert gguf_file_bytes < sum(layout.memory_bytes for layout in quantized) < 1.4 * gguf_file_bytes


# One example of every draft kind the CLI accepts (draft_models.spec.DRAFT_KINDS).
DRAFT_EXAMPLES = {"auto": "auto", "none": "none", "ngram": "ngram", "ngram+head:PATH": "ngram+head:HEAD",
                  "layers:N": "layers:2", "int8": "int8", "synthetic:ALPHA": "synthetic:0.8",
                  "vllm:PATH": "vllm:default", "PATH": "default", "head:default": "head:default", "head:PATH": "head:HEAD"}


def test_the_examples_cover_every_draft_kind():
    assert set(DRAFT_EXAMPLES) == set(DRAFT_KINDS)


@pytest.mark.parametrize("draft", DRAFT_EXAMPLES.values())
def test_plan_and_up_accept_every_draft_kind(tmp_path, tiny_text_model, default_model, draft):
    model = default_model if draft == "head:default" else tiny_text_model  # the shipped head is the default model's
    if draft.endswith("head:HEAD"):
        draft = draft.replace("HEAD", str(make_tiny_head(tiny_text_model, tmp_path / "head", seed=1)))
    path = write(tmp_path, f"model: {model}\ndraft: {draft}\nstages: 2\ntransport: local\n")
    assert "draft " + draft in plan(str(path))
    config = engine_config(load_spec(path))  # what `up` serves
    assert config.draft == draft and len(config.stage_plans) == 2


@pytest.mark.parametrize("draft,expected", [
    ("layers:x", "line 1: draft: --draft 'layers:x': expected layers:N with an integer N"),
    ("synthetic:2", "line 1: draft: --draft 'synthetic:2': expected synthetic:ALPHA with ALPHA in [0, 1]"),
    ("'vllm:'", "line 1: draft: --draft 'vllm:': expected vllm:PATH"),
])
def test_a_malformed_draft_names_its_line(tmp_path, draft, expected):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, f"draft: {draft}\nstages: 2\n"))
    assert expected in str(info.value)


def test_a_draft_the_target_cannot_run_is_explained_by_plan(tmp_path, tiny_text_model):
    path = write(tmp_path, f"model: {tiny_text_model}\ndraft: layers:9\nstages: 2\n")
    with pytest.raises(DraftSpecError, match=r"--draft 'layers:9': N must be in 1\.\.4"):
        plan(str(path))
    path = write(tmp_path, f"model: {tiny_text_model}\ndraft: head:default\nstages: 2\n")
    with pytest.raises(DraftSpecError, match=r"--draft 'head:default': the head was trained for a target with "
                                             r"hidden size 576"):
        plan(str(path))


def test_stage_devices_reach_the_plan_and_the_engine(tmp_path, tiny_text_model):
    """A top-level device, and a stage's own; `up` gives a GPU stage's Ray actor a GPU (pipeline/ray_transport.py)."""
    path = write(tmp_path, f"model: {tiny_text_model}\ndevice: cuda\nstages:\n  - layers: [0, 2]\n    device: cpu\n"
                           "  - layers: [2, 4]\n")
    plans = engine_config(load_spec(path)).plans(tiny_text_model)
    assert [p.device for p in plans] == ["cpu", "cuda"]
    table = plan(str(path)).splitlines()[1:]  # (under the title line)
    assert "device" in table[0] and " cpu " in table[1] and " cuda " in table[2]
