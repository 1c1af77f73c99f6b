"""Speculation that adapts to the acceptance measured per request: a useless
draft turns it off (but keeps probing), a good one goes deep, and the
draft's confidence is used as far as it proves informative."""

from __future__ import annotations

import pytest

from compute.types import GenerationRequest, SamplingParams
from draft_models import load_draft
from draft_models.base import DraftProposal
from pipeline.engine import Engine
from pipeline.partition import balanced_plans
from pipeline.sim_profiles import ClusterProfile
from pipeline.sim_transport import SimulatedDrafter, SimulatedTransport
from pipeline.speculation import DRAFT, EXPLORE_EVERY, HEAD, AcceptanceModel, DraftHistory, RunCost, SpeculationConfig
from pipeline.stage import Stage
from tests.helpers import greedy_reference, load_engine


def test_an_uninformative_confidence_gives_the_overall_rate():
    model = AcceptanceModel()
    assert model.probability(0.5) == pytest.approx(0.8)  # no evidence yet: optimistic, so speculation starts
    for i in range(100):
        model.observe(0.7, is_accepted=i % 10 < 3)
    assert model.probability(0.7) == pytest.approx(0.3, abs=0.02)
    assert model.probability(0.1) == pytest.approx(0.3, abs=0.02)  # an empty bin leans on the overall rate


def test_the_rate_is_learnt_per_depth():
    """Copying runs long: once a guess lands, the next is likelier to."""
    model = AcceptanceModel()
    for i in range(100):
        model.observe(0.5, is_accepted=i % 10 < 2, depth=1)
        model.observe(0.5, is_accepted=i % 10 < 9, depth=3)
    assert model.probability(0.5, depth=1) < 0.3 < 0.8 < model.probability(0.5, depth=3)


def test_an_informative_confidence_sorts_the_guesses():
    model = AcceptanceModel()
    for _ in range(40):
        model.observe(0.95, is_accepted=True)
        model.observe(0.05, is_accepted=False)
    assert model.probability(0.95) > 0.9 and model.probability(0.05) < 0.1


@pytest.mark.parametrize("field,value", [("draft_len", 0), ("max_runs_in_flight", 0), ("min_accept_prob", 1.5),
                                         ("prefill_chunk", 0)])
def test_bad_speculation_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SpeculationConfig(**{field: value})


def test_the_in_flight_cap_follows_the_stages():
    assert SpeculationConfig().runs_in_flight(4) == 5
    assert SpeculationConfig(max_runs_in_flight=2).runs_in_flight(4) == 2


class ScriptedDraft:
    """Guesses the target's own greedy tokens, then spoils them by rule:
    `rule(position) -> (is_right, confidence)`. Free: guesses come at once."""

    name = "scripted"
    is_free = True

    def __init__(self, target, rule) -> None:
        self._oracle = load_draft(str(target), target)
        self._rule = rule
        self.num_proposed = 0

    def propose(self, seq_id, token_ids, max_tokens, sampling, generator) -> DraftProposal:
        truth = self._oracle.propose(seq_id, token_ids, max_tokens, SamplingParams(), None).token_ids
        proposal = DraftProposal()
        for i, token in enumerate(truth):
            is_right, confidence = self._rule(len(token_ids) + i)
            proposal.token_ids.append(token if is_right else (token + 1) % 96)
            proposal.probs.append(None)
            proposal.confidences.append(confidence)
        self.num_proposed += len(proposal.token_ids)
        return proposal

    def release(self, seq_id) -> None:
        self._oracle.release(seq_id)


def generate(target, draft, prompt, max_tokens, **speculation):
    """Slow stages (a layer takes 5 ms): guesses come before the results they extend."""
    with load_engine(target, draft, 2, "pipeinfer", layer_delay=lambda stage, layer: 0.005, **speculation) as engine:
        out = engine.complete(GenerationRequest(tuple(prompt), max_tokens))
    assert out.token_ids == greedy_reference(target, prompt, max_tokens)
    return out.stats


def generate_simulated(target, draft, prompt, max_tokens, num_requests=1, draft_token_s=0.0, shares_cores=False):
    """As generate(), on two simulated stages (20 ms a run, 2 ms a token more,
    1 ms links): every result arrives when the cost model says, whatever
    this machine's load, so the policy's choices are reproducible. A draft
    that is not free costs draft_token_s a guess; shares_cores: on a
    stage's cores. num_requests one after another: the last one's stats."""
    profile = ClusterProfile(
        name="two-stages", description="for tests", num_stages=2, num_layers=4, params_per_layer=0.0,
        head_params=0.0, hidden_size=64, bytes_per_param=0.0, activation_bytes=4, memory_bandwidth_Bps=1.0,
        flops=1.0, run_overhead_s=0.0, link_latency_s=0.001, link_bandwidth_Bps=1e15, draft_token_s=draft_token_s,
        draft_call_s=0.0, stage_costs=((0.02, 0.002), (0.02, 0.002)))
    plans = balanced_plans(target, 2)
    transport = SimulatedTransport([Stage.load(target, plans, i, "float32") for i in range(2)], profile)
    transport.draft_shares_cores = shares_cores
    with Engine(target, transport, SimulatedDrafter(draft, transport), SpeculationConfig()) as engine:
        for _ in range(num_requests):
            out = engine.complete(GenerationRequest(tuple(prompt), max_tokens))
            assert out.token_ids == greedy_reference(target, prompt, max_tokens)
    return out.stats


