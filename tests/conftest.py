from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import transformers  # noqa: E402

from compute.model_source import resolve_model  # noqa: E402
from tests.helpers import make_tiny_model, make_tiny_model_with_tokenizer  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_target(tiny_dir) -> Path:
    """4-layer Llama, vocab 96: the target of most tests."""
    return make_tiny_model(tiny_dir / "target", seed=1)


@pytest.fixture(scope="session")
def tiny_targets(tiny_dir, tiny_target) -> dict[str, Path]:
    """One tiny model per supported architecture family and layout."""
    return {
        "llama": tiny_target,
        "llama-tied": make_tiny_model(tiny_dir / "llama-tied", seed=2, num_layers=5, tie_word_embeddings=True),
        "qwen2": make_tiny_model(tiny_dir / "qwen2", seed=3, model_type="qwen2", num_layers=4),
        "qwen3": make_tiny_model(tiny_dir / "qwen3", seed=4, model_type="qwen3", num_layers=4),
        "mistral": make_tiny_model(tiny_dir / "mistral", seed=5, model_type="mistral", num_layers=4),
    }


@pytest.fixture(scope="session")
def unrelated_draft(tiny_dir) -> Path:
    """Same vocabulary, unrelated weights: its guesses are almost always wrong."""
    return make_tiny_model(tiny_dir / "unrelated", seed=99, num_layers=2, hidden_size=32)


@pytest.fixture(scope="session")
def default_model() -> Path:
    return resolve_model("default", show_progress=False)


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory, default_model):
    """A tiny random Llama with SmolLM2's tokenizer and chat template."""
    return make_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny-text") / "m", seed=7,
                                          tokenizer_from=default_model, num_layers=4)


@pytest.fixture(scope="session")
def tiny_heads(tiny_dir, tiny_targets) -> dict[str, Path]:
    """An untrained draft head per tiny target (its guesses are mostly wrong),
    predicting a reduced vocabulary of half the target's."""
    from tests.helpers import make_tiny_head

    return {arch: make_tiny_head(target, tiny_dir / f"head-{arch}", seed=11) for arch, target in tiny_targets.items()}
