"""`pipeinfer train-draft`: a draft head trained by self-distillation.

1. The target writes: its greedy (and some sampled) continuations of a
   prompt set, each max_new_tokens long, past end-of-text too; a batch of
   answers at a time, in one forward per step through the stages' own
   compute (compute/stage_model.py).
2. While it writes, its hidden states at the head's feature layers are
   recorded at every position, and its likeliest next tokens with their
   log-probabilities wherever a label is needed.
3. The head learns to predict the target's next-next token from (the
   features, the next token), unrolled `depth` steps on its own outputs as
   it drafts (EAGLE-3's training-time test), over the reduced vocabulary.

Everything lands in the output directory: data/ (the generated data, a
file per part; reused, and resumed, on a rerun), checkpoint.pt (resumed
from), head.json + head.safetensors (the head), training.png (loss, and
acceptance at each draft depth on held-out conversations) and history.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from compute.line_kv import DraftKV
from compute.model_source import load_config, resolve_model
from compute.stage_model import StageModel
from compute.threads import on_passing_thread
from draft_models.head import WEIGHTS_FILE, DraftHead, HeadConfig, checked_head_dir, read_head_config, target_embedding
from draft_models.spec import parse_draft
from draft_models.train_config import TrainConfig
from draft_models.training_prompts import Messages, held_out, training_prompts, writing_asks

log = logging.getLogger(__name__)

DATA_DIR = "data"  # the generated data, a part file per SHARD_PROMPTS prompts
SHARD_PROMPTS = 512
SAMPLED_TEMPERATURE = 0.7  # of the answers sampled rather than greedy
WRITTEN_FILE = "written.json"  # in DATA_DIR: the requests the target wrote (--target-prompts)
WRITE_TOKENS = 40  # most tokens of a request the target writes
WRITE_TEMPERATURE = 0.7  # its requests are sampled, for variety
SOFT_TOP_K = 8
CHECKPOINT_FILE = "checkpoint.pt"
PLOT_FILE = "training.png"
HISTORY_FILE = "history.json"


# ---- data ----------------------------------------------------------------

@dataclass
class Conversation:
    """One answer of the target, with what training reads at each position
    (the labels from the prompt's last position on: the answer is learnt)."""

    token_ids: torch.Tensor  # [T] prompt + continuation
    prompt_len: int
    features: torch.Tensor  # [T, len(feature_layers) * hidden], float16
    next_ids: torch.Tensor  # [T] the target's greedy token after each position (the labels)
    # The target's SOFT_TOP_K likeliest next tokens there and their log-probabilities
    # (soft labels: what the target thinks besides its argmax teaches the head more per position).
    top_ids: torch.Tensor | None = None  # [T, SOFT_TOP_K] int32
    top_logprobs: torch.Tensor | None = None  # [T, SOFT_TOP_K] float16


def generate_data(config: TrainConfig, model_dir: Path, feature_layers: tuple[int, ...],
                  show_progress: bool = True, data_dir: Path | None = None) -> list[Conversation]:
    """The target's continuations of the prompts, with its hidden states at
    the feature layers. With data_dir, written there a part (SHARD_PROMPTS
    prompts) at a time, and the parts already there are read instead of
    generated: an interrupted run resumes at the part it was writing. Each
    batch draws from its own seed, so that resuming changes nothing."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = None  # loaded when first needed

    def target() -> StageModel:
        nonlocal model
        if model is None:
            model = on_passing_thread(lambda: StageModel.load(
                model_dir, 0, load_config(model_dir).num_hidden_layers, with_embed=True, with_head=True,
                device=torch.device(config.device)).pack_weights())
        return model

    prompts = training_prompts()
    if config.num_prompts > len(prompts):
        raise ValueError(f"--num-prompts at most {len(prompts)} (the prompt set: draft_models/training_prompts.py)")
    prompts = prompts[:config.num_prompts]
    if config.target_prompts:
        prompts += written_prompts(config, tokenizer, target, show_progress, data_dir)
    conversations: list[Conversation] = []
    bar = tqdm(total=len(prompts), desc="target writes", unit="prompt", disable=not show_progress)
    for part, first_prompt in enumerate(range(0, len(prompts), SHARD_PROMPTS)):
        shard = None if data_dir is None else data_dir / f"part-{part:04d}.pt"
        key = {**_data_key(config), "feature_layers": list(feature_layers),
               "prompts": _fingerprint(prompts[first_prompt:first_prompt + SHARD_PROMPTS])}
        if shard is not None and shard.exists():
            saved = torch.load(shard, weights_only=False)
            _check_data_key(shard, saved["key"], key)
            conversations += saved["conversations"]
            bar.update(len(saved["conversations"]))
            continue
        written: list[Conversation] = []
        for first in range(first_prompt, min(first_prompt + SHARD_PROMPTS, len(prompts)), config.gen_batch):
            batch = prompts[first:min(first + config.gen_batch, first_prompt + SHARD_PROMPTS, len(prompts))]
            token_ids = [tokenizer(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                                   add_special_tokens=False)["input_ids"] for m in batch]
            written += _generate_batch(config, target(), token_ids, first, feature_layers)
            bar.update(len(batch))
        if shard is not None:
            shard.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "conversations": written}, shard.with_suffix(".tmp"))
            shard.with_suffix(".tmp").replace(shard)  # a part is there whole or not at all
        conversations += written
    bar.close()
    return conversations


def written_prompts(config: TrainConfig, tokenizer, target: Callable[[], StageModel], show_progress: bool = True,
                    data_dir: Path | None = None) -> list[Messages]:
    """config.target_prompts requests written by the target, one per ask
    (writing_asks: a list of requests it continues with one, sampled, up to
    its line's end); one too short to be a request (under three words) is
    replaced by the ask's first example, as is one of config.reserved. With
    data_dir, kept in WRITTEN_FILE as they come, a batch at a time: a rerun
    goes on where they stop."""
    asks = writing_asks(config.target_prompts)
    key = {"model": config.model, "seed": config.seed, "gen_batch": config.gen_batch, "asks": _fingerprint(asks),
           "sampling": [WRITE_TOKENS, WRITE_TEMPERATURE]}
    path = None if data_dir is None else data_dir / WRITTEN_FILE
    texts: list[str] = []
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        _check_data_key(path, saved["key"], key)
        texts = saved["texts"]
    # Where a request ends: a special token or one holding a line break (decoding the
    # whole vocabulary once, so only when there is something to write).
    stops = set() if len(texts) == len(asks) else (
        set(tokenizer.all_special_ids) | {i for i in tokenizer.get_vocab().values() if "\n" in tokenizer.decode([i])})
    bar = tqdm(total=len(asks), initial=len(texts), desc="target asks", unit="prompt", disable=not show_progress)
    for first in range(len(texts), len(asks), config.gen_batch):
        batch = asks[first:first + config.gen_batch]
        token_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in batch]
        generator = torch.Generator().manual_seed(config.seed * 7919 + first)
        for (_, example), row in zip(batch, _write_batch(target(), token_ids, generator, stops)):
            ends = [i for i, t in enumerate(row) if t in stops]
            text = tokenizer.decode(row[:ends[0] if ends else len(row)]).strip()
            texts.append(text if len(text.split()) >= 3 else example)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps({"key": key, "texts": texts}))
            path.with_suffix(".tmp").replace(path)
        bar.update(len(batch))
    bar.close()
    reserved = {text.strip().lower() for text in config.reserved}
    return [[{"role": "user", "content": example if text.lower() in reserved else text}]
            for text, (_, example) in zip(texts, asks)]


@torch.inference_mode()
def _write_batch(model: StageModel, prompts: list[list[int]], generator: torch.Generator,
                 stops: set[int]) -> list[list[int]]:
    """Up to WRITE_TOKENS sampled tokens after each prompt, in one forward
    per step, until every row has written a stop token."""
    width = model.config.hidden_size
    kvs = [DraftKV(model.num_layers) for _ in prompts]
    hiddens = [model.embed(p) for p in prompts]
    rows: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    for _ in range(WRITE_TOKENS):
        outs = model.forward_batch(hiddens, kvs)
        for kv, hidden in zip(kvs, hiddens):
            kv.advance(hidden.shape[1])
        logits = model.logits(torch.cat([out[:, -1:, :width] for out in outs], dim=1))
        chosen = torch.multinomial(torch.softmax(logits / WRITE_TEMPERATURE, -1), 1, generator=generator)[:, 0]
        for i, token in enumerate(chosen.tolist()):
            rows[i].append(token)
            stopped[i] = stopped[i] or token in stops
        if all(stopped):
            break
        hiddens = [model.embed([token]) for token in chosen.tolist()]
    return rows


@torch.inference_mode()
def _generate_batch(config: TrainConfig, model: StageModel, prompts: list[list[int]], first: int,
                    feature_layers: tuple[int, ...]) -> list[Conversation]:
    """The prompts' continuations, all in one forward per step (the stages'
    own batched compute: every weight read once for all of them, attention
    per sequence on its own KV, no padding), recording at every position
    the features, and the target's top tokens where a label is needed.
    Past end-of-text too (nothing stops a row): the bench and Locust send
    ignore_eos, and what the target writes there is its own."""
    sampled = random.Random(config.seed * 1_000_003 + first).random() < config.sampled_share
    generator = torch.Generator().manual_seed(config.seed + first)
    width = model.config.hidden_size
    kvs = [DraftKV(model.num_layers) for _ in prompts]
    token_ids = [list(p) for p in prompts]
    features: list[list[torch.Tensor]] = [[] for _ in prompts]
    tops: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in prompts]
    hiddens = [model.embed(p) for p in prompts]
    for step in range(config.max_new_tokens + 1):  # the last forward only records the last token's outputs
        outs = model.forward_batch(hiddens, kvs, capture=feature_layers)  # each [1, n, H + F]
        for kv, hidden, out, row in zip(kvs, hiddens, outs, features):
            kv.advance(hidden.shape[1])
            row.append(out[0, :, width:].to(torch.float16))
        logits = model.logits(torch.cat([out[:, -1:, :width] for out in outs], dim=1))  # [B, vocab]
        top = torch.log_softmax(logits, -1).topk(SOFT_TOP_K, dim=-1)  # sorted: [:, 0] is the argmax
        for row, ids, logprobs in zip(tops, top.indices, top.values):
            row.append((ids.to(torch.int32), logprobs.to(torch.float16)))
        if step == config.max_new_tokens:
            break
        if sampled:
            chosen = torch.multinomial(torch.softmax(logits / SAMPLED_TEMPERATURE, -1), 1, generator=generator)[:, 0]
        else:
            chosen = top.indices[:, 0]
        for ids, token in zip(token_ids, chosen.tolist()):
            ids.append(token)
        hiddens = [model.embed([token]) for token in chosen.tolist()]
    conversations = []
    for prompt, ids, row, top_row in zip(prompts, token_ids, features, tops):
        n, labelled = len(ids), len(ids) - len(prompt) + 1  # labels from the prompt's last position on
        top_ids = torch.zeros(n, SOFT_TOP_K, dtype=torch.int32)
        top_logprobs = torch.zeros(n, SOFT_TOP_K, dtype=torch.float16)
        top_ids[n - labelled:] = torch.stack([i for i, _ in top_row])
        top_logprobs[n - labelled:] = torch.stack([v for _, v in top_row])
        conversations.append(Conversation(torch.tensor(ids), len(prompt), torch.cat(row), top_ids[:, 0].long(),
                                          top_ids, top_logprobs))
    return conversations


def draft_vocabulary(conversations: list[Conversation], size: int, vocab_size: int) -> tuple[int, ...]:
    """The tokens the target writes most (ties by id), padded with the lowest ids."""
    counts = Counter()
    for c in conversations:
        counts.update(c.next_ids[c.prompt_len - 1:].tolist())
    chosen = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:size]
    taken = set(chosen)
    chosen += [t for t in range(vocab_size) if t not in taken][: max(0, min(size, vocab_size) - len(chosen))]
    return tuple(chosen)


# ---- training -------------------------------------------------------------

@dataclass
class Batch:
    """Conversations padded to one length: what an unrolled pass reads."""

    features: torch.Tensor  # [B, T, F] the target's features per position
    token_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] draft index of the target's greedy token after each position; -100: none
    soft_ids: torch.Tensor  # [B, T, K] draft indices of the target's top tokens there (0 where soft_probs is 0)
    soft_probs: torch.Tensor  # [B, T, K] their probabilities, renormalised over those in the draft vocabulary

    @classmethod
    def of(cls, conversations: list[Conversation], to_draft: torch.Tensor) -> Batch:
        width = max(len(c.token_ids) for c in conversations)
        size, k = len(conversations), SOFT_TOP_K
        features = torch.zeros(size, width, conversations[0].features.shape[-1])
        token_ids = torch.zeros(size, width, dtype=torch.long)
        labels = torch.full((size, width), -100, dtype=torch.long)
        soft_ids, soft_probs = torch.zeros(size, width, k, dtype=torch.long), torch.zeros(size, width, k)
        for row, c in enumerate(conversations):
            n, first = len(c.token_ids), c.prompt_len - 1  # only the answer is learnt: from the prompt's last position on
            features[row, :n], token_ids[row, :n] = c.features.float(), c.token_ids
            labels[row, first:n] = to_draft[c.next_ids[first:n]]
            if c.top_ids is not None:
                ids = to_draft[c.top_ids[first:n].long()]  # -100: not in the draft vocabulary
                probs = c.top_logprobs[first:n].float().exp() * (ids >= 0)
                soft_ids[row, first:n] = ids.clamp(min=0)
                soft_probs[row, first:n] = probs / probs.sum(-1, keepdim=True).clamp(min=1e-9)
        return cls(features, token_ids, labels, soft_ids, soft_probs)

    def to(self, device: str) -> Batch:
        return Batch(*(t.to(device) for t in (self.features, self.token_ids, self.labels, self.soft_ids,
                                              self.soft_probs)))

    def shifted(self, shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The labels for step shift + 1 from each position: those `shift` positions on."""
        def pad(t: torch.Tensor, value) -> torch.Tensor:
            return torch.cat([t[:, shift:], t.new_full((t.shape[0], shift, *t.shape[2:]), value)], 1)
        return pad(self.labels, -100), pad(self.soft_ids, 0), pad(self.soft_probs, 0.0)


def unrolled(head: DraftHead, batch: Batch, depth: int, teacher: bool = True) -> list[torch.Tensor]:
    """The head over whole conversations, then `depth - 1` more steps from
    every position on its own outputs, as it drafts (EAGLE-3's training-time
    test). Step 1 at entry a is the ordinary entry (features of a - 1,
    token a); step i >= 2 from a sits at position a + i - 1, reads the
    previous step's output and token a + i - 1 (the text's, or with
    teacher=False the previous step's guess), and attends to the entries up
    to a and to its own earlier steps from a. Step i's labels are
    batch.shifted(i - 1).
    -> per step, what head.logits() reads [B, T, H]."""
    c = head.config
    size, width = batch.token_ids.shape
    positions = torch.arange(width, device=batch.token_ids.device)
    previous = torch.cat([torch.zeros_like(batch.features[:, :1]), batch.features[:, :-1]], 1)
    x = head.inputs(head.fused(previous), batch.token_ids)
    q, k, v = head.qkv(x, positions)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, normed = head.finish(x, attn)
    steps = [normed]
    group = c.num_heads // c.num_kv_heads
    base_k, base_v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, heads, T, d]
    causal = torch.ones(width, width, dtype=torch.bool, device=positions.device).tril()
    own_k, own_v = [], []
    for i in range(2, depth + 1):
        shift = i - 1
        if teacher:
            tokens = F.pad(batch.token_ids[:, shift:], (0, shift))
        else:
            tokens = head.draft_vocab[head.logits(steps[-1]).argmax(-1)]
        x = head.inputs(out, tokens)
        q, k, v = head.qkv(x, positions + shift)
        own_k.append(k.repeat_interleave(group, 1))
        own_v.append(v.repeat_interleave(group, 1))
        scale = c.head_dim ** -0.5
        scores = (q @ base_k.transpose(-1, -2)) * scale  # [B, heads, T, T]
        scores = scores.masked_fill(~causal, float("-inf"))
        diagonal = torch.stack([(q * key).sum(-1) * scale for key in own_k], -1)  # [B, heads, T, i - 1]
        weights = torch.softmax(torch.cat([scores, diagonal], -1), -1)
        attn = weights[..., :width] @ base_v + sum(weights[..., width + m:width + m + 1] * value
                                                   for m, value in enumerate(own_v))
        out, normed = head.finish(x, attn)
        steps.append(normed)
    return steps


