"""Adaptive speculation: the cutoff relaxes while the pipeline waits, tightens after rejections."""

from __future__ import annotations

import pytest

from pipeline.speculation import AdaptiveCutoff, SpeculationConfig


def test_cutoff_relaxes_tightens_and_resets():
    cutoff = AdaptiveCutoff(SpeculationConfig(confidence_cutoff=0.4, cutoff_recovery=0.05, cutoff_decay=0.1))
    assert cutoff.value == pytest.approx(0.4)
    cutoff.on_idle()
    cutoff.on_idle()
    assert cutoff.value == pytest.approx(0.3)  # waiting: draft more eagerly
    for _ in range(3):
        cutoff.on_rejection()
    assert cutoff.value == pytest.approx(0.6)  # wrong guesses: draft less
    cutoff.on_acceptance()
    assert cutoff.value == pytest.approx(0.4)
    for _ in range(50):
        cutoff.on_rejection()
    assert cutoff.value == 1.0  # clamped


@pytest.mark.parametrize("field,value", [("draft_len", 0), ("max_runs_in_flight", 0), ("confidence_cutoff", 1.5)])
def test_bad_speculation_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SpeculationConfig(**{field: value})
