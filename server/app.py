"""The OpenAI-compatible FastAPI gateway. The engine stays behind one
async-generator interface (server.generation.run_generation)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Header, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from server.engine_host import EngineHost
from server.errors import ERROR_RESPONSES, APIError, error_event, install_error_handlers
from server.generation import Finished, run_generation, sse
from server.limits import Admission, RequestLimits, check_api_key
from server.metrics import ServerMetrics
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
)
from server.requests import PreparedRequest, prepare_chat, prepare_completion
from server.settings import ServerSettings
from server.shutdown import Shutdown

log = logging.getLogger(__name__)

# With stream: true the 200 is Server-Sent Events; each event's data is a JSON
# chunk, an error object, or "[DONE]" (OpenAPI 3.1: the schema describes one event).
STREAM_OR_JSON = {"content": {"text/event-stream": {"schema": {
    "type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}}}}


# Where the gateway listens unless told: this machine only.
def create_app(host: EngineHost, settings: ServerSettings) -> FastAPI:
    metrics = ServerMetrics(lambda: _stage_stats_or_none(host))
    admission = Admission(settings.max_running_requests, settings.max_waiting_requests)
    shutdown = Shutdown(admission, host, settings.shutdown_grace_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        host.start()
        yield
        await asyncio.to_thread(host.close)

    app = FastAPI(title="pipeinfer", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway to a pipelined, speculative inference engine.")
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_body_bytes, max_header_bytes=settings.max_header_bytes,
                       max_headers=settings.max_headers, on_rejected=metrics.count_rejected)
    install_error_handlers(app, metrics.count_rejected)
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.shutdown = shutdown

    def authorized(authorization: str | None = Header(None, include_in_schema=False)) -> None:
        check_api_key(authorization, settings.api_keys)

    async def ready_engine():
        state = await asyncio.to_thread(lambda: host.state)  # with Ray this asks every stage actor
        if state == "loading":
            raise APIError(503, "the model is still loading; retry shortly", code="loading")
        if state != "ok":
            why = host.failure.message if host.failure else "a stage is down"
            raise APIError(503, f"the engine is not healthy ({state}): {why}", code="unhealthy")
        return host.engine

    def check_model(name: str) -> None:
        if name != settings.served_model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{settings.served_model_name}'", param="model", code="model_not_found")

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "not ready"}})
    async def health():
        # Off the event loop: with Ray these ask every stage actor.
        state = await asyncio.to_thread(lambda: host.state)
        stages = await asyncio.to_thread(_stage_stats_or_none, host)
        draft = host.engine.draft_where() if host.engine is not None else None
        config = host.engine.configuration() if host.engine is not None else None
        body = Health(status=state, stages=stages, draft=draft, config=config,
                      detail=host.failure and host.failure.message)
        return JSONResponse(body.model_dump(), status_code=200 if state == "ok" else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        metrics.requests_running.set(admission.running)
        metrics.requests_waiting.set(admission.waiting)
        return PlainTextResponse(await asyncio.to_thread(metrics.render), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)], responses=ERROR_RESPONSES)
    async def list_models():
        max_len = host.engine.max_context if host.engine is not None else 0
        return ModelList(data=[ModelCard(id=settings.served_model_name, max_model_len=max_len)])

    @app.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(authorized)],
              responses={**ERROR_RESPONSES, 200: STREAM_OR_JSON})
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        engine = await ready_engine()
        prepared = prepare_completion(body, engine)
        return await _respond(request, engine, prepared, "text_completion", body.model)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, dependencies=[Depends(authorized)],
              responses={**ERROR_RESPONSES, 200: STREAM_OR_JSON})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        engine = await ready_engine()
        prepared = prepare_chat(body, engine)
        return await _respond(request, engine, prepared, "chat.completion", body.model)

    async def _respond(request: Request, engine, prepared: PreparedRequest, kind: str, model: str):
        await admission.acquire()
        if prepared.stream:
            chunks = _stream_chunks(engine, prepared, kind, model)
            return StreamingResponse(_released_after(chunks), media_type="text/event-stream")
        try:
            return await _until_disconnected(request, _complete(engine, prepared, kind, model))
        finally:
            await admission.release()

    async def _released_after(chunks):
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
            await admission.release()

    async def _complete(engine, prepared: PreparedRequest, kind: str, model: str):
        parts, finished = [], None
        async for item in run_generation(engine, prepared, metrics):
            if isinstance(item, Finished):
                finished = item
            else:
                parts.append(item.text)
        text = "".join(parts)
        if kind == "chat.completion":
            choice = ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason=finished.finish_reason)
            return ChatCompletionResponse(model=model, choices=[choice], usage=finished.usage)
        choice = CompletionChoice(index=0, text=text, finish_reason=finished.finish_reason)
        return CompletionResponse(model=model, choices=[choice], usage=finished.usage)

    async def _stream_chunks(engine, prepared: PreparedRequest, kind: str, model: str):
        response = (ChatCompletionResponse if kind == "chat.completion" else CompletionResponse)(model=model, choices=[])
        head = {"id": response.id, "created": response.created, "model": model}
        is_chat = kind == "chat.completion"
        chunk_object = "chat.completion.chunk" if is_chat else "text_completion"

        def chunk(text: str | None, finish_reason: str | None, first: bool = False) -> dict:
            if is_chat:
                delta = {} if text is None else ({"role": "assistant", "content": text} if first else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return {**head, "object": chunk_object, "choices": [choice]}

        if is_chat:
            yield sse(chunk("", None, first=True))
        try:
            async for item in run_generation(engine, prepared, metrics):
                if isinstance(item, Finished):
                    yield sse(chunk(None, item.finish_reason))
                    if prepared.include_usage:
                        yield sse({**head, "object": chunk_object, "choices": [], "usage": item.usage.model_dump()})
                else:
                    yield sse(chunk(item.text, None))
        except APIError as exc:
            yield sse(error_event(exc))
        yield sse("[DONE]")

    def openapi_with_served_model():
        """The schema names the one model this server serves (an enum)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [settings.served_model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi_with_served_model
    return app


def _stage_stats_or_none(host: EngineHost) -> list[dict]:
    """Stage stats for /health; none while loading or when a stage cannot answer."""
    try:
        return host.engine.stage_stats() if host.engine is not None else []
    except Exception:
        return []


async def _until_disconnected(request: Request, work):
    """Run a non-streaming generation; cancel it (aborting the request) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                log.info("client disconnected; aborting its request")
                task.cancel()
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()
