"""The draft head (draft_models/head.py), its training (pipeinfer train-draft)
and tail drafting: the last stage drafts from where verification ends, with
features captured on every stage."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from compute.types import GenerationRequest, SamplingParams
from draft_models import DraftSpecError, parse_draft
from draft_models.distill import Batch, Conversation, unrolled
from draft_models.head import CONFIG_FILE, DraftHead, HeadLine, read_head_config
from pipeline.partition import balanced_plans
from pipeline.stage import Stage
from pipeline.types import Mode, Run
from tests.helpers import greedy_reference, load_engine

PIPEINFER = str(Path(sys.executable).parent / "pipeinfer")


def test_head_specs_parse():
    assert parse_draft("head:default").kind == "head"
    assert parse_draft("head:/some/dir").path == "/some/dir"
    assert parse_draft("head:default").is_free  # it computes on the last stage, not beside the coordinator
    with pytest.raises(DraftSpecError, match="head:default or head:PATH"):
        parse_draft("head:")


def test_a_head_for_another_target_or_no_head_is_a_clear_error(tiny_targets, tiny_heads, tmp_path):
    with pytest.raises(DraftSpecError, match="trained for a target with"):
        load_engine(tiny_targets["llama-tied"], f"head:{tiny_heads['llama']}")  # 5 layers, the head knows 4
    with pytest.raises(DraftSpecError, match=f"holds no {CONFIG_FILE}"):
        load_engine(tiny_targets["llama"], f"head:{tmp_path}")


def test_the_shipped_head_fits_and_matches_the_default_model(default_model):
    from draft_models.head import checked_head_dir, head_dir

    directory = head_dir("default")
    assert sum(f.stat().st_size for f in directory.iterdir()) <= 20 * 2**20
    checked_head_dir("default", default_model)
    config = read_head_config(directory)
    assert len(config.feature_layers) == 3 and len(config.draft_vocab) < config.vocab_size


def reference_features(model_dir: Path, token_ids: list[int], layers) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
    return torch.cat([hidden[layer + 1][0] for layer in layers], dim=-1)


@pytest.mark.parametrize("stages", [1, 2, 3])
@pytest.mark.parametrize("seeded", [False, True])
def test_tail_guesses_are_the_heads_own_from_where_verification_ends(tiny_target, tiny_heads, stages, seeded):
    """A run of [prompt, two right guesses, a wrong one]: the last stage drafts
    from the wrong guess's position (the target's token there, the features
    one position before, carried across the stages), exactly as the head
    does from the target's own hidden states."""
    head_dir = tiny_heads["llama"]
    sampling = SamplingParams(temperature=0.8, seed=5) if seeded else SamplingParams()
    prompt = [5, 17, 33, 5, 17]
    truth = greedy_reference(tiny_target, prompt, 3) if not seeded else None
    if seeded:  # the coupled choices, from a run of the prompt alone, one at a time
        from tests.pipeline.test_lossless import coupled_reference

        truth = coupled_reference(tiny_target, prompt, 3, sampling)
    wrong = next(t for t in range(2, 96) if t != truth[2])
    plans = tuple(dataclasses.replace(p, draft_head=str(head_dir)) for p in balanced_plans(tiny_target, stages))
    pipeline = [Stage.load(tiny_target, plans, i, "float32") for i in range(stages)]
    run = Run(0, 0, None, 0, (*prompt, truth[0], truth[1], wrong), False, sampling,
              logits_from=len(prompt) - 1, tail_guesses=4)
    out = None
    for stage in pipeline:
        out = stage.process(run, out)
    assert out.failure is None and out.target_token_ids[:3] == truth
    assert out.guesses_start == len(prompt) + 3  # after the target's own token where `wrong` stood
    head = DraftHead.load(head_dir, tiny_target)
    text = [*prompt, truth[0], truth[1]]
    line = HeadLine()
    head.extend(line, 0, reference_features(tiny_target, text, head.config.feature_layers), text)
    expected, confidences = head.draft(line, len(text) - 1, truth[2], 4, sampling)
    assert out.guesses == expected
    assert out.guess_confidences == pytest.approx(confidences, abs=1e-4)
    assert all(0.0 <= c <= 1.0 for c in confidences)