def test_a_useless_draft_turns_speculation_off_but_keeps_probing(tiny_target):
    stats = generate_simulated(tiny_target, ScriptedDraft(tiny_target, lambda pos: (False, 0.9)), [5, 6, 7], 96)
    assert stats.num_accepted_tokens == 0
    # A few guesses in runs while the acceptance is being measured; after
    # that, probes (one per EXPLORE_EVERY verifications) are judged by the
    # next result without a run: no speculative run at all.
    assert stats.num_draft_tokens < 12
    assert stats.num_runs - 96 <= stats.num_draft_tokens
    assert stats.draft_guesses >= stats.num_draft_tokens + 96 / EXPLORE_EVERY - 4  # the probes were made


def test_a_new_request_starts_from_what_the_engine_learnt_of_its_draft():
    history = DraftHistory()
    first = AcceptanceModel(history)
    assert first.overall() == pytest.approx(0.8)  # nothing learnt yet: the optimistic prior
    for _ in range(60):
        first.observe(0.9, is_accepted=False)
    assert AcceptanceModel(history).overall() < 0.05  # the next request knows the draft is useless
    assert AcceptanceModel().overall() == pytest.approx(0.8)  # (a model without history keeps the prior)


def test_a_useless_draft_is_found_out_once_per_engine_not_once_per_request(tiny_target):
    first = generate_simulated(tiny_target, ScriptedDraft(tiny_target, lambda pos: (False, 0.9)), [5, 6, 7], 48)
    third = generate_simulated(tiny_target, ScriptedDraft(tiny_target, lambda pos: (False, 0.9)), [5, 6, 7], 48,
                               num_requests=3)
    assert first.num_draft_tokens > 0  # the first request tries the draft in runs
    assert third.num_draft_tokens == 0  # a later one only probes it, without runs
    assert third.draft_guesses >= 48 / EXPLORE_EVERY - 2


def test_a_sources_first_batch_of_guesses_does_not_price_it():
    """The first batch pays one-time costs (48 ms a guess seen, 25 forwards'
    worth): counted, it would keep speculation off for good."""
    history = DraftHistory()
    history.observe_compute(1, 0.048, HEAD)
    assert history.seconds_per_guess(HEAD) == 0.0
    history.observe_compute(2, 0.004, HEAD)
    history.observe_compute(1, 0.001, DRAFT)
    assert history.seconds_per_guess(HEAD) == pytest.approx(0.002)
    assert history.seconds_per_guess(DRAFT) == 0.0  # each source warms up on its own


class CostlyDraft(ScriptedDraft):
    is_free = False  # the simulator charges its draft_token_s a guess


def test_a_draft_on_the_stages_cores_must_be_worth_its_own_compute_too(tiny_target):
    """Right on 80% of positions, 30 ms a guess against a 47 ms pass: worth
    runs on a core of its own; on a stage's, a guess would have to be right
    more often than 1/4 (a run, 4 layers) + 30/47 (its compute)."""
    rule = lambda pos: (hash((pos, 3)) % 5 < 4, 0.5)  # noqa: E731
    own = generate_simulated(tiny_target, CostlyDraft(tiny_target, rule), [5, 6, 7], 64, num_requests=2,
                             draft_token_s=0.03)
    shared = generate_simulated(tiny_target, CostlyDraft(tiny_target, rule), [5, 6, 7], 64, num_requests=2,
                                draft_token_s=0.03, shares_cores=True)
    assert own.num_draft_tokens > 15
    assert shared.num_draft_tokens < own.num_draft_tokens / 3


def test_a_pass_is_timed_by_run_size():
    cost = RunCost()
    assert cost.pass_seconds(1) is None
    cost.observe(1, 0.05)
    assert cost.pass_seconds(3) == pytest.approx(0.05)  # one size seen: its mean
    for n in (1, 2, 3, 4):
        cost.observe(n, 0.04 + 0.01 * n)
    assert cost.pass_seconds(6) == pytest.approx(0.1, abs=0.01)
    assert cost.token_share() == pytest.approx(0.01 / 0.04, rel=0.3)


def test_speculation_comes_back_when_the_draft_turns_good(tiny_target):
    """Useless for the first 48 positions, right from there on: the probes,
    judged without runs, find it out, and runs carry guesses again."""
    stats = generate(tiny_target, ScriptedDraft(tiny_target, lambda pos: (pos >= 51, 0.9)), [5, 6, 7], 144)
    assert stats.num_accepted_tokens > 48
    assert stats.num_runs < 144 - 40


def test_a_good_draft_goes_deep(tiny_target):
    stats = generate(tiny_target, ScriptedDraft(tiny_target, lambda pos: (True, 0.9)), [5, 6, 7], 96, draft_len=4)
    assert stats.acceptance_rate > 0.95
    assert stats.mean_accepted_len > 3  # runs carry draft_len guesses, and they all land
    assert stats.num_runs < 96 / 3


def test_guesses_the_draft_doubts_stay_out_once_its_doubt_proves_right(tiny_target):
    """Right when it says 0.9, wrong when it says 0.1, at random positions
    (nothing the depth could tell): once calibrated, no run is launched on a
    doubtful guess, where the same guesses without a telling confidence waste
    runs. (Simulated stages, where a run and a token cost what the cost
    model says whatever this machine's load: on local stages that share
    their forwards, a run launched with its parent costs nothing here, and
    its cancellation nothing either.)"""
    is_wrong = lambda pos: hash((pos, 17)) % 4 == 0  # noqa: E731
    telling = generate_simulated(tiny_target, ScriptedDraft(tiny_target, lambda pos: (
        not is_wrong(pos), 0.1 if is_wrong(pos) else 0.9)), [5, 6, 7], 150)
    blind = generate_simulated(tiny_target, ScriptedDraft(tiny_target, lambda pos: (not is_wrong(pos), 0.5)),
                               [5, 6, 7], 150)
    assert telling.num_runs_cancelled < blind.num_runs_cancelled / 2
    assert telling.elapsed_s < blind.elapsed_s

