"""The llama.cpp baselines of `pipeinfer bench --baselines` (llama.cpp,
llama.cpp-ngram): kinds, clear errors for what is missing, the server's
process handled, and (with a llama-server, which CI has not) real timings."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from loadtests import llamacpp_baseline
from loadtests.bench import stage_threads
from loadtests.bench_config import BASELINE_KINDS, BenchConfig, check_baseline_kind
from loadtests.bench_summary import ratios
from loadtests.llamacpp_baseline import (
    BUILD_SCRIPT,
    NGRAM_DRAFT_MAX,
    LlamaCppBaseline,
    LlamaCppBaselineError,
    find_llama_server,
    is_llamacpp_kind,
    model_gguf,
    server_flags,
)
from pipeline.config import EngineConfig
from pipeline.types import Mode

MAX_TOKENS = 8
TEXTS = [
    "The capital of France is",
    "List the days of the week: Monday, Tuesday, Wednesday, Monday, Tuesday,",
]


def llama_server_or_none() -> Path | None:
    try:
        return find_llama_server()
    except LlamaCppBaselineError:
        return None


requires_llama_server = pytest.mark.skipif(
    llama_server_or_none() is None,
    reason=f"no llama-server on PATH nor where {BUILD_SCRIPT} puts it (build it with {BUILD_SCRIPT})")


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed grandchild waits for init to reap it)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state not in ("Z", "X")


def group_running(pgid: int) -> list[int]:
    """The live processes of a process group."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def gguf_dir(tmp_path) -> Path:
    """A model directory as a converted GGUF leaves it (only its source record matters here)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    directory = tmp_path / "converted"
    directory.mkdir()
    (directory / "pipeinfer-source.json").write_text(json.dumps({"gguf": str(gguf)}))
    return directory


@pytest.fixture
def no_llama_server(tmp_path, monkeypatch):
    """Neither on PATH nor built."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    monkeypatch.setenv("PIPEINFER_CACHE", str(tmp_path / "cache"))


def test_kinds():
    assert is_llamacpp_kind("llama.cpp") and is_llamacpp_kind("llama.cpp-ngram")
    assert not is_llamacpp_kind("vllm") and not is_llamacpp_kind("llama")
    assert server_flags("llama.cpp") == []
    flags = server_flags("llama.cpp-ngram")
    assert flags[:2] == ["--spec-type", "ngram-simple"]
    assert flags[flags.index("--spec-ngram-simple-size-m") + 1] == str(NGRAM_DRAFT_MAX)
    assert "llama.cpp" in BASELINE_KINDS and "llama.cpp-ngram" in BASELINE_KINDS
    for kind in ("llama.cpp", "llama.cpp-ngram", "vllm", "vllm-ngram", "vllm-draft:default"):
        check_baseline_kind(kind)


@pytest.mark.parametrize("kind", ["llama.cpp-fast", "llama.cpp-", "sglang", "vllm-draft:"])
def test_unknown_kinds_are_clear_errors(kind):
    with pytest.raises(ValueError, match=f"unknown baseline '{kind}': expected one of .*llama.cpp-ngram"):
        check_baseline_kind(kind)
    with pytest.raises(ValueError, match="unknown baseline"):  # before any engine or server starts
        BenchConfig(engine=EngineConfig(model="default"), baselines=(kind,))


def test_unknown_llamacpp_kind_fails_before_anything_starts(tmp_path):
    with pytest.raises(LlamaCppBaselineError, match="unknown baseline 'llama.cpp-draft'"):
        LlamaCppBaseline(tmp_path, "llama.cpp-draft")


def test_missing_binary_names_the_build_script(no_llama_server, gguf_dir, tmp_path):
    with pytest.raises(LlamaCppBaselineError, match=f"need llama-server.*{BUILD_SCRIPT}.*--llama-server"):
        find_llama_server()
    with pytest.raises(LlamaCppBaselineError, match=BUILD_SCRIPT):
        LlamaCppBaseline(gguf_dir, "llama.cpp")
    with pytest.raises(LlamaCppBaselineError, match=f"--llama-server {tmp_path}/nope: no such executable.*{BUILD_SCRIPT}"):
        find_llama_server(tmp_path / "nope")


def test_binary_lookup_order(no_llama_server, tmp_path, monkeypatch):
    built = tmp_path / "cache" / "llama.cpp" / "bin"
    built.mkdir(parents=True)
    executable(built / "llama-server", "#!/bin/sh\n")
    assert find_llama_server() == built / "llama-server"  # what the build script made
    on_path = tmp_path / "empty-bin"
    on_path.mkdir()
    executable(on_path / "llama-server", "#!/bin/sh\n")
    assert find_llama_server() == on_path / "llama-server"  # PATH first
    given = executable(tmp_path / "mine", "#!/bin/sh\n")
    assert find_llama_server(given) == given  # --llama-server above all


