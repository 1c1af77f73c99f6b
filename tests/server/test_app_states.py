"""503 while loading and when a stage is down; /health says which (in-process app, real engine)."""

from __future__ import annotations

import threading

import httpx
import pytest

from server.app import create_app
from server.engine_host import EngineHost
from server.settings import ServerSettings
from tests.helpers import load_engine


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


BODY = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "temperature": 0}


@pytest.mark.anyio
async def test_503_while_loading_then_ready(tiny_text_model):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return load_engine(tiny_text_model)

    host = EngineHost(slow_load)
    app = create_app(host, ServerSettings(served_model_name="tiny"))
    host.start()
    async with client(app) as http:
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        busy = await http.post("/v1/completions", json=BODY)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        release.set()
        host.wait_loaded(30)
        assert (await http.get("/health")).status_code == 200
        assert (await http.post("/v1/completions", json=BODY)).status_code == 200
    host.close()


@pytest.mark.anyio
async def test_503_when_a_stage_is_down(tiny_text_model):
    engine = load_engine(tiny_text_model, stages=2)
    app = create_app(EngineHost.ready(engine), ServerSettings(served_model_name="tiny"))
    async with client(app) as http:
        assert (await http.post("/v1/completions", json=BODY)).status_code == 200
        engine.transport.close()  # every stage thread stops
        health = await http.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        response = await http.post("/v1/completions", json=BODY)
        assert response.status_code == 503 and "a stage is down" in response.json()["error"]["message"]
    engine.close()


@pytest.mark.anyio
async def test_failed_load_is_reported(tmp_path):
    def broken():
        raise FileNotFoundError("no weights here")

    host = EngineHost(broken)
    host.start()
    host.wait_loaded(10)
    async with client(create_app(host, ServerSettings(served_model_name="x"))) as http:
        health = await http.get("/health")
        assert health.status_code == 503 and "no weights here" in health.json()["detail"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_a_stage_failure_caused_by_the_request_is_its_400(tiny_text_model, stream):
    """Finite logits that the request's temperature overflows: the client's
    error (400 naming the parameter), not a server failure."""
    engine = load_engine(tiny_text_model, stages=2)
    model = engine.stages[-1].model
    model.logits = lambda hidden, real=model.logits: real(hidden) * 1e34  # a deterministic fake: huge, finite
    app = create_app(EngineHost.ready(engine), ServerSettings(served_model_name="tiny"))
    async with client(app) as http:
        response = await http.post("/v1/completions", json={**BODY, "temperature": 1e-4, "seed": 3, "stream": stream})
        if stream:
            assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
            error = [line for line in response.text.splitlines() if '"error"' in line][0]
            assert '"code":"bad_request"' in error and '"param":"temperature"' in error
        else:
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "temperature"
            assert "gives no valid distribution" in response.json()["error"]["message"]
        assert (await http.post("/v1/completions", json={**BODY, "temperature": 0})).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert 'finished_reason="bad_request"} 1.0' in metrics and 'finished_reason="error"}' not in metrics
    engine.close()
