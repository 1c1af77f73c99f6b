"""`pipeinfer serve --transport ray` as users run it: the private Ray lives as
long as the server, listens on loopback only, restarts a killed stage, and
nothing of it is left once the server exits."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

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
        text = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
        assert text == tokenizer.decode(greedy_reference(tiny_text_model, tokenizer.encode(prompt), 12))

        everything = tree + process_tree(server.proc.pid)  # the restarted actor too
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(2 + 5)
    assert_gone(everything, within_s=10)
