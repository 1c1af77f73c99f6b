"""Adaptive speculation: the cutoff relaxes while the pipeline waits, tightens after rejections."""

from __future__ import annotations

import pytest

from compute.types import GenerationRequest
from draft_models.base import DraftProposal
from pipeline.speculation import AdaptiveCutoff, SpeculationConfig
from tests.helpers import load_engine


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


class CutoffRecordingDraft:
    """Never guesses; records the cutoff of every call."""

    name = "recording"
    is_free = True

    def __init__(self) -> None:
        self.cutoffs: list[float] = []

    def propose(self, seq_id, token_ids, max_tokens, sampling, cutoff, generator) -> DraftProposal:
        self.cutoffs.append(cutoff)
        return DraftProposal()

    def release(self, seq_id) -> None:
        pass


def test_cutoff_scales_with_how_full_the_pipeline_is(tiny_target):
    """With only the canonical run in flight (1 of 4), a guess needs a quarter
    of the confidence it needs in a full pipeline: idle stages make it cheap."""
    draft = CutoffRecordingDraft()
    with load_engine(tiny_target, draft, mode="pipeinfer", confidence_cutoff=0.4, max_runs_in_flight=4) as engine:
        engine.complete(GenerationRequest((5, 6, 7), 3))
    assert draft.cutoffs and draft.cutoffs[0] == pytest.approx(0.4 * 1 / 4)
