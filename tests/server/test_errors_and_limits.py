"""Bad input gets an OpenAI-style error with the right status and loses nothing (raw HTTP)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

KEY = "sk-test-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_text_model):
    with ServerProcess("--model", str(tiny_text_model), "--served-model-name", "tiny", "--stages", "2",
                       "--max-running", "1", "--max-waiting", "0", "--max-body-bytes", "20000",
                       api_key=KEY) as server:
        yield server


def post(server, path, body, headers=AUTH, **kwargs):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json", **headers},
                      timeout=60, **kwargs)


def assert_error(response, status, *fragments, param=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def completion(**overrides):
    return {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0, **overrides}


def test_api_key_is_required_on_v1_only(server):
    assert_error(post(server, "/v1/completions", completion(), headers={}), 401, "missing API key")
    assert_error(post(server, "/v1/completions", completion(), headers={"Authorization": "Bearer nope"}), 401,
                 "incorrect API key")
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 401
    assert post(server, "/v1/completions", completion()).status_code == 200
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_api_key_from_the_environment(tiny_text_model):
    with ServerProcess("--model", str(tiny_text_model), "--served-model-name", "tiny",
                       env={"PIPEINFER_API_KEY": "sk-env"}) as env_server:
        assert post(env_server, "/v1/completions", completion(), headers={}).status_code == 401
        ok = post(env_server, "/v1/completions", completion(), headers={"Authorization": "Bearer sk-env"})
        assert ok.status_code == 200


@pytest.mark.parametrize("overrides,status,fragment,param", [
    ({"logit_bias": {"5": 1}}, 400, "unsupported parameter: logit_bias", "logit_bias"),
    ({"tools": [{"type": "function"}]}, 400, "unsupported parameter: tools", "tools"),
    ({"n": 2}, 400, "invalid value for n", "n"),
    ({"presence_penalty": 0.5}, 400, "invalid value for presence_penalty", "presence_penalty"),
    ({"logprobs": 3}, 400, "unsupported parameter: logprobs=3", "logprobs"),
    ({"frobnicate": True}, 400, "unsupported parameter(s): frobnicate", "frobnicate"),
    ({"stream": "yes"}, 400, "invalid value for stream", "stream"),
    ({"max_tokens": "4"}, 400, "invalid value for max_tokens", "max_tokens"),
    ({"temperature": 9}, 400, "invalid value for temperature", "temperature"),
    ({"prompt": ["a", "b"]}, 400, "batched prompts are not supported", "prompt"),
    ({"prompt": [1, 99999999]}, 400, "prompt token ids out of range", "prompt"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings", "stop"),
    ({"stream_options": {"include_usage": True}}, 400, "only allowed with stream: true", "stream_options"),
    ({"model": "gpt-4"}, 404, "the model 'gpt-4' does not exist", "model"),
])
def test_bad_parameters(server, overrides, status, fragment, param):
    error = assert_error(post(server, "/v1/completions", completion(**overrides)), status, fragment, param=param)
    assert "pydantic" not in error["message"] and "loc" not in error["message"]


def test_missing_field_and_broken_json(server):
    body = completion()
    del body["prompt"]
    assert_error(post(server, "/v1/completions", body), 400, "missing required parameter: prompt", param="prompt")
    assert_error(post(server, "/v1/completions", b"{not json"), 400, "not valid JSON")
    assert_error(post(server, "/v1/chat/completions", {"model": "tiny", "messages": []}), 400, "messages")


def test_prompt_longer_than_the_context_names_both_lengths(server):
    response = post(server, "/v1/completions", completion(prompt=[42] * 100, max_tokens=480))
    error = assert_error(response, 400, "context is 512 tokens", "the prompt has 100 tokens", "max_tokens asks for 480",
                         param="max_tokens")
    assert error["code"] == "context_length_exceeded"


def test_unknown_path_and_method(server):
    assert_error(httpx.get(server.url + "/v1/nothing", headers=AUTH, timeout=10), 404, "no route GET /v1/nothing")
    assert_error(httpx.get(server.url + "/v1/completions", headers=AUTH, timeout=10), 405, "no route")


def test_body_too_large(server):
    assert_error(post(server, "/v1/completions", completion(prompt="x" * 30000)), 413, "exceeds 20000 bytes")


def test_queue_full_gives_429_and_the_running_request_is_unharmed(server):
    """One request may run, none may wait: a second one at the same time gets 429."""
    chunks: list[str] = []
    started = threading.Event()

    def long_stream():
        with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=120,
                          json=completion(max_tokens=300, stream=True, ignore_eos=True)) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    chunks.append(line)
                    started.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    assert started.wait(60)
    error = assert_error(post(server, "/v1/completions", completion()), 429, "server busy")
    assert error["code"] == "queue_full"
    thread.join(120)
    assert chunks[-1] == "data: [DONE]" and len(chunks) == 300 + 2  # tokens, finish chunk, [DONE]
    assert post(server, "/v1/completions", completion()).status_code == 200


def metric(text: str, name: str, labels: str | None = None) -> list[float]:
    """Values of a Prometheus sample by name (and exact label string)."""
    values = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_part = key.partition("{")
        if sample == name and (labels is None or label_part.rstrip("}") == labels):
            values.append(float(value))
    return values


def test_client_disconnect_aborts_and_frees_kv(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                      json=completion(max_tokens=400, stream=True, ignore_eos=True)) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    # The client has hung up mid-stream.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        aborted = metric(text, "pipeinfer:request_success_total", 'finished_reason="abort"')
        kv = metric(text, "pipeinfer:kv_cache_usage_bytes")
        if aborted and aborted[0] >= 1 and kv and all(v == 0 for v in kv):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no abort / KV not freed:\n{text}")
    assert len(kv) == 2  # one gauge per stage
    assert post(server, "/v1/completions", completion()).status_code == 200


def test_metrics_exposes_the_documented_families(server):
    post(server, "/v1/completions", completion(stream=True))
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("pipeinfer:num_requests_running", "pipeinfer:num_requests_waiting",
                 "pipeinfer:request_success_total", "pipeinfer:time_to_first_token_seconds_bucket",
                 "pipeinfer:inter_token_latency_seconds_bucket", "pipeinfer:generation_tokens_total",
                 "pipeinfer:prompt_tokens_total", "pipeinfer:spec_decode_num_draft_tokens_total",
                 "pipeinfer:spec_decode_num_accepted_tokens_total", "pipeinfer:runs_cancelled_total",
                 "pipeinfer:kv_cache_usage_bytes"):
        assert name in text, name
    assert metric(text, "pipeinfer:time_to_first_token_seconds_count")[0] >= 1
