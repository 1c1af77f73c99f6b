"""From an OpenAI request to the engine's GenerationRequest, refusing what we
cannot honour with a 400 that names the parameter."""

from __future__ import annotations

from dataclasses import dataclass

from compute.types import GenerationRequest, SamplingParams, check_context
from pipeline.engine import Engine
from server.errors import APIError
from server.protocol import (
    NEUTRAL_VALUES,
    ChatCompletionRequest,
    CompletionRequest,
    is_valid_unicode,
)

MAX_STOP_STRINGS = 4


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    generation: GenerationRequest
    stop: list[str]
    stream: bool
    include_usage: bool
    user: str | None = None  # the client's end-user id: logged, nothing else


def prepare_completion(body: CompletionRequest, engine: Engine) -> PreparedRequest:
    _refuse_unsupported(body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, f"batched prompts are not supported: send one prompt per request (got {len(prompt)})",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = engine.encode(prompt)
    else:
        prompt_ids = list(prompt)
        if not prompt_ids:
            raise APIError(400, "prompt is empty", param="prompt")
        vocab = engine.model_config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    return _prepare(body, engine, prompt_ids, max_tokens, "max_tokens")


def prepare_chat(body: ChatCompletionRequest, engine: Engine) -> PreparedRequest:
    _refuse_unsupported(body)
    if engine.tokenizer is None or not getattr(engine.tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": _message_text(m.content, i)} for i, m in enumerate(body.messages)]
    prompt_ids = engine.encode_chat(messages)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens or body.max_tokens or max(1, engine.max_context - len(prompt_ids))
    return _prepare(body, engine, prompt_ids, max_tokens, param)


def _prepare(body, engine: Engine, prompt_ids: list[int], max_tokens: int, max_param: str) -> PreparedRequest:
    check_context(len(prompt_ids), max_tokens, engine.max_context, max_param)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}", param="stop")
    top_k = body.top_k if body.top_k and body.top_k > 0 else 0
    sampling = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        seed=body.seed,
    )
    stop_token_ids = frozenset() if body.ignore_eos else engine.eos_token_ids
    generation = GenerationRequest(tuple(prompt_ids), max_tokens, sampling, stop_token_ids)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return PreparedRequest(generation, stop, bool(body.stream), include_usage, body.user)


def _refuse_unsupported(body) -> None:
    extra = body.model_extra or {}
    unknown = sorted(set(extra) - set(NEUTRAL_VALUES))
    if unknown:
        raise APIError(400, f"unsupported parameter(s): {', '.join(unknown)}", param=unknown[0])
    for name, value in extra.items():
        neutral = NEUTRAL_VALUES[name]
        if value not in neutral:
            raise APIError(400, f"unsupported parameter: {name}={value!r} (only {neutral[-1]!r} is supported)",
                           param=name)


def _message_text(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}]: only text content parts are supported",
                           param=f"messages.{index}.content")
        if not is_valid_unicode(part["text"]):
            raise APIError(400, f"messages[{index}]: a text part holds a lone surrogate (not valid Unicode)",
                           param=f"messages.{index}.content")
        parts.append(part["text"])
    return "".join(parts)