def test_non_gguf_model_is_a_clear_error(tmp_path, tiny_target):
    with pytest.raises(LlamaCppBaselineError, match="llama.cpp baselines need a GGUF model"):
        model_gguf(tiny_target)
    with pytest.raises(LlamaCppBaselineError, match="need a GGUF model"):
        LlamaCppBaseline(tiny_target, "llama.cpp", llama_server=executable(tmp_path / "server", "#!/bin/sh\n"))


def test_gguf_of_a_converted_model(gguf_dir, default_model):
    assert model_gguf(gguf_dir) == gguf_dir.parent / "model.gguf"
    assert model_gguf(gguf_dir.parent / "model.gguf") == gguf_dir.parent / "model.gguf"  # a .gguf as it is
    assert model_gguf(default_model).name.endswith(".gguf")


def test_a_server_that_dies_at_start_is_a_clear_error(tmp_path, gguf_dir):
    server = executable(tmp_path / "llama-server", '#!/bin/sh\n[ "$1" = --version ] && { echo "version: 9 (fake)" >&2; exit 0; }\n'
                                                   'echo "error: unknown model format" >&2; exit 1\n')
    with pytest.raises(LlamaCppBaselineError, match=r"(?s)exited with status 1 before it was ready.*unknown model format"):
        LlamaCppBaseline(gguf_dir, "llama.cpp", llama_server=server)


def test_a_server_that_never_answers_is_stopped(tmp_path, gguf_dir, monkeypatch):
    """Its start times out; it ignores SIGTERM, so it is killed, with its whole process group."""
    monkeypatch.setattr(llamacpp_baseline, "STOP_TIMEOUT_S", 0.5)
    pids = tmp_path / "pids"
    server = executable(tmp_path / "llama-server", '#!/bin/bash\n[ "$1" = --version ] && { echo "version: 9 (fake)"; exit 0; }\n'
                                                   f"trap '' TERM\necho starting\nsleep 60 & echo $$ $! > {pids}\nwait\n")
    with pytest.raises(LlamaCppBaselineError, match=r"(?s)did not become healthy within 1 s.*starting"):
        LlamaCppBaseline(gguf_dir, "llama.cpp", llama_server=server, start_timeout_s=1.0)
    shell, sleeper = map(int, pids.read_text().split())
    assert not running(shell) and not running(sleeper) and not group_running(shell)


def test_stage_threads():
    cores = len(os.sched_getaffinity(0))
    assert stage_threads(2, None) == cores  # the stages split every core
    assert stage_threads(1, 1) == 1
    assert stage_threads(64, 64) == cores


def test_ratios_with_llamacpp_names():
    modes = {"ar": {"tokens_per_s": 45.0}, "pipeinfer": {"tokens_per_s": 60.0}, "llama.cpp": {"tokens_per_s": 30.0},
             "llama.cpp-ngram": {"tokens_per_s": 40.0}, "pipeinfer@c2": {"tokens_per_s": 90.0},
             "llama.cpp@c2": {"tokens_per_s": 45.0}}
    out = ratios(modes, 1, ["llama.cpp", "llama.cpp-ngram"])
    assert out["pipeinfer_vs_llama.cpp"] == 2.0 and out["ar_vs_llama.cpp"] == 1.5
    assert out["pipeinfer_vs_llama.cpp_ngram"] == 1.5
    assert ratios(modes, 2, ["llama.cpp", "llama.cpp-ngram"]) == {"pipeinfer_vs_llama.cpp@c2": 2.0}


def test_bench_cli_takes_llamacpp_baselines_and_the_binary(tmp_path, monkeypatch):
    from cluster.cli import main
    from loadtests import bench

    seen = []

    class Stop(Exception):
        pass

    def fake_run_bench(config, show_progress=True):
        seen.append(config)
        raise Stop

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    server = tmp_path / "llama-server"
    with pytest.raises(Stop):
        main(["bench", "--model", "default", "--modes", "ar", "--baselines", "llama.cpp,llama.cpp-ngram",
              "--llama-server", str(server), "--concurrency", "1,4"])
    assert seen[0].baselines == ("llama.cpp", "llama.cpp-ngram")
    assert seen[0].llama_server == server


