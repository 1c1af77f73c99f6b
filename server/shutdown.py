"""Graceful shutdown: stop admitting, give running requests a grace period,
then end what is left with an error (an error event and [DONE] on a stream)."""

from __future__ import annotations

import asyncio
import logging

from compute.types import Failure, FailureCode
from server.engine_host import EngineHost
from server.limits import SHUTTING_DOWN, Admission

log = logging.getLogger(__name__)


class Shutdown:
    def __init__(self, admission: Admission, host: EngineHost, grace_s: float) -> None:
        self.admission = admission
        self.host = host
        self.grace_s = grace_s
        self.is_draining = False

    def begin(self) -> None:
        """Call on the event loop; a second call does nothing."""
        if self.is_draining:
            return
        self.is_draining = True
        log.info("shutting down: %d request(s) running get up to %g s to finish", self.admission.running,
                 self.grace_s)
        loop = asyncio.get_running_loop()
        loop.create_task(self.admission.close())
        loop.call_later(self.grace_s, self._end_running)

    def _end_running(self) -> None:
        if self.host.engine is not None and self.admission.running:
            log.info("grace period over: ending %d running request(s)", self.admission.running)
            self.host.engine.fail_all(Failure(FailureCode.SHUTTING_DOWN,
                                              f"{SHUTTING_DOWN} (its {self.grace_s:g} s grace period is over)"))
