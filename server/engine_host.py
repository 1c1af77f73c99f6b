"""Loads the engine in the background so the gateway can answer 503 (not
hang) while loading, and tells whether every stage is ready."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from compute.types import Failure, FailureCode
from pipeline.engine import Engine

log = logging.getLogger(__name__)


class EngineHost:
    def __init__(self, load: Callable[[], Engine]) -> None:
        self._load = load
        self._thread: threading.Thread | None = None
        self.engine: Engine | None = None
        self.failure: Failure | None = None  # why loading failed
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
            self.failure = Failure.of(exc, FailureCode.LOAD_FAILED)

    def wait_loaded(self, timeout_s: float) -> None:
        """Until loading ended (loaded or failed), at most timeout_s."""
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def state(self) -> str:
        if self.failure is not None:
            return "failed"
        if self.engine is None:
            return "loading"
        return "ok" if self.engine.is_alive() else "unhealthy"

    def close(self) -> None:
        if self.engine is not None and self._owns_engine:
            self.engine.close()