def test_bench_cli_rejects_an_unknown_llamacpp_kind(capsys):
    from cluster.cli import main

    assert main(["bench", "--model", "default", "--baselines", "llama.cpp-turbo"]) == 2
    assert "unknown baseline 'llama.cpp-turbo'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def prompts(default_model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model)
    return [tokenizer.encode(text) for text in TEXTS]


def check_timings(timings, prompts, max_tokens):
    assert [t.prompt_index for t in timings] == list(range(len(prompts)))
    for timing in timings:
        assert len(timing.token_ids) == max_tokens == sum(timing.chunk_sizes)  # EOS ignored
        assert len(timing.chunk_times_s) == len(timing.chunk_sizes) >= 1
        assert all(size >= 1 for size in timing.chunk_sizes)
        assert 0 < timing.ttft_s <= timing.elapsed_s < 120
        assert timing.chunk_times_s == sorted(timing.chunk_times_s)
        assert timing.stats is None  # our engine's figures only


@pytest.mark.integration
@requires_llama_server
def test_real_llama_server(default_model, prompts):
    with LlamaCppBaseline(default_model, "llama.cpp", threads=2, slots=2, ctx=256) as baseline:
        pid = baseline.pid
        assert baseline.name == "llama.cpp" and baseline.version and baseline.info["gguf"].endswith(".gguf")
        one = baseline.run(prompts, MAX_TOKENS, 1)
        check_timings(one, prompts, MAX_TOKENS)
        assert all(t.chunk_sizes == [1] * MAX_TOKENS for t in one)  # no speculation: one token a step
        assert all(t["cache_n"] == 0 and t["prompt_n"] == len(p)  # every prompt computed, none cached
                   for t, p in zip(baseline.last_server_timings, prompts))
        two = baseline.run(prompts, MAX_TOKENS, 2)
        check_timings(two, prompts, MAX_TOKENS)
        assert [t.token_ids for t in one] == [t.token_ids for t in two]  # greedy
        assert len(two) == 2 and all(t.token_ids for t in two)
        assert baseline.last_spec_decode is None and baseline.last_withheld_tokens == 0
    assert not running(pid) and not group_running(pid)
    with pytest.raises(LlamaCppBaselineError, match="closed"):
        baseline.run(prompts, MAX_TOKENS, 1)


@pytest.mark.integration
@requires_llama_server
def test_real_llama_server_ngram(default_model, prompts):
    """The days of the week repeat: its n-gram drafts are accepted, several tokens a chunk."""
    with LlamaCppBaseline(default_model, "llama.cpp-ngram", threads=2, ctx=256) as baseline:
        timings = baseline.run(prompts[1:], 32, 1)
        check_timings(timings, prompts[1:], 32)
        assert max(timings[0].chunk_sizes) > 1 and max(timings[0].chunk_sizes) <= NGRAM_DRAFT_MAX + 1
        assert baseline.last_spec_decode["num_accepted_tokens"] > 0
    with LlamaCppBaseline(default_model, "llama.cpp", threads=2, ctx=256) as baseline:
        plain = baseline.run(prompts[1:], 32, 1)
    assert plain[0].token_ids == timings[0].token_ids  # lossless: greedy speculation changes nothing


@pytest.mark.integration
@pytest.mark.slow
@requires_llama_server
def test_bench_with_llamacpp_baselines(tmp_path):
    """results.json: the baselines' figures, versions and ratios; their
    differing output is reported, and does not fail the run."""
    from loadtests.bench import run_bench

    config = BenchConfig(engine=EngineConfig(model="default"), modes=(Mode.AR,),
                         prompts=tuple(TEXTS), max_tokens=MAX_TOKENS, repeat=1, concurrency=(1, 2),
                         out_dir=tmp_path / "out", baselines=("llama.cpp", "llama.cpp-ngram"))
    results = run_bench(config, show_progress=False)
    assert set(results["modes"]) == {"ar", "llama.cpp", "llama.cpp-ngram", "ar@c2", "llama.cpp@c2",
                                     "llama.cpp-ngram@c2"}
    for name in ("llama.cpp", "llama.cpp-ngram@c2"):
        figures = results["modes"][name]
        assert figures["tokens_per_s"] > 0 and figures["num_tokens"] == figures["num_requests"] * MAX_TOKENS
    assert {"ar_vs_llama.cpp", "ar_vs_llama.cpp_ngram", "ar_vs_llama.cpp@c2"} <= set(results["ratios"])
    versions = results["setup"]["baseline_versions"]
    assert set(versions) == {"llama.cpp", "llama.cpp-ngram"} and all(versions.values())
    assert results["outputs_equal_first_mode"]["ar"] is True
    assert json.loads((tmp_path / "out" / "results.json").read_text())["setup"]["baseline_versions"] == versions
