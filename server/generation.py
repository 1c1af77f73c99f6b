"""Run one prepared request on the engine: text deltas per token, stop
strings, usage, metrics. Streaming and non-streaming responses share it."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from compute.types import FailureCode
from pipeline.engine import Engine
from pipeline.types import GenerationStats, TokenEvent
from server.errors import APIError
from server.metrics import ServerMetrics
from server.protocol import Speculation, Usage
from server.requests import PreparedRequest
from server.text_stream import TextStream

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TokenDelta:
    text: str


@dataclass(slots=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    usage: Usage


async def run_generation(engine: Engine, prepared: PreparedRequest, metrics: ServerMetrics
                         ) -> AsyncIterator[TokenDelta | Finished]:
    """One TokenDelta per generated token (its text may be empty while held
    back), then one Finished. Closing this iterator early (a client that hung
    up) aborts the request, which frees its KV on every stage."""
    text = TextStream(engine.tokenizer, prepared.stop)
    stream = engine.stream(prepared.generation)
    start = last_token_at = time.perf_counter()
    try:
        async for event in stream:
            if isinstance(event, TokenEvent):
                for token_id in event.token_ids:
                    if text.is_stopped:
                        break  # tokens after a stop string, arriving before the abort lands
                    now = time.perf_counter()
                    if text.token_ids:
                        metrics.itl.observe(now - last_token_at)
                    else:
                        metrics.ttft.observe(now - start)
                    last_token_at = now
                    yield TokenDelta(text.add(token_id))
                    if text.is_stopped:
                        stream.abort()
                continue
            if event.finish_reason == "error":  # the client's fault is not counted as the server's
                metrics.record_finish("bad_request" if event.failure.code is FailureCode.BAD_REQUEST else "error",
                                      event.stats)
                raise APIError.of(event.failure)
            reason = "stop" if text.is_stopped else event.finish_reason
            tail = text.flush()
            if tail:
                yield TokenDelta(tail)
            stats = event.stats
            stats.num_generated_tokens = len(text.token_ids)  # what the client got, up to a stop string
            metrics.record_finish(reason, stats)
            log.info("request finished: %s, %d prompt + %d generated tokens, %.1f tok/s, acceptance %.2f%s", reason,
                     stats.num_prompt_tokens, stats.num_generated_tokens, stats.tokens_per_s, stats.acceptance_rate,
                     f", user {prepared.user!r}" if prepared.user else "")
            yield Finished(reason, usage_of(stats))
    finally:
        if not stream.is_finished:  # the client went away (or the server is stopping)
            await stream.aclose()
            metrics.record_finish("abort", GenerationStats(num_prompt_tokens=len(prepared.generation.prompt_token_ids),
                                                           num_generated_tokens=len(text.token_ids)))


def usage_of(stats: GenerationStats) -> Usage:
    return Usage(
        prompt_tokens=stats.num_prompt_tokens,
        completion_tokens=stats.num_generated_tokens,
        total_tokens=stats.num_prompt_tokens + stats.num_generated_tokens,
        speculation=Speculation(
            draft_tokens=stats.num_draft_tokens,
            accepted_tokens=stats.num_accepted_tokens,
            acceptance_rate=round(stats.acceptance_rate, 4),
            mean_accepted_len=round(stats.mean_accepted_len, 4),
        ),
    )


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"
