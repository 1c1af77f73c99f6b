"""`pipeinfer generate` as a user runs it: a real process, the real default model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PIPEINFER = str(Path(sys.executable).parent / "pipeinfer")


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PIPEINFER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("draft,mode,stages", [
    ("none", "ar", 1),
    ("ngram", "pipeinfer", 2),
    ("layers:10", "sync", 3),
    ("int8", "pipeinfer", 2),
    ("TARGET", "pipeinfer", 4),
])
def test_generate_names_paris_with_every_draft(default_model, draft, mode, stages):
    draft = str(default_model) if draft == "TARGET" else draft
    proc = run_cli("generate", "--model", "default", "--prompt", "The capital of France is", "--max-tokens", "12",
                   "--draft", draft, "--mode", mode, "--stages", str(stages), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert "Paris" in result["text"]
    assert len(result["token_ids"]) == 12
    stats = result["stats"]
    for key in ("tokens_per_s", "acceptance_rate", "num_runs", "num_runs_cancelled", "num_draft_tokens",
                "num_accepted_tokens"):
        assert key in stats
    assert stats["tokens_per_s"] > 0 and stats["num_runs"] >= 1
    if draft == str(default_model):  # every guess it launched was right (on this machine the draft, as costly as
        assert stats["num_accepted_tokens"] == stats["num_draft_tokens"]  # a pass, shares the cores: few or none)


@pytest.mark.slow
@pytest.mark.integration
def test_generate_over_ray_actors(default_model):
    proc = run_cli("generate", "--transport", "ray", "--stages", "2", "--quantize", "auto", "--draft", "ngram", "--prompt",
                   "The capital of France is", "--max-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in result["text"]
    # Each Ray actor holds its half as the GGUF's blocks: Q4_1 layers as int4, the Q8_0 embedding/head as int8.
    assert [w["quantize"] for w in result["weights"]] == ["gguf", "gguf"]
    assert sum(w["formats"]["int4 g32 (Q4_1)"] for w in result["weights"]) == 30 * 4  # q/k/v, o, gate/up, down
    assert all(w["formats"]["int8 per-row (Q8_0 requantized)"] == 1 and w["bytes_per_weight"] < 0.8
               for w in result["weights"])


@pytest.mark.slow
def test_generate_prints_plain_text(default_model):
    proc = run_cli("generate", "--prompt", "The capital of France is", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("Paris")


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "model '/no/such/model' not found"),
    (["--model", "TINY", "--draft", "layers:99"], "N must be in 1..4"),
    (["--model", "TINY"], "has no tokenizer"),
    (["--model", "TINY", "--stages", "9"], "cannot split 4 layers over 9 stages"),
    (["--model", "TINY", "--temperature", "-1"], "temperature must be >= 0"),
    (["--model", "TINY", "--device", "gpu"], "device 'gpu': expected cpu, cuda or cuda:N"),
    *([] if torch.cuda.is_available() else [(["--model", "TINY", "--device", "cuda"], "sees no CUDA device")]),
])
def test_bad_arguments_exit_2_with_a_clear_message(tiny_target, args, message):
    args = [str(tiny_target) if a == "TINY" else a for a in args]
    proc = run_cli("generate", "--prompt", "hi", *args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_building_the_parser_imports_no_torch():
    """What makes every --help answer at once (~0.2 s here, against ~6 s when
    the parser's defaults pulled in torch and transformers): the parser and
    the defaults it reads import none of the heavy stacks."""
    code = ("import sys; from cluster.cli import _parser; _parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'ray', 'fastapi', 'matplotlib') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("args,expected,chosen", [
    ([], ("auto", 1, "sync"), ["draft", "stages", "mode"]),
    (["--stages", "2"], ("auto", 2, "pipeinfer"), ["draft", "mode"]),
    (["--draft", "none"], ("none", 1, "ar"), ["stages", "mode"]),
    (["--draft", "ngram", "--stages", "2", "--mode", "sync"], ("ngram", 2, "sync"), []),
    (["--draft", "none", "--mode", "pipeinfer"], ("none", 1, "pipeinfer"), ["stages"]),  # exactly the flags passed
])
def test_what_the_user_leaves_out_the_defaults_choose_and_say_why(args, expected, chosen):
    """serve and generate with no draft, stage or mode flags: the measured
    best (pipeline/config.py: choose_defaults); a flag passed is kept as is."""
    from cluster.cli import _engine_config, _parser

    for command in (["serve"], ["generate", "--prompt", "hi"]):
        config = _engine_config(_parser().parse_args([*command, *args]))
        assert (config.draft, config.num_stages, config.speculation.mode.value) == expected
        assert [d.setting for d in config.defaulted] == chosen
        assert all(d.why for d in config.defaulted)
