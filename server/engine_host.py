"""Loads the engine in the background so the gateway can answer 503 (not
hang) while loading, and tells whether every stage is ready."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pipeline.engine import Engine

log = logging.getLogger(__name__)


class EngineHost:
    def __init__(self, load: Callable[[], Engine]) -> None:
        self._load = load
        self._thread: threading.Thread | None = None
        self.engine: Engine | None = None
        self.error: str | None = None
        self._owns_engine = True

    @classmethod
    def ready(cls, engine: Engine) -> EngineHost:
        """Host an engine that the caller already loaded (and will close)."""
        host = cls(lambda: engine)
        host.engine = engine
        host._owns_engine = False
        return host

    def start(self) -> None:
        if self.engine is None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loader", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.engine = self._load()
        except Exception as exc:
            log.exception("loading the engine failed")
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        if self.engine is None:
            return "loading"
        return "ok" if self.engine.is_alive() else "unhealthy"

    def close(self) -> None:
        if self.engine is not None and self._owns_engine:
            self.engine.close()
