"""`pipeinfer serve`: load the engine in the background and serve HTTP at once
(503 until ready), then log one line saying where it listens.

Signals: the first SIGTERM or SIGINT stops admitting and gives running
requests the grace period (server/shutdown.py), after which uvicorn closes
and the engine stops everything it started; a second signal exits at once
(the private Ray's reaper still cleans up after us).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import uvicorn

from compute.model_source import DEFAULT_MODEL, DEFAULT_MODEL_GGUF
from pipeline.config import EngineConfig
from pipeline.engine import Engine
from server.app import create_app
from server.engine_host import EngineHost
from server.http_protocol import limited_h11
from server.settings import ServerSettings
from server.shutdown import Shutdown

log = logging.getLogger("pipeinfer.serve")

# uvicorn's own backstop after the grace period: engine.close() and the
# private Ray's stop fit in it.
SHUTDOWN_MARGIN_S = 4.0


def served_name(model: str) -> str:
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL_GGUF.split(".")[0]  # SmolLM2-135M-Instruct
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


class _GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        super().__init__(config)
        self._shutdown = shutdown
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            log.warning("second signal: exiting now")
            os._exit(128 + sig)
        super().handle_exit(sig, frame)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._shutdown.begin)


def serve(config: EngineConfig, *, host: str, port: int, settings: ServerSettings) -> None:
    logging.getLogger().setLevel(logging.INFO)
    name = settings.served_model_name

    def load() -> Engine:
        engine = Engine.load(config, show_progress=True)
        running = engine.configuration()
        log.info("ready: serving %r on http://%s:%d/v1 (%d stage(s), draft %s, mode %s)%s", name, host, port,
                 running["stages"], running["draft"], running["mode"], " with API keys" if settings.api_keys else "")
        return engine

    app = create_app(EngineHost(load), settings)
    uvicorn_config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False,
        http=limited_h11(app.state.metrics.count_rejected), h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=settings.shutdown_grace_s + SHUTDOWN_MARGIN_S)
    _GracefulServer(uvicorn_config, app.state.shutdown).run()
