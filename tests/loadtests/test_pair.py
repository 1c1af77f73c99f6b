"""loadtests/pair.py: the damped target's self-draft agrees at the rate asked,
the agreement is measured as the draft runs (and as the engine measures it),
and the 0.7b shape costs what its docstring says."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig, LlamaForCausalLM

from compute.types import GenerationRequest
from loadtests.pair import (
    DAMPED_PROJECTIONS,
    NUM_NEW_TOKENS,
    REPORT_NAME,
    PairError,
    damp,
    damped_parameters,
    draft_logits,
    find_eps,
    greedy_with_draft,
    make_pair,
    measure_agreement,
    random_prompts,
)
from loadtests.shapes import SHAPES, PairShape
from pipeline.config import EngineConfig
from pipeline.engine import Engine
from pipeline.speculation import SpeculationConfig
from pipeline.types import Mode

TINY = SHAPES["tiny"]
TOLERANCE = 0.03
# The default tokenizer's vocabulary, tied: for a pair the engine can tokenize text with.
TINY_TEXT = PairShape(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                      vocab_size=49152, max_position_embeddings=512)


def undamped_model(shape: PairShape, seed: int) -> LlamaForCausalLM:
    """The target as built, before damping (make_pair seeds the same way)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.config()).eval()


def load(path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()


def prefix_model(model: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """The first num_layers layers of model, then its final norm and head, as a model of its own."""
    config = AutoConfig.for_model(**{**model.config.to_dict(), "num_hidden_layers": num_layers})
    prefix = LlamaForCausalLM(config).eval()
    kept = {name: w for name, w in model.state_dict().items()
            if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers}
    prefix.load_state_dict(kept, strict=True)
    return prefix


@pytest.fixture(scope="module")
def pair_0_7(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair") / "a0.7", TINY, 1, 0.7, seed=3, show_progress=False)


@pytest.mark.parametrize(("agreement", "draft_layers"), [(0.7, 1), (0.1, 2)])
def test_bisection_hits_the_agreement(tmp_path, agreement, draft_layers):
    seed = 3
    report = make_pair(tmp_path / "pair", TINY, draft_layers, agreement, seed=seed, show_progress=False)
    assert abs(report.agreement - agreement) <= TOLERANCE, report
    assert report.num_positions == 8 * NUM_NEW_TOKENS
    prompts = random_prompts(TINY.vocab_size, seed)
    # The saved weights are the damped ones: measured again from disk, the same agreement.
    saved = load(report.path)
    assert measure_agreement(saved, draft_layers, prompts) == pytest.approx(report.agreement, abs=2 / 512)
    # Undamped, the draft is far from the rate asked: the damping is what set it.
    undamped = undamped_model(TINY, seed)
    assert abs(measure_agreement(undamped, draft_layers, prompts) - agreement) > 2 * TOLERANCE
    assert report.eps != 1.0
    damped_names = {name for name, _ in damped_parameters(undamped, draft_layers)}
    assert len(damped_names) == len(DAMPED_PROJECTIONS) * (TINY.num_layers - draft_layers)
    saved_weights, built_weights = saved.state_dict(), undamped.state_dict()
    for name, built in built_weights.items():
        expected = built * report.eps if name in damped_names else built
        torch.testing.assert_close(saved_weights[name], expected, msg=name)
    written = json.loads((report.path / REPORT_NAME).read_text())
    assert written == json.loads(json.dumps(report.as_dict()))
    assert written["eps"] == report.eps and written["draft_layers"] == draft_layers


def test_eps_zero_makes_the_draft_exact():
    model = undamped_model(TINY, seed=3)
    undamped = {name: p.detach().clone() for name, p in damped_parameters(model, 1)}
    prompts = random_prompts(TINY.vocab_size, 3)
    assert measure_agreement(model, 1, prompts) < 0.5
    damp(model, 1, 0.0, undamped)
    assert measure_agreement(model, 1, prompts) == 1.0
    with torch.no_grad():
        out = model(prompts, output_hidden_states=True)
        torch.testing.assert_close(draft_logits(model, out.hidden_states[1]), out.logits)
    # Damping restarts from the undamped weights: eps 0 then eps 1 is the model as built.
    damp(model, 1, 1.0, undamped)
    assert measure_agreement(model, 1, prompts) == measure_agreement(undamped_model(TINY, seed=3), 1, prompts)


def test_make_pair_at_agreement_one_damps_to_zero(tmp_path):
    report = make_pair(tmp_path / "pair", TINY, 2, 1.0, show_progress=False)
    assert report.eps == 0.0 and report.agreement == 1.0 and report.num_evaluations == 1


def test_hidden_state_shortcut_is_the_prefix_model(pair_0_7):
    model = load(pair_0_7.path)
    prompts = random_prompts(TINY.vocab_size, 3)
    tokens, guesses = greedy_with_draft(model, 1, prompts)
    prefix = prefix_model(model, 1)
    sequence = torch.cat([prompts, tokens], 1)
    with torch.no_grad():
        manual = prefix(sequence).logits
        shortcut = draft_logits(model, model(sequence, output_hidden_states=True).hidden_states[1])
    torch.testing.assert_close(shortcut, manual, rtol=1e-4, atol=1e-4)
    # Step by step with the KV cache (as measured), the prefix model's guess at every generated position.
    judged = manual[:, prompts.shape[1] - 1: -1].argmax(-1)
    assert torch.equal(guesses, judged)
    assert 0.5 < (guesses == tokens).float().mean().item() < 0.9


def test_engine_acceptance_matches_the_agreement(tmp_path, default_model):
    report = make_pair(tmp_path / "pair", TINY_TEXT, 1, 0.7, seed=5, tokenizer_from=default_model,
                       show_progress=False)
    assert abs(report.agreement - 0.7) <= TOLERANCE
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (report.path / name).read_bytes() == (default_model / name).read_bytes()
    eos_token_id = AutoConfig.from_pretrained(default_model).eos_token_id
    assert AutoConfig.from_pretrained(report.path).eos_token_id == eos_token_id
    prompts = random_prompts(TINY_TEXT.vocab_size, 5)[:4]
    tokens, _ = greedy_with_draft(load(report.path), 1, prompts, num_new_tokens=48)
    p = report.agreement
    # draft_len 1: every guess is judged given the verified prefix, as the agreement was measured.
    # Deeper, a guess counts only after all before it: k guesses accept (p + p^2 + ... + p^k) / k.
    for draft_len, expected_rate in ((1, p), (4, sum(p ** i for i in range(1, 5)) / 4)):
        speculation = SpeculationConfig(mode=Mode.SYNC, draft_len=draft_len)
        config = EngineConfig(model=str(report.path), draft="layers:1", num_stages=2, speculation=speculation)
        accepted = drafted = 0
        with Engine.load(config, show_progress=False) as engine:
            for prompt, expected in zip(prompts.tolist(), tokens.tolist()):
                out = engine.complete(GenerationRequest(tuple(prompt), 48, stop_token_ids=frozenset()))
                assert out.token_ids == expected
                accepted += out.stats.num_accepted_tokens
                drafted += out.stats.num_draft_tokens
            if draft_len == 1:  # the pair speaks the default tokenizer
                assert len(engine.complete_text("Hello there", 4, ignore_eos=True).token_ids) == 4
        assert drafted > 60
        assert abs(accepted / drafted - expected_rate) < 0.15, (draft_len, accepted, drafted, p)


def test_the_0_7b_shape_costs_what_it_says(default_model):
    shape = SHAPES["0.7b"]
    layer = 2 * 512 * 512 + 2 * 512 * 256 + 3 * 512 * 11264 + 2 * 512  # q o, k v, gate up down, two norms
    assert shape.num_layer_params == layer == 18_088_960
    assert shape.num_params == 49152 * 512 + 40 * layer + 512 == 748_724_736  # tied: the head is the embedding
    assert 0.7e9 <= shape.num_params <= 0.8e9
    # A 1-layer draft: one layer, the norm and the head, over a 10-layer stage.
    assert shape.draft_cost(1, 4) == pytest.approx((layer + 512 + 49152 * 512) / (10 * layer))
    assert 0.23 < shape.draft_cost(1, 4) <= 0.25
    assert shape.draft_cost(2, 4) == pytest.approx(shape.draft_cost(1, 4) + 0.1)
    assert shape.vocab_size == AutoConfig.from_pretrained(default_model).vocab_size and shape.tie_word_embeddings
    # The arithmetic is transformers' own: the model built without memory has as many parameters.
    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config())
    assert sum(p.numel() for p in model.parameters()) == shape.num_params
    assert sum(p.numel() for p in model.model.layers[0].parameters()) == shape.num_layer_params


def test_tiny_shape_counts_match_a_built_model():
    for shape in (TINY, PairShape(3, 32, 80, 4, 4, 50, tie_word_embeddings=False)):
        model = LlamaForCausalLM(shape.config())
        assert sum(p.numel() for p in model.parameters()) == shape.num_params


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, default_model):
    with pytest.raises(PairError, match=r"vocabulary of 49152 tokens but the shape's vocab_size is 96"):
        make_pair(tmp_path / "pair", TINY, 1, 0.7, tokenizer_from=default_model, show_progress=False)
    assert not (tmp_path / "pair").exists()  # refused before anything was built
    with pytest.raises(PairError, match="no tokenizer.json"):
        make_pair(tmp_path / "pair", TINY, 1, 0.7, tokenizer_from=tmp_path, show_progress=False)
    with pytest.raises(PairError, match="draft_layers must be in 1..3"):
        make_pair(tmp_path / "pair", TINY, 4, 0.7, show_progress=False)


def test_find_eps_bisects_a_falling_curve_and_refuses_a_jump():
    def smooth(eps: float) -> float:
        return 1.0 / (1.0 + eps)  # 0.25 at eps 3

    eps, agreement, evaluations = find_eps(smooth, 0.25, 0.001)
    assert abs(agreement - 0.25) <= 0.001 and eps == pytest.approx(3.0, rel=0.02) and evaluations < 48

    def cliff(eps: float) -> float:
        return 0.9 if eps < math.pi else 0.1

    with pytest.raises(PairError, match="no damping gets agreement within 0.03 of 0.5"):
        find_eps(cliff, 0.5, 0.03)


def test_make_pair_command(tmp_path, capsys):
    from cluster.cli import main

    out = tmp_path / "pair"
    assert main(["make-pair", "--shape", "tiny", "--agreement", "0.7", "--seed", "3", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / REPORT_NAME).read_text())
    assert abs(printed["agreement"] - 0.7) <= TOLERANCE and printed["draft_layers"] == 1
    assert main(["make-pair", "--shape", "tiny", "--agreement", "0.7", "--draft-layers", "4",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "draft_layers must be in 1..3" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
