"""The simulated cluster: the real coordinator in simulated time stays
lossless, and its clock follows the profile's cost model."""

from __future__ import annotations

import pytest

from compute.types import GenerationRequest
from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.sim_profiles import PROFILES, get_profile
from pipeline.speculation import SpeculationConfig
from pipeline.types import Mode
from tests.helpers import greedy_reference, make_tiny_model

PROMPT = [5, 17, 33, 5, 17, 33, 5, 17]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def eight_layer_target(tmp_path_factory):
    """Both profiles have 8 stages: one layer each."""
    return make_tiny_model(tmp_path_factory.mktemp("sim") / "target", seed=11, num_layers=8)


def simulated_engine(model, profile: str, draft: str, mode: Mode) -> Engine:
    config = EngineConfig(model=str(model), draft=draft, simulate=profile,
                          speculation=SpeculationConfig(mode=mode, draft_len=4, max_runs_in_flight=4))
    return Engine.load(config, show_progress=False)


CASES = [("pipeinfer-2024", draft, mode) for draft in ("ngram", "synthetic:0.6", "synthetic:1") for mode in Mode]
CASES += [(profile, "synthetic:0.6", mode) for profile in sorted(PROFILES) if profile != "pipeinfer-2024" for mode in Mode]


@pytest.mark.parametrize("profile,draft,mode", CASES)
def test_simulated_cluster_is_lossless(eight_layer_target, profile, draft, mode):
    expected = greedy_reference(eight_layer_target, PROMPT, MAX_TOKENS)
    with simulated_engine(eight_layer_target, profile, draft, mode) as engine:
        out = engine.complete(GenerationRequest(tuple(PROMPT), MAX_TOKENS))
        spans = engine.stage_spans()
    assert out.token_ids == expected
    assert {span.stage for span in spans} == set(range(8))
    if draft == "synthetic:1" and mode is not Mode.AR:
        assert out.stats.acceptance_rate == 1.0


def test_autoregressive_time_is_the_cost_model(eight_layer_target):
    """AR decoding: every token is one run through all stages and links, so
    the simulated clock must add up to exactly that."""
    profile = get_profile("pipeinfer-2024")
    with simulated_engine(eight_layer_target, profile.name, "none", Mode.AR) as engine:
        out = engine.complete(GenerationRequest(tuple(PROMPT), MAX_TOKENS))

    def run_time(num_tokens: int) -> float:
        stages = sum(profile.stage_time_s(s, num_tokens) for s in range(profile.num_stages))
        links = profile.link_time_s(4 * num_tokens) + sum(
            profile.link_time_s(profile.hidden_bytes(num_tokens)) for _ in range(profile.num_stages - 1))
        return stages + links + profile.link_time_s(8 * num_tokens)  # the result back

    expected = run_time(len(PROMPT)) + (MAX_TOKENS - 1) * run_time(1)
    assert out.stats.elapsed_s == pytest.approx(expected, rel=1e-4)
    assert out.stats.first_token_s == pytest.approx(run_time(len(PROMPT)), rel=1e-4)


def test_cancellation_stops_a_stage_at_a_layer_boundary(tmp_path):
    """A rejected guess cancels runs still computing: their spans end early,
    on a modelled layer boundary, and the text stays the target's."""
    target = make_tiny_model(tmp_path / "t", seed=12, num_layers=16)  # 2 layers per stage
    profile = get_profile("pipeinfer-2024")
    with simulated_engine(target, profile.name, "synthetic:0.5", Mode.PIPEINFER) as engine:
        out = engine.complete(GenerationRequest(tuple(PROMPT), MAX_TOKENS))
        spans = engine.stage_spans()
    assert out.token_ids == greedy_reference(target, PROMPT, MAX_TOKENS)
    stopped = [s for s in spans if s.outcome == "stopped"]
    assert stopped, "no run was stopped mid-forward"
    for span in stopped:
        layer_s = profile.layer_time_s(span.stage, span.num_tokens)
        # A cancellation that lands in the last layer lets the run finish; its output is dropped.
        assert span.duration_s <= profile.stage_time_s(span.stage, span.num_tokens) + 1e-9
        assert span.duration_s / layer_s == pytest.approx(round(span.duration_s / layer_s), abs=1e-6)
    cancelled = set(out.stats.cancelled_run_ids)
    assert {s.run_id for s in stopped} <= cancelled


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown simulation profile 'nope'; choose from"):
        EngineConfig(simulate="nope")