def test_serving_drafts_what_training_unrolls(tiny_target, tiny_heads):
    """The head as the last stage runs it (a line extended run by run, then
    drafting from a position) and as train-draft unrolls it (whole
    conversations, every start at once) compute the same guesses."""
    head = DraftHead.load(tiny_heads["llama"], tiny_target)  # packed, as served
    trained = DraftHead.load(tiny_heads["llama"], tiny_target)
    trained.output = None  # the training path: the unpacked output matrix
    text = [5, 17, 33, 5, 17, 60, 2, 71, 9, 40, 41, 42]
    features = reference_features(tiny_target, text, head.config.feature_layers)
    to_draft = torch.full((96,), -100, dtype=torch.long)
    to_draft[torch.tensor(head.config.draft_vocab)] = torch.arange(len(head.config.draft_vocab))
    batch = Batch.of([Conversation(torch.tensor(text), 1, features.half(), torch.tensor(text[1:] + [0]))], to_draft)
    batch.features = features.unsqueeze(0)  # full precision, as served
    with torch.no_grad():
        steps = unrolled(trained, batch, depth=3, teacher=False)
    line = HeadLine()
    head.extend(line, 0, features[:4], text[:4])  # two runs, as a stage takes them in
    head.extend(line, 4, features[4:9], text[4:9])
    for start in (3, 6, 9):  # step 1 from `start` is the entry (features of start - 1, token start)
        guesses, _ = head.draft(line, start - 1, text[start], 3, SamplingParams())
        assert guesses == [int(head.draft_vocab[trained.logits(normed[0, start]).argmax()]) for normed in steps], start


def test_the_head_stops_where_its_chain_falls_below_the_floor(tiny_target, tiny_heads):
    """Drafting stops once the product of the head's probabilities is under
    the run's tail_floor: the same guesses, cut, on the stage as in the head."""
    head_dir = tiny_heads["llama"]
    head = DraftHead.load(head_dir, tiny_target)
    text = [5, 17, 33, 5, 17, 60, 2]
    line = HeadLine()
    head.extend(line, 0, reference_features(tiny_target, text[:-1], head.config.feature_layers), text[:-1])
    guesses, confidences = head.draft(line, len(text) - 2, text[-1], 6, SamplingParams())
    assert len(guesses) == 6 and max(confidences[1:]) < 1.0
    for cut in (1, 2, 4):
        floor = float(torch.tensor(confidences[:cut]).prod()) * 1.0001  # just above the chance after `cut` guesses
        assert head.draft(line, len(text) - 2, text[-1], 6, SamplingParams(), floor)[0] == guesses[:cut]
    plans = tuple(dataclasses.replace(p, draft_head=str(head_dir)) for p in balanced_plans(tiny_target, 1))
    stage = Stage.load(tiny_target, plans, 0, "float32")
    floor = float(torch.tensor(confidences[:2]).prod()) * 1.0001
    run = Run(0, 0, None, 0, tuple(text), False, SamplingParams(), logits_from=len(text) - 1, tail_guesses=6,
              tail_floor=floor)
    out = stage.process(run, None)
    assert out.guesses_start == len(text) + 1
    line = HeadLine()
    head.extend(line, 0, reference_features(tiny_target, text, head.config.feature_layers), text)
    expected, _ = head.draft(line, len(text) - 1, out.target_token_ids[0], 6, SamplingParams(), floor)
    assert out.guesses == expected


def test_the_coordinator_asks_the_head_to_stop_where_a_guess_would_not_be_launched(tiny_target, tiny_heads):
    prompt = (9, 8, 7, 9, 8)
    with load_engine(tiny_target, f"head:{tiny_heads['llama']}", 2, Mode.PIPEINFER) as engine:
        runs, submit = [], engine.transport.submit_together
        engine.transport.submit_together = lambda launched: (runs.extend(launched), submit(launched))[1]
        engine._coordinator._bars = lambda source="draft": (0.5, 0.25)  # (a run's bar, a token's): measured ones move
        got = engine.complete(GenerationRequest(prompt, 12))
    assert got.token_ids == greedy_reference(tiny_target, list(prompt), 12)
    asked = [run for run in runs if run.tail_guesses]
    assert asked and all(run.tail_floor == 0.25 for run in asked)


