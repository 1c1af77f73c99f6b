"""--draft vllm:PATH: a draft run by vLLM (extra pipeinfer[vllm]).

vLLM's CPU attention needs head_dim >= 32 (the shared tiny models have 16), so
these tests build their own tiny Llama with head_dim 32. One vLLM engine per
draft model serves the whole module (VLLMDraft.shared): a start costs seconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compute.types import GenerationRequest, SamplingParams
from compute.vllm_host import INSTALL_HINT, VLLMError, vllm_available
from draft_models import DraftSpecError, load_draft
from draft_models.vllm_draft import VLLMDraft, close_shared_hosts
from pipeline.types import Mode
from tests.helpers import greedy_reference, load_engine, make_tiny_model

# Skipped (not failed) without the extra. find_spec rather than importorskip:
# `import vllm` in this process would set TORCHINDUCTOR_* variables for every
# later test; the draft imports vLLM only in its own child process.
requires_vllm = pytest.mark.skipif(not vllm_available(), reason=INSTALL_HINT)
pytestmark = pytest.mark.vllm

GREEDY = SamplingParams()
PROMPT = [5, 17, 33, 5, 17]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory) -> Path:
    """4-layer Llama, vocab 96, head_dim 32 (vLLM's CPU attention minimum)."""
    return make_tiny_model(tmp_path_factory.mktemp("vllm-tiny") / "target", seed=11, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def vllm_unrelated(tmp_path_factory) -> Path:
    """Same vocabulary, other weights: a draft that is mostly wrong."""
    return make_tiny_model(tmp_path_factory.mktemp("vllm-unrelated") / "draft", seed=98, num_layers=2,
                           num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="module")
def self_draft(vllm_tiny) -> VLLMDraft:
    draft = load_draft("vllm:target", vllm_tiny)
    yield draft
    close_shared_hosts()  # the engines of this module, this one included


@pytest.fixture(scope="module")
def expected(vllm_tiny) -> list[int]:
    return greedy_reference(vllm_tiny, PROMPT, MAX_TOKENS)


@requires_vllm
def test_greedy_proposals_are_the_targets_greedy_tokens(self_draft, expected):
    """Including after a rollback to a shorter prefix (vLLM's prefix cache)."""
    assert isinstance(self_draft, VLLMDraft) and self_draft.name == "vllm:target"
    assert self_draft.propose(0, PROMPT, 8, GREEDY, None).token_ids == expected[:8]
    assert self_draft.propose(0, PROMPT + expected[:3], 5, GREEDY, None).token_ids == expected[3:8]
    assert self_draft.propose(0, PROMPT + expected[:1], 2, GREEDY, None).token_ids == expected[1:3]
    proposal = self_draft.propose(0, PROMPT, 4, GREEDY, None)
    assert proposal.probs == [None] * 4  # deterministic guesses
    assert self_draft.propose(0, PROMPT, 0, GREEDY, None).token_ids == []
    self_draft.release(0)


@requires_vllm
def test_proposals_carry_the_drafts_confidences(self_draft, vllm_tiny):
    """The top probability of each guess's distribution, as our own draft reports it."""
    ours = self_draft.propose(1, PROMPT, 6, GREEDY, None)
    theirs = load_draft(str(vllm_tiny), vllm_tiny).propose(1, PROMPT, 6, GREEDY, None)
    assert ours.token_ids == theirs.token_ids
    assert ours.confidences == pytest.approx(theirs.confidences, abs=1e-3)


@requires_vllm
def test_sampled_proposals_match_model_draft(self_draft, vllm_tiny):
    """Seeded: the same Gumbel-noise choices as our own draft of the same model.
    Unseeded: real samples, each with the full distribution q it came from."""
    reference = load_draft(str(vllm_tiny), vllm_tiny)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=3)
    assert (self_draft.propose(2, PROMPT, 6, seeded, None).token_ids
            == reference.propose(2, PROMPT, 6, seeded, None).token_ids)
    unseeded = SamplingParams(temperature=0.8, top_k=20)
    proposal = self_draft.propose(2, PROMPT, 4, unseeded, torch.Generator().manual_seed(1))
    assert len(proposal.token_ids) == len(proposal.probs) == 4
    for token, q in zip(proposal.token_ids, proposal.probs):
        assert q.shape == (96,) and abs(float(q.sum()) - 1.0) < 1e-4
        assert float(q[token]) > 0 and int((q > 0).sum()) <= 20  # top-k applied
    again = self_draft.propose(2, PROMPT, 4, unseeded, torch.Generator().manual_seed(1))
    assert again.token_ids == proposal.token_ids  # the randomness comes from our generator


def paced(mode: str):
    """pipeinfer mode never waits for the draft, which is a process away: a
    delay per layer gives it time to guess, so that guesses are verified."""
    return (lambda stage, layer: 0.005) if mode == Mode.PIPEINFER.value else None


@requires_vllm
@pytest.mark.parametrize("mode", [m.value for m in Mode])
def test_lossless_with_a_vllm_draft(self_draft, vllm_tiny, vllm_unrelated, expected, mode):
    """Greedy output equals the target's own, with a right and a wrong vLLM draft, 1 and 2 stages."""
    for draft, stages in [("vllm:target", 1), ("vllm:target", 2), (f"vllm:{vllm_unrelated}", 2)]:
        with load_engine(vllm_tiny, draft, stages, mode, layer_delay=paced(mode), min_accept_prob=0.0) as engine:
            out = engine.complete(GenerationRequest(tuple(PROMPT), MAX_TOKENS))
        assert out.token_ids == expected, (draft, stages, out.stats)
        assert out.finish_reason == "length"
        if draft == "vllm:target" and mode != "ar":
            assert out.stats.num_draft_tokens > 0
            assert out.stats.acceptance_rate == 1.0, out.stats


@requires_vllm
@pytest.mark.parametrize("mode", ["sync", "pipeinfer"])
def test_seeded_sampling_same_text_as_no_draft(self_draft, vllm_tiny, mode):
    request = GenerationRequest(tuple(PROMPT), MAX_TOKENS, SamplingParams(temperature=0.9, top_p=0.95, seed=7))
    with load_engine(vllm_tiny, "none", 1, mode) as engine:
        reference = engine.complete(request)
    with load_engine(vllm_tiny, "vllm:target", 2, mode, layer_delay=paced(mode), min_accept_prob=0.0) as engine:
        out = engine.complete(request)
    assert out.token_ids == reference.token_ids
    assert out.stats.num_accepted_tokens > 0, out.stats


@requires_vllm
def test_unseeded_sampling_accepts_sampled_drafts(self_draft, vllm_tiny):
    """The draft is the target: q = p, so min(1, p/q) accepts every guess."""
    request = GenerationRequest(tuple(PROMPT), MAX_TOKENS, SamplingParams(temperature=0.9))
    with load_engine(vllm_tiny, "vllm:target", 1, "sync", min_accept_prob=0.0) as engine:
        out = engine.complete(request)
    assert len(out.token_ids) == MAX_TOKENS
    assert out.stats.acceptance_rate > 0.9, out.stats


@requires_vllm
def test_bad_vllm_drafts_are_explained(vllm_tiny, tmp_path):
    with pytest.raises(DraftSpecError, match=r"expected vllm:PATH"):
        load_draft("vllm:", vllm_tiny)
    with pytest.raises(DraftSpecError, match=r"not found"):
        load_draft("vllm:/no/such/draft", vllm_tiny)
    other = make_tiny_model(tmp_path / "other", seed=3, vocab_size=200, num_layers=1, num_heads=2, num_kv_heads=1)
    with pytest.raises(DraftSpecError, match="vocabulary of 200 tokens, the target 96"):
        load_draft(f"vllm:{other}", vllm_tiny)
    unsupported = make_tiny_model(tmp_path / "head16", seed=3)  # head_dim 16: vLLM's CPU attention refuses it
    with pytest.raises(DraftSpecError, match="vLLM could not load"):
        load_draft(f"vllm:{unsupported}", vllm_tiny)


def test_without_vllm_the_error_names_the_extra(tiny_target, monkeypatch):
    import compute.vllm_host as vllm_host

    monkeypatch.setattr(vllm_host, "vllm_available", lambda: False)
    with pytest.raises(DraftSpecError, match=r"install the extra pipeinfer\[vllm\]"):
        load_draft("vllm:target", tiny_target)
    with pytest.raises(VLLMError, match=r"pipeinfer\[vllm\]"):
        VLLMDraft.start("vllm:target", tiny_target)


@requires_vllm
@pytest.mark.slow
def test_default_model_with_vllm_draft(default_model):
    """The real SmolLM2-135M drafting for itself in vLLM: lossless, and its guesses are accepted.
    (Sync mode: it always waits for the guesses, where pipeinfer mode on a
    2-core box declines a draft that costs as much as the target.)"""
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    expected = greedy_reference(default_model, prompt, 16)
    with load_engine(default_model, "vllm:default", 2, "sync") as engine:
        out = engine.complete(GenerationRequest(tuple(prompt), 16))
    assert out.token_ids == expected
    assert out.stats.acceptance_rate > 0.5, out.stats
