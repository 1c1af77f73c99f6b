"""Loading runs on a thread of its own that is gone when it returns."""

from __future__ import annotations

import threading

import pytest

from compute.threads import on_passing_thread


def test_the_work_runs_on_a_thread_that_has_ended_by_the_time_it_returns():
    seen = {}

    def work():
        seen["thread"] = threading.current_thread()
        return 42

    assert on_passing_thread(work) == 42
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()


def test_its_exception_reaches_the_caller():
    def work():
        raise ValueError("bad weights")

    with pytest.raises(ValueError, match="bad weights"):
        on_passing_thread(work)