def test_no_tail_guesses_in_ar_mode_or_for_unseeded_sampling(tiny_target, tiny_heads):
    prompt = (9, 8, 7, 9, 8)
    with load_engine(tiny_target, f"head:{tiny_heads['llama']}", 2, Mode.SYNC) as engine:
        unseeded = engine.complete(GenerationRequest(prompt, 12, SamplingParams(temperature=0.9)))
        greedy = engine.complete(GenerationRequest(prompt, 12))
    assert unseeded.stats.draft_guesses == 0 and len(unseeded.token_ids) == 12
    assert greedy.stats.draft_guesses > 0 and greedy.token_ids == greedy_reference(tiny_target, list(prompt), 12)
    with load_engine(tiny_target, f"head:{tiny_heads['llama']}", 2, Mode.AR) as engine:
        assert engine.complete(GenerationRequest(prompt, 12)).stats.draft_guesses == 0


def train_draft(model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PIPEINFER, "train-draft", "--model", str(model), "--out", str(out), "--num-prompts", "8",
                           "--max-new-tokens", "8", "--batch", "8", "--eval-every", "3", "--draft-vocab", "64",
                           "--device", "cpu", *extra], capture_output=True, text=True, timeout=600)


def test_train_draft_end_to_end_resumes_and_serves(tiny_text_model, tmp_path):
    """A tiny train-draft run through the command line: the files, a resumed
    second run, a refused change of settings, and a lossless engine with it."""
    out = tmp_path / "head"
    first = train_draft(tiny_text_model, out, "--steps", "6")
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"--draft head:{out}" in first.stdout
    for name in ("head.json", "head.safetensors", "training.png", "data/part-0000.pt", "checkpoint.pt", "history.json"):
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert [s for s, _ in history["loss"]] == list(range(1, 7))
    assert [s for s, *_ in history["eval"]] == [3, 6] and len(history["eval"][0][1]) == 4  # depth 4
    assert all(1.0 <= in_loop <= 5.0 for *_, in_loop in history["eval"])  # tokens per verification in sync's loop
    assert len(read_head_config(out).draft_vocab) == 64

    second = train_draft(tiny_text_model, out, "--steps", "9")
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = json.loads((out / "history.json").read_text())
    assert resumed["loss"][:6] == history["loss"] and [s for s, _ in resumed["loss"]][6:] == [7, 8, 9]

    changed = train_draft(tiny_text_model, out, "--steps", "9", "--lr", "0.5")
    assert changed.returncode == 2 and "other settings" in changed.stderr

    # Fine-tuning starts from the head's weights and keeps its draft vocabulary
    # (at lr 0 it is the same head), reusing nothing of its run but the head;
    # here on requests the target wrote alone.
    tuned = train_draft(tiny_text_model, tmp_path / "tuned", "--steps", "2", "--lr", "0", "--draft-vocab", "32",
                        "--init", f"head:{out}", "--num-prompts", "0", "--target-prompts", "8")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert len(json.loads((tmp_path / "tuned" / "data" / "written.json").read_text())["texts"]) == 8
    assert read_head_config(tmp_path / "tuned") == read_head_config(out)
    tuned_weights, weights = (load_file(str(d / "head.safetensors")) for d in (tmp_path / "tuned", out))
    assert tuned_weights.keys() == weights.keys() and all(torch.equal(tuned_weights[k], weights[k]) for k in weights)
    other = train_draft(tiny_text_model, tmp_path / "other", "--steps", "2", "--init", "head:default")
    assert other.returncode == 2 and "trained for a target" in other.stderr
    not_a_head = train_draft(tiny_text_model, tmp_path / "other", "--steps", "2", "--init", "layers:1")
    assert not_a_head.returncode == 2 and "expected head:default or head:DIR" in not_a_head.stderr

    prompt = [5, 17, 33, 5, 17]
    for mode in ("sync", "pipeinfer"):
        with load_engine(tiny_text_model, f"head:{out}", 2, mode, min_accept_prob=0.0) as engine:
            got = engine.complete(GenerationRequest(tuple(prompt), 16))
        assert got.token_ids == greedy_reference(tiny_text_model, prompt, 16), mode


def test_training_answers_run_past_end_of_text(tiny_text_model, tmp_path):
    """The bench and Locust send ignore_eos: the target's text after its
    end-of-text token is training data too (generation neither stops there
    nor masks it), and each answer is the target's own greedy text."""
    import shutil

    from draft_models.distill import generate_data
    from draft_models.train_config import TrainConfig
    from draft_models.training_prompts import training_prompts

    model = tmp_path / "m"
    shutil.copytree(tiny_text_model, model)
    probe = generate_data(TrainConfig(num_prompts=1, max_new_tokens=8, sampled_share=0.0), model, (1,), False)[0]
    first = int(probe.token_ids[probe.prompt_len])  # make the target's first answer token its end-of-text
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": first}))
    data = generate_data(TrainConfig(num_prompts=2, max_new_tokens=8, sampled_share=0.0), model, (1, 2), False)
    for conversation in data:
        answer = conversation.token_ids[conversation.prompt_len:].tolist()
        assert len(answer) == 8 and conversation.features.shape == (len(conversation.token_ids), 2 * 64)
        assert answer == greedy_reference(model, conversation.token_ids[:conversation.prompt_len].tolist(), 8)
    assert data[0].token_ids.tolist() == probe.token_ids.tolist() and first in data[0].token_ids[probe.prompt_len:]
    assert len(training_prompts()) >= 2000


