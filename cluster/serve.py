"""`pipeinfer serve`: load the engine in the background and serve HTTP at once
(503 until ready), then log one line saying where it listens."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from pipeline.engine import Engine, EngineConfig
from pipeline.model_source import DEFAULT_MODEL, DEFAULT_MODEL_GGUF
from server.app import ServerSettings, create_app
from server.engine_host import EngineHost

log = logging.getLogger("pipeinfer.serve")


def served_name(model: str) -> str:
    if model == DEFAULT_MODEL:
        return DEFAULT_MODEL_GGUF.split(".")[0]  # SmolLM2-135M-Instruct
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def serve(config: EngineConfig, *, host: str, port: int, api_keys: tuple[str, ...], served_model_name: str | None,
          max_running: int, max_waiting: int, max_body_bytes: int) -> None:
    logging.getLogger().setLevel(logging.INFO)
    name = served_model_name or served_name(config.model)
    settings = ServerSettings(served_model_name=name, api_keys=api_keys, max_body_bytes=max_body_bytes,
                              max_running_requests=max_running, max_waiting_requests=max_waiting)

    def load() -> Engine:
        engine = Engine.load(config, show_progress=True)
        log.info("ready: serving %r on http://%s:%d/v1 (%d stage(s), draft %s, mode %s)%s", name, host, port,
                 config.num_stages, config.draft, config.speculation.mode.value,
                 " with API keys" if api_keys else "")
        return engine

    app = create_app(EngineHost(load), settings)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
