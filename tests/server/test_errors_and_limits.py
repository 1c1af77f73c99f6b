"""Bad input gets an OpenAI-style error with the right status and loses nothing (raw HTTP)."""

from __future__ import annotations

import json
import socket
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
    content = json.dumps(body) if isinstance(body, dict) else body  # or bytes, or an iterator: chunked
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


# ---- inputs that once reached a 5xx or garbage (each a 4xx naming the parameter, or a correct answer) ----

SURROGATE = "\ud800"  # a lone UTF-16 surrogate: valid JSON ("\\ud800"), not valid Unicode


def chat(**overrides):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            **overrides}


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", completion(prompt=SURROGATE), "prompt"),
    ("/v1/completions", completion(prompt=["ok", SURROGATE][1:]), "prompt"),
    ("/v1/completions", completion(stop=["x", SURROGATE]), "stop"),
    ("/v1/completions", completion(user=SURROGATE), "user"),
    ("/v1/completions", completion(model=SURROGATE), "model"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": SURROGATE}]), "messages.0.content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
     "messages.0.content"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "Hi", "name": SURROGATE}]),
     "messages.0.name"),
])
def test_a_lone_surrogate_is_a_400_naming_the_parameter(server, path, body, param):
    error = assert_error(post(server, path, body), 400, "lone surrogate")
    assert error["param"] is not None and error["param"].startswith(param), error


def test_a_surrogate_echoed_in_an_error_is_a_readable_400(server):
    error = assert_error(post(server, "/v1/completions", {**completion(), "suffix": SURROGATE}), 400,
                         "unsupported parameter: suffix=", param="suffix")
    assert "suffix='\\ud800'" in error["message"]
    assert_error(post(server, "/v1/completions", {**completion(), SURROGATE: 1}), 400, "invalid request body")


@pytest.mark.parametrize("authorization", [b"Bearer sk-\xe9\xff", b"Bearer \xc3\xa9t\xc3\xa9", b"Basic \xff"])
def test_a_non_ascii_api_key_is_a_401(server, authorization):
    response = post(server, "/v1/completions", completion(), headers={"Authorization": authorization})
    assert_error(response, 401, "API key")
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("path,body", [("/v1/completions", completion(max_tokens=8)),
                                       ("/v1/chat/completions", chat(max_tokens=8))])
@pytest.mark.parametrize("seed", [None, 1234])
@pytest.mark.parametrize("temperature", [1e-39, 1e-30, 1e-6])
def test_a_vanishing_temperature_is_greedy(server, path, body, seed, temperature):
    greedy = post(server, path, body)
    tiny = post(server, path, {**body, "temperature": temperature, "seed": seed})
    assert greedy.status_code == tiny.status_code == 200, tiny.text
    key = "text" if path == "/v1/completions" else "message"
    assert tiny.json()["choices"][0][key] == greedy.json()["choices"][0][key]


# ---- limits that hold, refused readably ----

def test_a_30_mb_body_gets_a_readable_413(server):
    response = post(server, "/v1/completions", b'{"prompt": "' + b"x" * (30 << 20) + b'"}')
    assert_error(response, 413, "exceeds 20000 bytes")


def test_a_chunked_body_over_the_limit_gets_a_readable_413(server):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(150):
            yield b"y" * 10_000  # 1.5 MB in all, no content-length
        yield b'"}'

    assert_error(post(server, "/v1/completions", chunks()), 413, "exceeds 20000 bytes")


def test_a_huge_header_is_refused_at_once_and_health_stays_fast(server):
    # The huge request is built before the clock starts: httpx checking a 100 MB
    # header value in this process held the GIL the health request needs (1.1 s).
    refused = {}
    with httpx.Client(timeout=60) as client:  # closed on a failed assertion too
        request = client.build_request("GET", server.url + "/health", headers={"x-big": "z" * (100 << 20)})

        def huge_header():
            refused["response"] = client.send(request)

        thread = threading.Thread(target=huge_header)
        thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 1.0
        thread.join(60)
    assert_error(refused["response"], 431, "request headers exceed 16384 bytes")


@pytest.mark.parametrize("headers,fragment", [
    ({"x-big": "z" * 40_000}, "request headers exceed 16384 bytes"),
    ({f"x-h{i}": "1" for i in range(120)}, "more than 100 request headers"),
])
def test_too_many_or_too_large_headers_get_a_431_body(server, headers, fragment):
    assert_error(httpx.get(server.url + "/health", headers=headers, timeout=10), 431, fragment)


def test_a_malformed_request_gets_a_400_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
        reply = sock.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 400") and '"invalid HTTP request"' in reply


def test_refusals_are_counted(server):
    def rejected(status: str) -> float:
        return sum(metric(httpx.get(server.url + "/metrics", timeout=10).text, "pipeinfer:request_rejected_total",
                          f'status="{status}"'))

    before = {status: rejected(status) for status in ("400", "401", "413", "431")}
    post(server, "/v1/completions", completion(prompt=SURROGATE))
    post(server, "/v1/completions", completion(), headers={})
    post(server, "/v1/completions", completion(prompt="x" * 30000))
    httpx.get(server.url + "/health", headers={"x-big": "z" * 40_000}, timeout=10)
    for status in before:
        assert rejected(status) == before[status] + 1, status