def test_training_prompts_are_peoples_own_in_two_blocks_without_a_bench_prompt(tiny_text_model):
    """The requests first (the project's and evals' MIT ones, each naming its
    source), then the questions of chitchat-dataset (MIT); a tenth of each
    held out; none of the bench's prompts, so the bench measures prompts the
    head never saw."""
    import json

    import draft_models.distill as distill
    from draft_models.training_prompts import REQUESTS_FILE, block_sizes, held_out, training_prompts
    from loadtests.bench_config import PROMPT_SETS, load_prompts

    texts = [m[0]["content"] for m in training_prompts()]
    requests, questions = block_sizes()
    assert (requests, questions) == (759, 23255) and len(texts) == requests + questions
    assert len({t.lower() for t in texts}) == len(texts)
    assert texts[0] == "What should I cook for a friend who is vegan?"  # the fixed order
    assert all(t.endswith("?") and len(t.split()) >= 5 for t in texts[requests:])
    sources = {json.loads(line)["source"].split("/")[0] for line in REQUESTS_FILE.read_text().splitlines()}
    assert sources == {"pipeinfer", "evals"}
    bench = {content.lower() for name in PROMPT_SETS for prompt in load_prompts(name) for _, content in prompt}
    assert bench and not bench & {t.lower() for t in texts}
    assert held_out(len(texts)) == list(range(75)) + list(range(759, 759 + 2325))
    assert held_out(16) == [0] and held_out(760) == list(range(75)) + [759]
    with pytest.raises(ValueError, match="--num-prompts at most 24014"):
        distill.generate_data(distill.TrainConfig(num_prompts=len(texts) + 1), tiny_text_model, (1,), False)


def test_target_written_prompts_come_after_the_set_and_resume(tiny_text_model, tmp_path):
    """--target-prompts: the target writes a request per ask (continuing a
    list of written requests, up to its line's end), kept as they come (a
    rerun goes on where they stopped, with the same requests), and they are
    answered after the project's prompts, a tenth of their block held out;
    other settings are refused, not mixed in."""
    import draft_models.distill as distill
    from draft_models.training_prompts import held_out, training_prompts, writing_asks

    config = distill.TrainConfig(num_prompts=2, target_prompts=5, max_new_tokens=4, sampled_share=0.0, gen_batch=2)
    data = distill.generate_data(config, tiny_text_model, (1,), False, tmp_path)
    written = tmp_path / distill.WRITTEN_FILE
    texts = json.loads(written.read_text())["texts"]
    assert len(data) == 7 and len(texts) == 5 and all(len(t.split()) >= 3 and "\n" not in t for t in texts)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    prompts = [tokenizer.decode(c.token_ids[:c.prompt_len]) for c in data]
    assert training_prompts()[0][0]["content"] in prompts[0] and texts[0] in prompts[2] and texts[4] in prompts[6]

    saved = json.loads(written.read_text())
    written.write_text(json.dumps({**saved, "texts": saved["texts"][:2]}))  # as if stopped after a batch
    again = distill.generate_data(config, tiny_text_model, (1,), False, tmp_path)
    assert json.loads(written.read_text())["texts"] == texts and len(again) == 7
    with pytest.raises(ValueError, match="other settings"):
        distill.generate_data(dataclasses.replace(config, target_prompts=6), tiny_text_model, (1,), False, tmp_path)

    # One that is a bench prompt is replaced by its ask's example (the command line reserves the bench's).
    from cluster.cli import _bench_prompt_texts

    reserved = dataclasses.replace(config, reserved=(f" {texts[1]} ", "What is the capital of France?"))
    again = distill.written_prompts(reserved, tokenizer, lambda: pytest.fail("all written"), False, tmp_path)
    assert [m[0]["content"] for m in again] == [texts[0], writing_asks(5)[1][1], *texts[2:]]
    assert "What is the capital of France?" in _bench_prompt_texts()

    assert held_out(2, 5) == [0, 2] and held_out(0, 30) == [0, 1, 2]
    (ask, example), other = writing_asks(2)
    assert ask.endswith("\n5.") and f"1. {example}\n" in ask and other[0] != ask
    assert {c[0]["content"] for c in training_prompts()} >= {e for _, e in writing_asks(50)}  # examples: the set's
    with pytest.raises(ValueError, match="two prompts"):
        distill.TrainConfig(num_prompts=0, target_prompts=1).check()


