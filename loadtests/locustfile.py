"""Locust load test for pipeinfer's OpenAI-compatible API (or any such server).

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s \\
        --host http://127.0.0.1:8000 --csv out/locust

Four user kinds, one endpoint each: completions, chat, streaming chat (weight
3: what most clients do) and streaming completions. Streams are timed token by
token and reported as extra stats rows next to the request rows:

    TTFT  /v1/chat/completions [stream]   request sent -> first token chunk
    ITL   /v1/chat/completions [stream]   gap between consecutive token chunks

(one event per gap: the server sends one chunk per token, so several tokens
accepted at once by speculation show up as near-zero gaps). For streams the
request row's response time is the whole stream, first byte sent to [DONE].

Prompts and output lengths are drawn from weighted mixes (short question,
medium instruction, long context; short/medium/long outputs); see --help under
"Custom arguments" for --model, --api-key, --max-tokens-scale, --temperature,
--think-time and --stop-at-eos. A ramp of concurrency: add loadtests/ramp_shape.py.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import requests
from locust import HttpUser, events, task
from locust.env import Environment
from locust.exception import StopUser

# (connect, read) seconds; the read timeout is per read, so a long stream is fine.
TIMEOUT_S = (10.0, 600.0)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    parser.add_argument("--model", default="", help="model name to send (default: the first that GET /v1/models lists)")
    parser.add_argument("--api-key", default="", env_var="PIPEINFER_API_KEY", is_secret=True,
                        help="sent as Authorization: Bearer KEY (default: $PIPEINFER_API_KEY, else none)")
    parser.add_argument("--max-tokens-scale", type=float, default=1.0,
                        help="multiplies every drawn output length (e.g. 0.1 for a quick run on a CPU)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature of every request; 0 = greedy (default 0.7)")
    parser.add_argument("--think-time", type=float, default=0.0,
                        help="each user waits uniform(0, this) seconds between requests (default 0: "
                             "users = requests in flight)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="let the model stop at end-of-text (default: ignore_eos, so the drawn output "
                             "length is what is generated and measured)")


@dataclass(frozen=True, slots=True)
class Settings:
    model: str = ""
    api_key: str = ""
    max_tokens_scale: float = 1.0
    temperature: float = 0.7
    think_time: float = 0.0
    stop_at_eos: bool = False

    @classmethod
    def of(cls, environment: Environment) -> Settings:
        # parsed_options is None under locust.run_single_user (debugging): defaults then.
        options = environment.parsed_options
        return cls(**{name: getattr(options, name) for name in cls.__dataclass_fields__ if hasattr(options, name)})


# --- The mixes -------------------------------------------------------------

SHORT_PROMPTS = (
    "What is the capital of Australia?",
    "Explain recursion in one sentence.",
    "Give me three synonyms for 'fast'.",
    "How many legs does a spider have?",
)
MEDIUM_PROMPTS = (
    "Write a short product description for a stainless steel water bottle that keeps drinks cold for 24 "
    "hours and hot for 12. Mention that it is dishwasher safe, comes in five colours and has a leak-proof "
    "lid. Keep the tone friendly and end with a call to action.",
    "I am planning a three-day trip to Lisbon in early spring with a limited budget. Suggest an itinerary "
    "with one neighbourhood per day, a cheap place to eat for lunch, and one free activity each evening. "
    "Use a bulleted list.",
    "Rewrite the following sentence so that it is clearer and more formal, then explain in two sentences "
    "what you changed and why: 'so basically the thing broke because nobody checked the logs before they "
    "pushed the update on friday night'.",
)
_INCIDENT_REPORT = (
    "Incident report, payments service. On Tuesday at 14:02 UTC the on-call engineer was paged because the "
    "error rate of the checkout API rose from its usual 0.1% to 7%. The dashboards showed that most failing "
    "requests timed out while waiting for the database connection pool, which had been reduced from 50 to 20 "
    "connections in a configuration change deployed at 13:45 as part of a cost-saving effort. The change had "
    "been reviewed, but the reviewer assumed that traffic was at its weekly low, when in fact a marketing "
    "campaign had started at 14:00 and traffic was nearly three times higher than on a normal Tuesday. At "
    "14:10 the engineer rolled back the configuration, but the error rate only fell to 3% because the retry "
    "logic in the mobile clients had built up a backlog: every failed request was retried up to five times "
    "with a fixed delay of one second, so the service kept receiving bursts of traffic well above its "
    "capacity. At 14:25 the team enabled rate limiting at the load balancer, which rejected the excess "
    "retries with a clear status code, and the backlog drained within eight minutes. By 14:35 the error rate "
    "was back to normal. About 4,300 checkouts failed during the incident; 3,900 of those customers retried "
    "successfully later the same day, and the support team contacted the remaining customers with a discount "
    "code. The root causes were the undersized connection pool, a review process that did not include "
    "traffic forecasts, and client retry logic without exponential backoff or jitter. Follow-up actions: add "
    "the marketing calendar to the change review checklist, alert when the connection pool is more than 80% "
    "used for five minutes, change the mobile clients to use exponential backoff with jitter and a maximum "
    "of three retries, and run a load test of the checkout path before every configuration change that "
    "affects capacity. The owner of each action will report progress at the next weekly operations review."
)
LONG_PROMPTS = (
    _INCIDENT_REPORT + "\n\nSummarize the incident above in three bullet points for an executive audience.",
    _INCIDENT_REPORT + "\n\nList every time mentioned above with what happened at that time, as a table.",
)
SYSTEM_PROMPT = "You are a helpful assistant. Answer clearly and concisely."

# (weight, texts): most traffic is short questions, some long-context work.
PROMPT_MIX = ((0.5, SHORT_PROMPTS), (0.35, MEDIUM_PROMPTS), (0.15, LONG_PROMPTS))
# (weight, (fewest, most) tokens), drawn independently of the prompt, then * --max-tokens-scale.
OUTPUT_MIX = ((0.5, (16, 64)), (0.35, (128, 256)), (0.15, (512, 1024)))

# No tokenizer here: a prompt is guessed at one token per 3 characters (English
# BPE runs ~4) plus room for the chat template, to keep prompt + max_tokens
# within the model's context (a 400 otherwise).
CHARS_PER_TOKEN = 3
TEMPLATE_TOKENS = 48


def estimated_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + TEMPLATE_TOKENS


def draw_request(rng: random.Random, max_model_len: int | None, scale: float) -> tuple[str, int]:
    """A prompt and its max_tokens, both from the mixes, kept within the context."""
    candidates = [(text, weight / len(texts)) for weight, texts in PROMPT_MIX for text in texts
                  if max_model_len is None or estimated_tokens(text) < max_model_len]
    if not candidates:
        logging.getLogger(__name__).error("no built-in prompt fits a context of %s tokens", max_model_len)
        raise StopUser()
    [prompt] = rng.choices([text for text, _ in candidates], weights=[w for _, w in candidates])
    [(low, high)] = rng.choices([bounds for _, bounds in OUTPUT_MIX], weights=[w for w, _ in OUTPUT_MIX])
    max_tokens = max(1, round(rng.randint(low, high) * scale))
    if max_model_len is not None:
        max_tokens = min(max_tokens, max_model_len - estimated_tokens(prompt))
    return prompt, max_tokens


# --- The served model, cached per Locust process (the first users may each ask) ---

@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    max_model_len: int | None  # pipeinfer's (and vLLM's) extension of the model card


_served: ServedModel | None = None


def error_message(response: requests.Response) -> str:
    """'STATUS: message' from an OpenAI error body, else the body's start."""
    if getattr(response, "error", None) is not None:  # Locust's stand-in for a connection error
        return repr(response.error)
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    return f"{response.status_code}: {message}"


