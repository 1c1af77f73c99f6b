"""Stages as MPI ranks: `mpiexec -n STAGES+1 pipeinfer generate --transport
mpi` (STAGES+2 with a draft that computes: it gets a rank of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tests.helpers import greedy_reference

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def mpi_generate(num_stages: int, num_ranks: int, *args: str) -> dict:
    command = [str(BIN / "mpiexec"), "-n", str(num_ranks), str(BIN / "pipeinfer"), "generate",
               "--transport", "mpi", "--stages", str(num_stages), "--json", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def text_head(tiny_text_model, tmp_path_factory):
    from tests.helpers import make_tiny_head

    return make_tiny_head(tiny_text_model, tmp_path_factory.mktemp("head") / "h", seed=4)


@pytest.mark.parametrize("mode,draft", [("ar", "none"), ("sync", "layers:2"), ("pipeinfer", "layers:1"),
                                        ("pipeinfer", "ngram"), ("sync", "head"), ("pipeinfer", "head"),
                                        ("pipeinfer", "ngram+head")])
def test_mpi_ranks_are_lossless(tiny_text_model, text_head, mode, draft):
    prompt = "Once upon a time there was"
    num_ranks = 3 if draft in ("none", "ngram", "head", "ngram+head") else 4  # a model draft drafts on its own rank
    draft = f"{draft}:{text_head}" if "head" in draft else draft  # the head drafts on the last stage's rank
    result = mpi_generate(2, num_ranks, "--model", str(tiny_text_model), "--mode", mode, "--draft", draft, "--prompt", prompt,
                          "--max-tokens", "16", "--ignore-eos", "--min-accept-prob", "0")
    ids = AutoTokenizer.from_pretrained(tiny_text_model).encode(prompt)
    assert result["token_ids"] == greedy_reference(tiny_text_model, ids, 16)
    if mode == "sync":  # it waits for the draft rank; pipeinfer mode takes guesses only when they are ready in time
        assert result["stats"]["num_draft_tokens"] > 0


def test_quantized_mpi_ranks_equal_the_quantized_target_alone(tiny_text_model):
    prompt = "Once upon a time there was"
    result = mpi_generate(2, 3, "--model", str(tiny_text_model), "--quantize", "int4", "--draft", "ngram",
                          "--prompt", prompt, "--max-tokens", "16", "--ignore-eos", "--min-accept-prob", "0")
    assert [w["quantize"] for w in result["weights"]] == ["int4", "int4"]
    ids = AutoTokenizer.from_pretrained(tiny_text_model).encode(prompt)
    assert result["token_ids"] == greedy_reference(tiny_text_model, ids, 16, quantize="int4")


def test_wrong_rank_count_is_explained(tiny_text_model):
    command = [str(BIN / "mpiexec"), "-n", "2", str(BIN / "pipeinfer"), "generate", "--transport", "mpi",
               "--stages", "2", "--model", str(tiny_text_model), "--prompt", "x"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--stages 2 needs 3 MPI ranks (coordinator + stages), got 2" in proc.stderr
    proc = subprocess.run(command[:-2] + ["--draft", "layers:1", "--prompt", "x"], capture_output=True, text=True,
                          timeout=300)
    assert "--stages 2 needs 4 MPI ranks (coordinator + stages + the draft), got 2" in proc.stderr