def test_a_data_part_from_other_prompts_is_refused(tiny_text_model, tmp_path, monkeypatch):
    """Each part's key holds a fingerprint of its prompts: data written
    before the prompt set changed is not read as the new set's."""
    import draft_models.distill as distill

    config = distill.TrainConfig(num_prompts=2, max_new_tokens=4, sampled_share=0.0)
    written = distill.generate_data(config, tiny_text_model, (1,), False, tmp_path)
    assert len(distill.generate_data(config, tiny_text_model, (1,), False, tmp_path)) == len(written) == 2
    prompts = distill.training_prompts()
    monkeypatch.setattr(distill, "training_prompts", lambda: prompts[1:])
    with pytest.raises(ValueError, match="other settings"):
        distill.generate_data(config, tiny_text_model, (1,), False, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2])
def test_the_shipped_head_is_lossless_and_guesses_well(default_model, stages):
    """The default model with head:default on two chat prompts it never
    trained on: the target's greedy text, and guesses accepted (sync mode,
    4 guesses a run, every one launched: no bar measured from timing): over
    both, more than 1.5 tokens a verification (a head
    that guesses nothing right gives 1; one prompt alone varies: 1.4 to
    1.9 over the everyday set's prompts with the previous head)."""
    messages = [[{"role": "user", "content": "What should I pack for a weekend hiking trip in the mountains?"}],
                [{"role": "user", "content": "Give me two tips for learning to cook."}]]
    generated = verifications = 0
    with load_engine(default_model, "head:default", stages, Mode.SYNC, draft_len=4, min_accept_prob=0.0) as engine:
        for message in messages:
            ids = engine.encode_chat(message)
            out = engine.complete(GenerationRequest(tuple(ids), 32))
            assert out.token_ids == greedy_reference(default_model, list(ids), 32)
            generated += out.stats.num_generated_tokens
            verifications += out.stats.num_verify_steps
    assert generated / verifications > 1.5, (generated, verifications)


def test_sync_loop_drafts_after_each_verification():
    """The training's in-loop measure: a verification from p gains the
    guesses accepted there plus the target's token, and the next starts
    after them (positions in between are never drafted from)."""
    from draft_models.distill import sync_loop

    accepted = [9, 9, 2, 0, 4, 3, 0, 1, 0, 0]
    #            start ^2: +3 -> 5: +4 -> 9: +1 -> end
    assert sync_loop(accepted, 2, 10) == (8, 3)
    assert sync_loop(accepted, 3, 10) == (7, 3)  # 3: +1 -> 4: +5 -> 9: +1 -> end
    assert sync_loop([0] * 6, 1, 6) == (5, 5)  # nothing accepted: one token per verification


def test_a_run_launched_with_its_parent_rides_in_its_forward_and_costs_tokens(tiny_target, tiny_heads):
    """On one stage the runs launched in one step (here from a result's tail
    guesses, two runs' worth in pipeinfer mode) go through it in one
    forward, so a run chained behind one launched with it costs its tokens,
    not a run: its first guess is judged by the token bar. No guess is
    worth a run of its own here (the run bar is out of reach), every one a
    token. (On several stages the chained run overlaps its parent instead:
    tests/pipeline/test_stage_loop.py.)"""
    prompt = (9, 8, 7, 9, 8)
    with load_engine(tiny_target, f"head:{tiny_heads['llama']}", 1, Mode.PIPEINFER, draft_len=2) as engine:
        engine._coordinator._bars = lambda source="draft": (1.01, 0.0)  # (a run's bar, a token's)
        engine.stage_spans()
        out = engine.complete(GenerationRequest(prompt, 16))
        spans = engine.stage_spans()
    assert out.token_ids == greedy_reference(tiny_target, list(prompt), 16)
    forwards: dict[tuple, set[int]] = {}  # (stage, start, end) -> the runs that shared it
    for span in spans:
        forwards.setdefault((span.stage, span.start_s, span.end_s), set()).add(span.run_id)
    shared = [key for key, runs in forwards.items() if len(runs) == 2]
    assert len(shared) >= 4
    assert out.stats.num_runs > out.stats.num_verify_steps  # chained runs: launched only by riding