def unrolled_loss(head: DraftHead, batch: Batch, depth: int, soft_weight: float) -> torch.Tensor:
    """Per labelled position of every step: (1 - soft_weight) x the
    cross-entropy of the target's greedy token + soft_weight x that of its
    top tokens, weighted by the target's probabilities (what the target
    thinks besides its argmax). Logits only where there are labels."""
    total, count = 0.0, 0
    for shift, normed in enumerate(unrolled(head, batch, depth)):
        labels, soft_ids, soft_probs = batch.shifted(shift)
        where = labels != -100
        logprobs = torch.log_softmax(head.logits(normed[where]), -1)  # [labelled, draft vocab]
        hard = -logprobs.gather(-1, labels[where, None])[:, 0]
        soft = -(logprobs.gather(-1, soft_ids[where]) * soft_probs[where]).sum(-1)
        total = total + ((1 - soft_weight) * hard + soft_weight * soft).sum()
        count += int(where.sum())
    return total / max(1, count)


@torch.inference_mode()
def acceptance_by_depth(head: DraftHead, conversations: list[Conversation], to_draft: torch.Tensor, depth: int,
                        device: str = "cpu") -> tuple[list[float], float]:
    """Greedy drafting from every answer position of held-out conversations,
    each step on the head's own guess. -> ([share of positions whose first d
    guesses are all the target's tokens, for d = 1..depth] (the mean
    accepted length from any position is 1 + their sum), and the mean
    accepted length where sync mode's loop drafts: from the first answer
    position, then from the position after each verification's last token;
    those follow a wrong guess more often, and are harder)."""
    hits, starts, loop_tokens, loop_steps = torch.zeros(depth), 0, 0, 0
    for first in range(0, len(conversations), 8):
        group = conversations[first:first + 8]
        batch = Batch.of(group, to_draft).to(device)
        alive = batch.labels != -100
        starts += int(alive.sum())
        accepted = torch.zeros_like(batch.labels)  # guesses accepted drafting from each position
        for shift, normed in enumerate(unrolled(head, batch, depth, teacher=False)):
            labels = batch.shifted(shift)[0]
            alive &= head.draft_vocab[head.logits(normed).argmax(-1)] == head.draft_vocab[labels.clamp(min=0)]
            alive &= labels != -100
            hits[shift] += alive.sum().cpu()
            accepted += alive
        for row, c in enumerate(group):  # from the first answer token (the prompt's own run gave it)
            tokens, steps = sync_loop(accepted[row].tolist(), c.prompt_len, len(c.token_ids))
            loop_tokens, loop_steps = loop_tokens + tokens, loop_steps + steps
    return (hits / max(1, starts)).tolist(), loop_tokens / max(1, loop_steps)


