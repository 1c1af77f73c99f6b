"""`pipeinfer serve --transport ray` as users run it: the private Ray lives as
long as the server, listens on loopback only, restarts a killed stage, and
nothing of it is left once the server exits."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from transformers import AutoTokenizer

from tests.helpers import (
    ServerProcess,
    assert_gone,
    greedy_reference,
    listening_addresses,
    process_tree,
)

pytestmark = pytest.mark.integration

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def stages(server) -> list[dict]:
    return httpx.get(server.url + "/health", timeout=30).json()["stages"]


def private_ray_dirs(processes: list[psutil.Process]) -> set[Path]:
    """The private Ray directories these processes name on their command
    lines (the server's reaper and Ray's own do): theirs alone, not those of
    a test running beside this one on another worker."""
    lines = []
    for process in processes:
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.Error:
            pass
    return {d for d in Path("/tmp").glob("pipeinfer-ray-*") if any(str(d) in line for line in lines)}


def test_private_ray_restarts_a_killed_stage_and_leaves_nothing(tiny_text_model):
    with ServerProcess("--model", str(tiny_text_model), "--served-model-name", "tiny", "--stages", "2",
                       "--transport", "ray", "--shutdown-grace", "2") as server:
        tree = process_tree(server.proc.pid)  # recorded at startup: orphans would be re-parented later
        assert {"gcs_server", "raylet"} <= {p.name() for p in tree}
        time.sleep(3)  # the engine loader thread, which started Ray, has long exited
        heads = [p for p in tree if p.name() in ("gcs_server", "raylet")]
        assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in heads)

        addresses = listening_addresses([psutil.Process(server.proc.pid), *process_tree(server.proc.pid)])
        assert addresses and set(addresses) <= set(LOOPBACK), addresses

        # A stage actor dies mid-stream: that stream ends with an error event, promptly.
        victim = stages(server)[1]["pid"]
        lines: list[str] = []
        started = threading.Event()

        def long_stream():
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 500, "stream": True, "ignore_eos": True,
                    "temperature": 0}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
                for line in response.iter_lines():
                    if line:
                        lines.append(line)
                        started.set()

        thread = threading.Thread(target=long_stream)
        thread.start()
        assert started.wait(60)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        thread.join(60)
        assert not thread.is_alive() and time.monotonic() - killed_at < 30
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2].removeprefix("data: "))["error"]
        assert error["code"] == "stage_down", error  # "a stage process died" or "a pipeline stage stopped"

        # The stage comes back with its weights, and serves the right tokens.
        deadline = time.monotonic() + 60
        while httpx.get(server.url + "/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the stage never came back"
            time.sleep(0.5)
        assert stages(server)[1]["pid"] != victim
        prompt = "The capital of France is"
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
        assert "choices" in answer, answer
        text = answer["choices"][0]["text"]
        tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
        assert text == tokenizer.decode(greedy_reference(tiny_text_model, tokenizer.encode(prompt), 12))

        everything = tree + process_tree(server.proc.pid)  # the restarted actor too
        ray_dirs = private_ray_dirs(everything)
        assert ray_dirs
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        server.proc.wait(10)
    assert_gone(everything, within_s=10 - (time.monotonic() - signalled))  # 10 s from the signal, all of it
    assert not any(d.exists() for d in ray_dirs)


def test_a_second_signal_exits_at_once_and_the_reaper_still_cleans_up(tiny_text_model):
    """SIGINT twice (an impatient Ctrl-C) while a stream holds the grace
    period open: the server exits at once, without its own cleanup; the
    reaper it started removes the private Ray within 10 s."""
    with ServerProcess("--model", str(tiny_text_model), "--served-model-name", "tiny", "--stages", "2",
                       "--transport", "ray") as server:
        everything = process_tree(server.proc.pid)
        ray_dirs = private_ray_dirs(everything)
        assert {"gcs_server", "raylet"} <= {p.name() for p in everything} and ray_dirs
        streaming = threading.Event()

        def long_stream():
            body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2000, "stream": True, "ignore_eos": True}
            try:
                with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
                    for _ in response.iter_lines():
                        streaming.set()
            except httpx.HTTPError:
                pass  # cut off by the exit: expected

        threading.Thread(target=long_stream, daemon=True).start()
        assert streaming.wait(60)
        server.proc.send_signal(signal.SIGINT)  # a 10 s grace period begins
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGINT)
        signalled = time.monotonic()
        server.proc.wait(3)
    assert_gone(everything, within_s=10 - (time.monotonic() - signalled))
    deadline = signalled + 10
    while any(d.exists() for d in ray_dirs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(d.exists() for d in ray_dirs)