def test_the_heads_compute_is_counted_and_min_accept_prob_sets_every_bar(tiny_target, tiny_heads):
    """The head's time comes back with its guesses (it is the last stage's
    time, which the bars charge each guess with); --min-accept-prob set by
    hand is the bar of every guess, so 0 asks the head for all it can give."""
    prompt = (9, 8, 7, 9, 8)
    with load_engine(tiny_target, f"head:{tiny_heads['llama']}", 2, Mode.SYNC, min_accept_prob=0.0) as engine:
        runs, submit = [], engine.transport.submit_together
        engine.transport.submit_together = lambda launched: (runs.extend(launched), submit(launched))[1]
        out = engine.complete(GenerationRequest(prompt, 12))
        head_s = sum(stage["draft_head_s"] for stage in engine.stage_stats())
    asked = [run for run in runs if run.tail_guesses]
    assert asked and all(run.tail_floor == 0.0 for run in asked)
    assert 0 < out.stats.draft_s <= head_s and out.stats.draft_guesses > 0


def test_the_heads_lines_count_in_the_stages_kv_budget(tiny_target, tiny_heads):
    """The last stage keeps per sequence the head's features, keys and
    values beside the KV: --kv-budget-bytes bounds both, and kv_bytes
    reports both; a finished sequence frees both."""
    from pipeline.types import FreeSequence

    plans = tuple(dataclasses.replace(p, draft_head=str(tiny_heads["llama"])) for p in balanced_plans(tiny_target, 1))
    stage = Stage.load(tiny_target, plans, 0, "float32")
    text = (5, 17, 33, 5, 17, 60)
    stage.process(Run(0, 0, None, 0, text, False, SamplingParams(), logits_from=len(text) - 1), None)
    kv_bytes, head_bytes = stage.kv.num_bytes(), stage.head_lines[0].num_bytes()
    assert head_bytes > 0 and stage.stats()["kv_bytes"] == kv_bytes + head_bytes
    stage.kv.budget_bytes = kv_bytes + head_bytes // 2  # room for the KV alone, not for the lines beside it
    out = stage.process(Run(1, 1, None, 0, text, False, SamplingParams(), logits_from=len(text) - 1), None)
    assert out.failure is not None and "KV cache full" in out.failure.message
    stage.apply(FreeSequence(0))
    assert stage.stats()["kv_bytes"] == 0
    assert stage.process(Run(2, 1, None, 0, text, False, SamplingParams(), logits_from=len(text) - 1), None).failure is None


def test_ngram_and_head_each_draft_where_they_should_and_are_judged_apart(tiny_target, tiny_heads):
    """ngram+head: the lookup's guesses where the text's last 3 tokens
    occurred before, the head's elsewhere (the first result's guesses are
    the head's unless the lookup has some); each source counted apart; the
    text the target's own."""
    head = tiny_heads["llama"]
    repetitive, plain = (5, 6, 7, 8, 9, 5, 6, 7), (11, 40, 3, 77, 21)
    sources = {}
    with load_engine(tiny_target, f"ngram+head:{head}", 2, Mode.SYNC, min_accept_prob=0.0) as engine:
        for name, prompt in (("repetitive", repetitive), ("plain", plain)):
            out = engine.complete(GenerationRequest(prompt, 12))
            assert out.token_ids == greedy_reference(tiny_target, list(prompt), 12), name
            sources[name] = out.stats.guesses_by_source
    # The repeated prompt's first guesses come from the lookup (5, 6, 7 was followed by 8 before).
    assert sources["repetitive"]["draft"][0] > 0
    # With no long match the head drafts: its guesses are launched, and counted as its own.
    assert sources["plain"]["head"][0] > 0
    for counts in sources.values():
        assert all(0 <= accepted <= launched for launched, accepted in counts.values())


@pytest.mark.slow
def test_auto_is_ngram_and_the_shipped_head_for_the_default_model_and_ngram_elsewhere(default_model, tiny_target):
    from draft_models.factory import concrete_draft

    assert concrete_draft("auto", default_model) == "ngram+head:default"
    assert concrete_draft("auto", tiny_target) == "ngram"  # the shipped head was trained for another target
    assert concrete_draft("head:default", default_model) == "head:default"
