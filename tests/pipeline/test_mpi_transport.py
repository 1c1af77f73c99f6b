"""Stages as MPI ranks: `mpiexec -n STAGES+1 pipeinfer generate --transport mpi`."""

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


def mpi_generate(num_stages: int, *args: str) -> dict:
    command = [str(BIN / "mpiexec"), "-n", str(num_stages + 1), str(BIN / "pipeinfer"), "generate",
               "--transport", "mpi", "--stages", str(num_stages), "--json", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode,draft", [("ar", "none"), ("sync", "layers:2"), ("pipeinfer", "layers:1")])
def test_mpi_ranks_are_lossless(tiny_text_model, mode, draft):
    prompt = "Once upon a time there was"
    result = mpi_generate(2, "--model", str(tiny_text_model), "--mode", mode, "--draft", draft, "--prompt", prompt,
                          "--max-tokens", "16", "--ignore-eos", "--cutoff", "0")
    ids = AutoTokenizer.from_pretrained(tiny_text_model).encode(prompt)
    assert result["token_ids"] == greedy_reference(tiny_text_model, ids, 16)
    if mode != "ar":
        assert result["stats"]["num_draft_tokens"] > 0


def test_wrong_rank_count_is_explained(tiny_text_model):
    command = [str(BIN / "mpiexec"), "-n", "2", str(BIN / "pipeinfer"), "generate", "--transport", "mpi",
               "--stages", "2", "--model", str(tiny_text_model), "--prompt", "x"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--stages 2 needs 3 MPI ranks (coordinator + stages), got 2" in proc.stderr