def sync_loop(accepted: list[int], start: int, end: int) -> tuple[int, int]:
    """Sync mode's loop over one text: drafting from `start`, each
    verification yields the guesses accepted from there (accepted[p]) and
    then the target's own token, and the next drafts from after it, until
    `end`. -> (tokens, verifications)."""
    position, tokens, steps = start, 0, 0
    while position < end:
        gained = accepted[position] + 1
        position, tokens, steps = position + gained, tokens + gained, steps + 1
    return tokens, steps


def train(config: TrainConfig, show_progress: bool = True) -> dict:
    """Everything of one train-draft run; resumes from the output directory's
    data and checkpoint. -> a summary (also in history.json)."""
    config.check()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(config.model, show_progress)
    torch.manual_seed(config.seed)
    shape = HeadConfig.for_target(model_dir, ())
    # Fine-tuning (--init) keeps the head's draft vocabulary, which its weights index.
    start = checked_head_dir(parse_draft(config.init).path, model_dir) if config.init else None
    start_config = read_head_config(start) if start is not None else None
    if start_config is not None and start_config.feature_layers != shape.feature_layers:
        raise ValueError(f"--init {config.init} reads layers {start_config.feature_layers}; "
                         f"train-draft records {shape.feature_layers}")
    started = time.monotonic()
    conversations = generate_data(config, model_dir, shape.feature_layers, show_progress, out / DATA_DIR)
    held = set(held_out(config.num_prompts, config.target_prompts))
    train_set = [c for i, c in enumerate(conversations) if i not in held]
    held_set = [c for i, c in enumerate(conversations) if i in held]
    head_config = start_config or HeadConfig(**{**asdict(shape), "draft_vocab": draft_vocabulary(
        train_set, config.draft_vocab, shape.vocab_size)})
    head = DraftHead(head_config, target_embedding(model_dir).float())
    if start is not None:
        head.load_state_dict(load_file(str(start / WEIGHTS_FILE)), strict=True)
    head = head.to(config.device)
    to_draft = torch.full((shape.vocab_size,), -100, dtype=torch.long)
    to_draft[torch.tensor(head_config.draft_vocab)] = torch.arange(len(head_config.draft_vocab))
    positions = [sum(len(c.token_ids) - c.prompt_len + 1 for c in part) for part in (train_set, held_set)]
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=0.0)
    history = {"loss": [], "eval": [], "positions": positions[0]}
    step = 0
    checkpoint = out / CHECKPOINT_FILE
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != _train_key(config):
            raise ValueError(f"{checkpoint} belongs to a run with other settings; use a new --out or delete it")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        log.info("resuming from step %d", step)
    rng = random.Random(config.seed + step)
    bar = tqdm(total=config.steps, initial=step, desc="training the head", unit="step", disable=not show_progress)
    head.train()
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr(config, step)
        batch = Batch.of(rng.sample(train_set, min(config.batch, len(train_set))), to_draft).to(config.device)
        loss = unrolled_loss(head, batch, config.depth, config.soft_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        step += 1
        history["loss"].append([step, round(loss.item(), 4)])
        bar.update()
        bar.set_postfix(loss=f"{history['loss'][-1][1]:.3f}")
        if step % config.eval_every == 0 or step == config.steps:
            head.eval()
            accepted, in_loop = acceptance_by_depth(head, held_set, to_draft, config.depth, config.device)
            history["eval"].append([step, [round(a, 4) for a in accepted], round(in_loop, 4)])
            head.train()
            torch.save({"config": _train_key(config), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "history": history}, checkpoint)
            head.save(out)
            plot_history(history, out / PLOT_FILE)
    bar.close()
    head.eval()
    _, acceptance, in_loop = history["eval"][-1]
    summary = {
        "steps": step, "train_positions": positions[0], "held_out_positions": positions[1],
        "acceptance_by_depth": acceptance, "mean_accepted_len": round(1 + sum(acceptance), 3),
        "sync_loop_accepted_len": in_loop,
        "head_params": head.num_shipped_params(), "head_macs_per_token": head.macs_per_token(),
        "seconds_this_run": round(time.monotonic() - started, 1), "files": [DATA_DIR, CHECKPOINT_FILE,
                                                                           "head.json", "head.safetensors", PLOT_FILE],
    }
    history["summary"] = summary
    (out / HISTORY_FILE).write_text(json.dumps(history) + "\n")
    return summary


def _lr(config: TrainConfig, step: int) -> float:
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))


