"""A real `pipeinfer serve` process on loopback, driven by the official openai client."""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from tests.helpers import ServerProcess, greedy_reference

pytestmark = pytest.mark.integration

MODES = ["ar", "sync", "pipeinfer"]
PROMPT = "Once upon a time, in a land far away,"


@pytest.fixture(scope="module", params=MODES)
def tiny_server(request, tiny_text_model):
    with ServerProcess("--model", str(tiny_text_model), "--draft", "layers:2", "--stages", "2",
                       "--mode", request.param, "--served-model-name", "tiny") as server:
        yield server, request.param


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def greedy_text(model_dir, tokenizer, prompt_ids, max_tokens) -> tuple[str, int]:
    ids = greedy_reference(model_dir, prompt_ids, max_tokens)
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def test_completion_equals_greedy_reference(tiny_server, tiny_text_model, tokenizer):
    server, mode = tiny_server
    client = client_for(server)
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0,
                                       extra_body={"ignore_eos": True})
    expected, n = greedy_text(tiny_text_model, tokenizer, tokenizer.encode(PROMPT), 20)
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "length"
    usage = result.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(tokenizer.encode(PROMPT)), n)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    speculation = usage.model_extra["speculation"]
    assert set(speculation) == {"draft_tokens", "accepted_tokens", "acceptance_rate", "mean_accepted_len"}
    if mode == "sync":  # it waits for its guesses; pipeinfer mode launches them only if they are in time and
        assert speculation["draft_tokens"] > 0  # worth it (this draft costs what the tiny target does, on its cores)


def test_streaming_equals_non_streaming(tiny_server):
    server, _ = tiny_server
    client = client_for(server)
    kwargs = dict(model="tiny", max_tokens=15, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt=PROMPT, **kwargs)
    chunks = list(client.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kwargs))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert len(text_chunks) == 15 + 1  # one chunk per token, then the finish chunk
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 15 and not chunks[-1].choices


def test_chat_streaming_equals_non_streaming(tiny_server, tiny_text_model, tokenizer):
    server, _ = tiny_server
    client = client_for(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    kwargs = dict(model="tiny", messages=messages, max_completion_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kwargs)
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected, _ = greedy_text(tiny_text_model, tokenizer, list(prompt_ids), 12)
    assert full.choices[0].message.content == expected
    assert full.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    assert stream[-1].usage.completion_tokens == 12


def test_stop_strings_never_leak(tiny_server, tiny_text_model, tokenizer):
    server, _ = tiny_server
    client = client_for(server)
    expected, _ = greedy_text(tiny_text_model, tokenizer, tokenizer.encode(PROMPT), 20)
    stop = expected[len(expected) // 2 : len(expected) // 2 + 3]  # three characters from the middle
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop, "\x00never"],
                  extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs)
    assert full.choices[0].text == expected[: expected.index(stop)]
    assert full.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)
    assert streamed == full.choices[0].text


def test_requests_are_logged_with_their_user(tiny_server):
    server, _ = tiny_server
    client_for(server).completions.create(model="tiny", prompt=PROMPT, max_tokens=3, temperature=0, user="alice-42")
    assert "user 'alice-42'" in server.log()


def test_seeded_sampling_repeats(tiny_server):
    server, _ = tiny_server
    client = client_for(server)
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.8, top_p=0.9, seed=1234,
                  extra_body={"ignore_eos": True, "top_k": 50})
    first = client.completions.create(**kwargs).choices[0].text
    assert client.completions.create(**kwargs).choices[0].text == first


def test_models_endpoint(tiny_server):
    server, _ = tiny_server
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_default_model_over_http_equals_greedy(default_model, tokenizer, mode):
    with ServerProcess("--mode", mode, "--draft", "ngram", "--stages", "2") as server:
        client = client_for(server)
        models = client.models.list()
        name = models.data[0].id
        assert name == "SmolLM2-135M-Instruct"
        result = client.completions.create(model=name, prompt="The capital of France is", max_tokens=16, temperature=0)
        expected, _ = greedy_text(default_model, tokenizer, tokenizer.encode("The capital of France is"), 16)
        assert result.choices[0].text == expected and "Paris" in expected
        chat = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=20, temperature=0)
        assert "Paris" in chat.choices[0].message.content


@pytest.mark.slow
def test_serve_with_no_flags_speculates_and_says_why(default_model, tokenizer):
    """`pipeinfer serve` as the README's first command starts it: the
    defaults' draft, stages and mode, named with their reasons in /health
    and the startup log; guesses accepted on a prompt whose answer copies
    it; the target's greedy text."""
    import httpx

    with ServerProcess() as server:
        config = httpx.get(server.url + "/health", timeout=30).json()["config"]
        assert (config["draft"], config["stages"], config["mode"]) == ("ngram+head:default", 1, "sync")
        assert [d["setting"] for d in config["defaults"]] == ["draft", "stages", "mode"]
        assert all(d["why"] for d in config["defaults"])
        prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over"
        result = client_for(server).completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=24,
                                                       temperature=0)
        expected, _ = greedy_text(default_model, tokenizer, tokenizer.encode(prompt), 24)
        assert result.choices[0].text == expected
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        accepted = [line for line in metrics.splitlines()
                    if line.startswith("pipeinfer:spec_decode_num_accepted_tokens_total")]
        assert accepted and float(accepted[0].split()[-1]) > 0, metrics
    assert "by default, draft auto: " in server.log() and "by default, mode sync: " in server.log()
