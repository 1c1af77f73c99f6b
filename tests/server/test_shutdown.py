"""Graceful shutdown of a `pipeinfer serve` process: SIGTERM stops admitting,
running requests get the grace period, then end with an error event and
[DONE]; a second signal exits at once."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess, assert_gone, process_tree

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # the real default model: streams that take a while

MODEL = "SmolLM2-135M-Instruct"


def stream_lines(url: str, max_tokens: int, out: list, started: threading.Event) -> None:
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    out.append(line)
                    started.set()
    except httpx.HTTPError as exc:
        out.append(f"transport error: {exc!r}")


def start_streams(server: ServerProcess, count: int, max_tokens: int) -> tuple[list[threading.Thread], list[list]]:
    outputs: list[list] = [[] for _ in range(count)]
    events = [threading.Event() for _ in range(count)]
    threads = [threading.Thread(target=stream_lines, args=(server.url, max_tokens, outputs[i], events[i]))
               for i in range(count)]
    for thread in threads:
        thread.start()
    for event in events:
        assert event.wait(60), "a stream never started"
    return threads, outputs


def wait_exit(server: ServerProcess, within_s: float) -> float:
    started = time.monotonic()
    server.proc.wait(within_s)
    return time.monotonic() - started


def last_events(lines: list[str]) -> tuple[dict, str]:
    """The last event before [DONE], and [DONE] itself."""
    return json.loads(lines[-2].removeprefix("data: ")), lines[-1]


def test_sigterm_ends_running_streams_after_the_grace_period():
    grace = 3.0
    with ServerProcess("--shutdown-grace", str(grace), "--max-running", "6") as server:
        tree = process_tree(server.proc.pid)
        threads, outputs = start_streams(server, 6, max_tokens=300)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):  # no longer admitting: the listener is closed
            httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi"}, timeout=5)
        took = wait_exit(server, grace + 5)
        for thread in threads:
            thread.join(10)
    assert took <= grace + 5
    for lines in outputs:
        last, done = last_events(lines)
        assert done == "data: [DONE]", lines[-3:]
        assert last["error"]["code"] == "shutting_down" and "grace period is over" in last["error"]["message"]
        assert len(lines) > 3  # tokens flowed until the grace period ended
    assert "grace period over: ending 6 running request(s)" in server.log()
    assert_gone(tree, within_s=10)


def test_streams_that_finish_within_the_grace_period_finish_normally():
    with ServerProcess("--shutdown-grace", "30") as server:
        threads, outputs = start_streams(server, 3, max_tokens=24)
        server.proc.send_signal(signal.SIGINT)  # Ctrl-C: the same graceful path
        took = wait_exit(server, 30)
        for thread in threads:
            thread.join(10)
    assert took < 20  # no waiting for the grace period once the streams are done
    for lines in outputs:
        last, done = last_events(lines)
        assert done == "data: [DONE]" and last["choices"][0]["finish_reason"] == "length"
        assert len(lines) == 24 + 2  # every token, the finish chunk, [DONE]


def test_a_second_signal_exits_at_once():
    with ServerProcess("--shutdown-grace", "60") as server:
        tree = process_tree(server.proc.pid)
        threads, _ = start_streams(server, 2, max_tokens=300)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.proc.poll() is None  # draining
        server.proc.send_signal(signal.SIGTERM)
        took = wait_exit(server, 10)
        for thread in threads:
            thread.join(10)
    assert took < 3
    assert_gone(tree, within_s=10)
