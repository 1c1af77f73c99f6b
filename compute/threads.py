"""Heavy torch work on a thread that ends with it.

A thread that ran a parallel torch op keeps its OpenMP worker pool for as
long as it lives, and while it does, every other thread's parallel ops run
slower: measured here, a stage thread decoding the default model took 30 ms
a token while the thread that loaded its weights lived on, 20.6 ms once it
had ended. So loading (and converting) runs on a thread of its own, which
ends when the work is done, and the threads that compute are the only ones
left with a pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_passing_thread(work: Callable[[], T]) -> T:
    """work() on a new thread, waited for: its result, or its exception."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="loader", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