def is_success(response: requests.Response) -> bool:
    return 200 <= response.status_code < 300  # not response.ok: it raises for Locust's connection errors


# --- Users -----------------------------------------------------------------

class PipeinferUser(HttpUser):
    """Shared setup. HttpUser (requests) rather than FastHttpUser: its
    iter_lines() hands over each chunk of a chunked SSE body as it arrives, and
    the client's own cost is noise next to LLM latencies."""

    abstract = True
    host = "http://127.0.0.1:8000"  # pipeinfer serve's default; --host overrides

    def on_start(self) -> None:
        self.settings = Settings.of(self.environment)
        self.headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        self.rng = random.Random()
        self.served = self._served_model()

    def wait_time(self) -> float:
        return self.rng.uniform(0.0, self.settings.think_time)

    def _served_model(self) -> ServedModel:
        global _served
        if _served is None:
            with self.client.get("/v1/models", headers=self.headers, name="/v1/models", catch_response=True,
                                 timeout=TIMEOUT_S) as response:
                if not is_success(response):
                    response.failure(error_message(response))
                    raise StopUser()
                cards = {card["id"]: card for card in response.json()["data"]}
            name = self.settings.model or next(iter(cards))
            _served = ServedModel(name, cards.get(name, {}).get("max_model_len"))
        return _served

    def body(self, max_tokens_field: str) -> tuple[str, dict[str, Any]]:
        prompt, max_tokens = draw_request(self.rng, self.served.max_model_len, self.settings.max_tokens_scale)
        return prompt, {"model": self.served.name, max_tokens_field: max_tokens,
                        "temperature": self.settings.temperature, "ignore_eos": not self.settings.stop_at_eos}

    def chat_body(self) -> dict[str, Any]:
        prompt, body = self.body("max_completion_tokens")
        return {**body, "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]}

    def completion_body(self) -> dict[str, Any]:
        prompt, body = self.body("max_tokens")
        return {**body, "prompt": prompt}

    def post(self, path: str, body: dict[str, Any]) -> None:
        with self.client.post(path, json=body, headers=self.headers, name=path, catch_response=True,
                              timeout=TIMEOUT_S) as response:
            if not is_success(response):
                response.failure(error_message(response))
                return
            try:
                response.json()["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                response.failure(f"not a completion: {exc!r}")

    def stream(self, path: str, body: dict[str, Any]) -> None:
        name = f"{path} [stream]"
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()  # before the request: TTFT includes queueing and prefill
        with self.client.post(path, json=body, headers=self.headers, name=name, stream=True,
                              catch_response=True, timeout=TIMEOUT_S) as response:
            if not is_success(response):
                response.failure(error_message(response))
                return
            token_times, n_bytes, error = read_token_stream(response, chat="chat" in path)
            # Locust times a stream=True request to its headers; report the whole stream instead.
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            response.request_meta["response_length"] = n_bytes
            if error:
                response.failure(error)
                return
        fire = self.environment.events.request.fire
        context = self.context()
        if token_times:
            fire(request_type="TTFT", name=name, response_time=(token_times[0] - start) * 1000,
                 response_length=0, exception=None, context=context)
        for previous, current in zip(token_times, token_times[1:]):
            fire(request_type="ITL", name=name, response_time=(current - previous) * 1000,
                 response_length=0, exception=None, context=context)


def read_token_stream(response: requests.Response, chat: bool) -> tuple[list[float], int, str | None]:
    """Arrival times of the token chunks of an SSE body, the bytes read, and
    an error message if the stream failed or did not end with [DONE]."""
    token_times: list[float] = []
    n_bytes = 0
    try:
        for line in response.iter_lines():
            n_bytes += len(line) + 1
            if not line.startswith(b"data:"):
                continue  # blank separators, comments
            data = line[len(b"data:"):].strip()
            if data == b"[DONE]":
                return token_times, n_bytes, None
            chunk = json.loads(data)
            if "error" in chunk:  # an error after the 200 was sent
                return token_times, n_bytes, f"in stream: {chunk['error'].get('message')}"
            if is_token_chunk(chunk, chat):
                token_times.append(time.perf_counter())
    except (requests.RequestException, ValueError) as exc:
        return token_times, n_bytes, f"stream broken: {exc!r}"
    return token_times, n_bytes, "stream ended without data: [DONE]"


def is_token_chunk(chunk: dict[str, Any], chat: bool) -> bool:
    """Not the chat role opener, the finish chunk or the usage chunk. Held-back
    text (a stop string's prefix, half a UTF-8 character) still counts: it is a token."""
    choices = chunk.get("choices") or []
    if not choices or choices[0].get("finish_reason") is not None:
        return False
    if not chat:
        return True
    delta = choices[0].get("delta") or {}
    return delta.get("content") is not None and not ("role" in delta and delta["content"] == "")


class CompletionUser(PipeinferUser):
    weight = 1

    @task
    def completion(self) -> None:
        self.post("/v1/completions", self.completion_body())


class ChatUser(PipeinferUser):
    weight = 1

    @task
    def chat(self) -> None:
        self.post("/v1/chat/completions", self.chat_body())


class StreamingChatUser(PipeinferUser):
    weight = 3

    @task
    def streaming_chat(self) -> None:
        self.stream("/v1/chat/completions", self.chat_body())


class StreamingCompletionUser(PipeinferUser):
    weight = 1

    @task
    def streaming_completion(self) -> None:
        self.stream("/v1/completions", self.completion_body())
