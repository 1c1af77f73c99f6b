"""Each draft kind: what it proposes, and the errors for bad --draft values."""

from __future__ import annotations

import pytest

from compute.types import SamplingParams
from draft_models import DraftSpecError, load_draft
from draft_models.base import NoDraft
from draft_models.model_draft import ModelDraft
from draft_models.ngram import NGramDraft
from tests.helpers import greedy_reference, make_tiny_model

GREEDY = SamplingParams()


def test_ngram_continues_after_the_last_earlier_match():
    draft = NGramDraft(max_ngram=3)
    tokens = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3]
    assert draft.propose(0, tokens, 3, GREEDY, None).token_ids == [4, 5, 9]
    assert draft.propose(0, tokens, 2, GREEDY, None).token_ids == [4, 5]
    assert draft.propose(0, [1, 2, 3], 4, GREEDY, None).token_ids == []  # nothing seen before
    # Falls back to a shorter n-gram: only the final token [7] recurs.
    assert draft.propose(0, [7, 8, 1, 7], 2, GREEDY, None).token_ids == [8, 1]


def test_no_draft_never_guesses():
    assert NoDraft().propose(0, [1, 2, 1, 2], 4, GREEDY, None).token_ids == []


def test_self_draft_proposes_the_targets_greedy_tokens(tiny_target):
    """The target as its own draft guesses exactly what greedy decoding says,
    including after a rollback to a shorter prefix (cache truncation)."""
    draft = load_draft(str(tiny_target), tiny_target)
    prompt = [4, 40, 44]
    expected = greedy_reference(tiny_target, prompt, 8)
    assert draft.propose(0, prompt, 8, GREEDY, None).token_ids == expected
    assert draft.propose(0, prompt + expected[:3], 5, GREEDY, None).token_ids == expected[3:8]
    assert draft.propose(0, prompt + expected[:1], 2, GREEDY, None).token_ids == expected[1:3]
    draft.release(0)


def test_a_model_draft_reports_its_top_probability_as_confidence(tiny_target):
    proposal = load_draft("layers:2", tiny_target).propose(1, [4, 5], 6, GREEDY, None)
    assert len(proposal.token_ids) == len(proposal.confidences) == 6
    assert all(0.0 < c <= 1.0 for c in proposal.confidences)


def test_ngram_confidence_follows_its_match_statistics():
    draft = NGramDraft(max_ngram=3)
    # [1, 2, 3] occurred twice before, both times followed by 4, then by 5 and 6 once each.
    proposal = draft.propose(0, [1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 6, 0, 1, 2, 3], 3, GREEDY, None)
    assert proposal.token_ids == [4, 6, 0]
    assert proposal.confidences == pytest.approx([2 / 3, 1 / 3, 1 / 3])
    shorter = draft.propose(0, [7, 8, 1, 7], 1, GREEDY, None)  # a 1-gram match: weaker evidence
    assert shorter.confidences == pytest.approx([1 / 2 * 1 / 3])


@pytest.mark.parametrize("spec,kind,num_layers", [("layers:2", ModelDraft, 2), ("int8", ModelDraft, 4),
                                                   ("ngram", NGramDraft, None), ("none", NoDraft, None)])
def test_draft_kinds(tiny_target, spec, kind, num_layers):
    draft = load_draft(spec, tiny_target)
    assert isinstance(draft, kind) and draft.name == spec
    if num_layers is not None:
        assert draft.model.num_layers == num_layers and draft.model.is_last


@pytest.mark.parametrize("spec,message", [
    ("layers:0", r"N must be in 1\.\.4"),
    ("layers:x", r"expected layers:N with an integer N"),
    ("/no/such/draft", r"not found.*Drafts: auto, none, ngram, ngram\+head:PATH, layers:N, int8"),
])
def test_bad_draft_specs_are_explained(tiny_target, spec, message):
    with pytest.raises(DraftSpecError, match=message):
        load_draft(spec, tiny_target)


def test_draft_with_another_vocabulary_is_refused(tiny_target, tmp_path):
    other = make_tiny_model(tmp_path / "other", seed=3, vocab_size=200, num_layers=1)
    with pytest.raises(DraftSpecError, match="vocabulary of 200 tokens, the target 96: a draft must share"):
        load_draft(str(other), tiny_target)
