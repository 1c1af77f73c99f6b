from __future__ import annotations

import pytest

from tests.helpers import make_tiny_model_with_tokenizer


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory, default_model):
    """A tiny random Llama with SmolLM2's tokenizer and chat template."""
    return make_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny-text") / "m", seed=7,
                                          tokenizer_from=default_model, num_layers=4)