def _data_key(config: TrainConfig) -> dict:
    return {k: str(v) for k, v in asdict(config).items()
            if k in ("model", "max_new_tokens", "sampled_share", "gen_batch", "seed")}


def _check_data_key(path: Path, saved: dict, key: dict) -> None:
    """Data in `path` was generated under `saved`; it is read only for the same settings."""
    if saved != key:
        raise ValueError(f"{path} was generated with other settings ({saved}); use a new --out or delete its data")


def _fingerprint(prompts: list[list[dict[str, str]]]) -> str:
    """Of a part's prompts: a part generated from other prompts is not read as this one."""
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def _train_key(config: TrainConfig) -> dict:
    """What a checkpoint must agree on to be resumed (--steps may grow: the schedule follows it)."""
    return {k: str(v) for k, v in asdict(config).items() if k not in ("out_dir", "eval_every", "device", "steps")}


def plot_history(history: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = zip(*history["loss"]) if history["loss"] else ((), ())
    left.plot(steps, losses, lw=0.6, alpha=0.5, label="per step")
    window = 50
    if len(losses) >= window:
        smooth = [sum(losses[i - window:i]) / window for i in range(window, len(losses) + 1)]
        left.plot(steps[window - 1:], smooth, lw=1.5, label=f"mean of {window}")
    left.set(xlabel="step", ylabel="unrolled cross-entropy", title="training loss")
    left.legend()
    if history["eval"]:
        eval_steps = [s for s, *_ in history["eval"]]
        for d in range(len(history["eval"][0][1])):
            right.plot(eval_steps, [acc[d] for _, acc, _ in history["eval"]], marker="o", label=f"depth {d + 1}")
        _, last, in_loop = history["eval"][-1]
        right.set_title(f"held-out acceptance\nmean accepted length {1 + sum(last):.2f} from any position, "
                        f"{in_loop:.2f} in sync's loop", fontsize=9)
    right.set(xlabel="step", ylabel="first d guesses all accepted", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
