"""`pipeinfer train-draft`: a draft head trained by self-distillation.

1. The target writes: its greedy (and some sampled) continuations of a
   prompt set, in batches (Hugging Face generate on the same weights), each
   max_new_tokens long, past end-of-text too.
2. One teacher-forced pass over each conversation records the target's
   hidden states at the head's feature layers, at every position.
3. The head learns to predict the target's next-next token from (the
   features, the next token), unrolled `depth` steps on its own outputs as
   it drafts (EAGLE-3's training-time test), over the reduced vocabulary.

Everything lands in the output directory: data.pt (the generated data,
reused on a rerun), checkpoint.pt (resumed from), head.json +
head.safetensors (the head), training.png (loss, and acceptance at each
draft depth on held-out conversations) and history.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from compute.model_source import resolve_model
from draft_models.head import DraftHead, HeadConfig, target_embedding

log = logging.getLogger(__name__)

DATA_FILE = "data.pt"
CHECKPOINT_FILE = "checkpoint.pt"
PLOT_FILE = "training.png"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class TrainConfig:
    model: str = "default"
    out_dir: Path = Path("head")
    num_prompts: int = 2496  # the project's prompt set (training_prompts), all of it; a tenth held out
    max_new_tokens: int = 128
    sampled_share: float = 0.25  # continuations sampled at temperature 0.7 instead of greedy
    gen_batch: int = 16
    steps: int = 1200
    batch: int = 8  # conversations per step (every position of each)
    depth: int = 4  # draft steps unrolled in training (and measured)
    draft_vocab: int = 8192
    lr: float = 1e-3
    eval_every: int = 100
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        if self.num_prompts < 2 or self.max_new_tokens < 4 or self.steps < 1 or self.batch < 1:
            raise ValueError("--num-prompts >= 2, --max-new-tokens >= 4, --steps >= 1 and --batch >= 1")
        if not 1 <= self.depth <= 16 or self.draft_vocab < 2 or not 0 <= self.sampled_share <= 1:
            raise ValueError("--depth in 1..16, --draft-vocab >= 2, sampled share in [0, 1]")


# ---- prompts -------------------------------------------------------------

_TOPICS = (
    "photosynthesis", "the water cycle", "volcanoes", "the French Revolution", "compound interest", "vaccines",
    "machine learning", "the stock market", "climate change", "the human heart", "electric cars", "gravity",
    "the Roman Empire", "coffee", "sleep", "meditation", "solar panels", "the internet", "bees", "recycling",
    "chess", "the moon landing", "earthquakes", "democracy", "inflation", "rainbows", "DNA", "the immune system",
    "tides", "the printing press", "dinosaurs", "jazz music", "the Great Wall of China", "antibiotics",
    "cloud computing", "public speaking", "time management", "baking bread", "learning a language", "budgeting",
    "running a marathon", "houseplants", "the Pythagorean theorem", "prime numbers", "the solar system",
    "penguins", "the Olympic Games", "vitamins", "renewable energy", "social media", "the Renaissance",
    "electricity", "magnets", "the ocean", "deserts", "friendship", "job interviews", "writing a resume",
    "camping", "photography", "the violin", "origami", "sushi", "tea ceremonies", "the Amazon rainforest",
    "glaciers", "hurricanes", "black holes", "batteries", "3D printing", "password security", "spreadsheets",
    "the Python programming language", "sorting algorithms", "recursion", "databases", "version control",
    "the Eiffel Tower", "volunteering", "the piano", "ancient Egypt", "the metric system", "lighthouses",
    "coral reefs", "bicycles", "the Industrial Revolution", "fermentation", "wind turbines", "owls",
    "the Silk Road", "mushrooms", "traffic lights", "the human brain", "airplanes", "composting", "knitting",
    "the Moon", "opera", "vaccination schedules", "cryptography", "the periodic table", "rivers", "whales",
    "board games", "the Cold War", "nutrition labels", "yoga", "submarines", "the Nile", "honey",
    "probability", "skyscrapers", "the Mona Lisa", "first aid", "elephants", "trains", "the Arctic",
    "credit scores", "podcasts", "libraries", "quantum computing", "the human skeleton", "pizza",
    "the Declaration of Independence", "rock climbing", "tornadoes", "video games", "the Sahara",
    "algebra", "smartphones", "minimalism", "castles", "octopuses", "the microscope", "pottery",
    "mountains", "email etiquette", "cheese", "satellites", "the Vikings", "gardening", "rain",
    "negotiation", "carbon dating", "hot air balloons", "linked lists", "unit testing", "spices",
    "weather forecasting", "the Aztecs", "kindness", "solar eclipses", "rubber", "the Great Barrier Reef",
    "the Panama Canal", "jellyfish",
)
_TEMPLATES = (
    "What is {t}?", "Explain {t} to a ten-year-old.", "Give me three facts about {t}.",
    "Why does {t} matter?", "Write a short paragraph about {t}.", "What are the pros and cons of {t}?",
    "Summarize the history of {t} in a few sentences.", "How would you teach {t} to a beginner?",
    "List five questions a student might ask about {t}.", "Write a short poem about {t}.",
    "What is a common misconception about {t}?", "Describe {t} in one sentence, then in detail.",
    "What should everyone know about {t}?", "Compare {t} with something from everyday life.",
    "Tell me a fun story that involves {t}.", "What are the main ideas behind {t}?",
)


def training_prompts() -> list[list[dict[str, str]]]:
    """The project's own prompt set: chat turns from topic x question
    templates, in a fixed shuffled order (none is a benchmark prompt)."""
    prompts = [[{"role": "user", "content": template.format(t=topic)}] for topic in _TOPICS for template in _TEMPLATES]
    random.Random(1234).shuffle(prompts)
    return prompts


# ---- data ----------------------------------------------------------------

@dataclass
class Conversation:
    token_ids: torch.Tensor  # [T] prompt + continuation
    prompt_len: int
    features: torch.Tensor | None  # [T, len(feature_layers) * hidden], float16
    next_ids: torch.Tensor | None  # [T] the target's greedy token after each position (the labels)


def generate_data(config: TrainConfig, model_dir: Path, feature_layers: tuple[int, ...],
                  show_progress: bool = True) -> list[Conversation]:
    """The target's continuations of the prompts, with its hidden states at the feature layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(config.device).eval()
    prompts = training_prompts()
    prompts = [prompts[i % len(prompts)] for i in range(config.num_prompts)]
    rng = torch.Generator().manual_seed(config.seed)
    conversations: list[Conversation] = []
    bar = tqdm(total=len(prompts), desc="target writes", unit="prompt", disable=not show_progress)
    with torch.inference_mode():
        for first in range(0, len(prompts), config.gen_batch):
            batch = prompts[first:first + config.gen_batch]
            texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(config.device)
            sampled = bool(torch.rand(1, generator=rng) < config.sampled_share)
            torch.manual_seed(config.seed + first)
            # Past end-of-text too (eos_token_id=None: nothing stops a row, nothing is masked):
            # the bench and Locust send ignore_eos, and what the target writes there is its own.
            out = model.generate(**encoded, max_new_tokens=config.max_new_tokens, do_sample=sampled,
                                 temperature=0.7 if sampled else None, top_p=None, top_k=None,
                                 eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
            width = encoded["input_ids"].shape[1]
            for row in range(len(batch)):
                prompt = encoded["input_ids"][row][encoded["attention_mask"][row].bool()]
                conversations.append(Conversation(torch.cat([prompt, out[row, width:]]).cpu(), len(prompt), None, None))
            _record_features(model, conversations[-len(batch):], feature_layers, config.device)
            bar.update(len(batch))
    bar.close()
    return conversations


def _record_features(model, conversations: list[Conversation], feature_layers, device: str) -> None:
    """One teacher-forced pass, right-padded (pads come after every real token,
    which the causal mask keeps out), over the batch's conversations."""
    width = max(len(c.token_ids) for c in conversations)
    ids = torch.zeros(len(conversations), width, dtype=torch.long)
    for row, c in enumerate(conversations):
        ids[row, :len(c.token_ids)] = c.token_ids
    out = model(ids.to(device), output_hidden_states=True)
    hidden = out.hidden_states  # [0]: the embeddings; [l + 1]: layer l's output
    stacked = torch.cat([hidden[layer + 1] for layer in feature_layers], dim=-1).to("cpu", torch.float16)
    greedy = out.logits.argmax(-1).cpu()
    for row, c in enumerate(conversations):
        c.features = stacked[row, :len(c.token_ids)].clone()
        c.next_ids = greedy[row, :len(c.token_ids)].clone()


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

    @classmethod
    def of(cls, conversations: list[Conversation], to_draft: torch.Tensor) -> Batch:
        width = max(len(c.token_ids) for c in conversations)
        features = torch.zeros(len(conversations), width, conversations[0].features.shape[-1])
        token_ids = torch.zeros(len(conversations), width, dtype=torch.long)
        labels = torch.full((len(conversations), width), -100, dtype=torch.long)
        for row, c in enumerate(conversations):
            n = len(c.token_ids)
            features[row, :n], token_ids[row, :n] = c.features.float(), c.token_ids
            # Only the answer is learnt: from the prompt's last position on.
            labels[row, c.prompt_len - 1:n] = to_draft[c.next_ids[c.prompt_len - 1:n]]
        return cls(features, token_ids, labels)

    def to(self, device: str) -> Batch:
        return Batch(self.features.to(device), self.token_ids.to(device), self.labels.to(device))


def unrolled(head: DraftHead, batch: Batch, depth: int, teacher: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The head over whole conversations, then `depth - 1` more steps from
    every position on its own outputs, as it drafts (EAGLE-3's training-time
    test). Step 1 at entry a is the ordinary entry (features of a - 1,
    token a); step i >= 2 from a sits at position a + i - 1, reads the
    previous step's output and token a + i - 1 (the text's, or with
    teacher=False the previous step's guess), and attends to the entries up
    to a and to its own earlier steps from a.
    -> per step, (draft-vocabulary logits [B, T, V], labels [B, T])."""
    c = head.config
    size, width = batch.token_ids.shape
    positions = torch.arange(width, device=batch.token_ids.device)
    previous = torch.cat([torch.zeros_like(batch.features[:, :1]), batch.features[:, :-1]], 1)
    x = head.inputs(head.fused(previous), batch.token_ids)
    q, k, v = head.qkv(x, positions)
    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, logits = head.finish(x, attn)
    steps = [(logits, batch.labels)]
    group = c.num_heads // c.num_kv_heads
    base_k, base_v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, heads, T, d]
    causal = torch.ones(width, width, dtype=torch.bool, device=positions.device).tril()
    own_k, own_v = [], []
    for i in range(2, depth + 1):
        shift = i - 1
        if teacher:
            tokens = F.pad(batch.token_ids[:, shift:], (0, shift))
        else:
            tokens = head.draft_vocab[steps[-1][0].argmax(-1)]
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
        out, logits = head.finish(x, attn)
        steps.append((logits, F.pad(batch.labels[:, shift:], (0, shift), value=-100)))
    return steps


def unrolled_loss(head: DraftHead, batch: Batch, depth: int) -> torch.Tensor:
    """Cross-entropy of every step at every position, over the labelled ones."""
    steps = unrolled(head, batch, depth)
    total = sum(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
                for logits, labels in steps)
    return total / sum((labels != -100).sum() for _, labels in steps).clamp(min=1)


@torch.inference_mode()
def acceptance_by_depth(head: DraftHead, conversations: list[Conversation], to_draft: torch.Tensor, depth: int,
                        device: str = "cpu") -> list[float]:
    """Greedy drafting from every answer position of held-out conversations,
    each step on the head's own guess: [share of positions whose first d
    guesses are all the target's tokens, for d = 1..depth] (mean accepted
    length = 1 + their sum)."""
    hits, starts = torch.zeros(depth), 0
    for first in range(0, len(conversations), 8):
        batch = Batch.of(conversations[first:first + 8], to_draft).to(device)
        alive = batch.labels != -100
        starts += int(alive.sum())
        for d, (logits, labels) in enumerate(unrolled(head, batch, depth, teacher=False)):
            alive &= logits.argmax(-1) == labels
            hits[d] += alive.sum().cpu()
    return (hits / max(1, starts)).tolist()


def train(config: TrainConfig, show_progress: bool = True) -> dict:
    """Everything of one train-draft run; resumes from the output directory's
    data and checkpoint. -> a summary (also in history.json)."""
    config.check()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(config.model, show_progress)
    torch.manual_seed(config.seed)
    shape = HeadConfig.for_target(model_dir, ())
    started = time.monotonic()
    data_file = out / DATA_FILE
    if data_file.exists():
        saved = torch.load(data_file, weights_only=False)
        if saved["config"] != _data_key(config):
            raise ValueError(f"{data_file} was generated with other settings ({saved['config']}); "
                             "use a new --out or delete it")
        conversations = saved["conversations"]
        log.info("reusing the generated data in %s", data_file)
    else:
        conversations = generate_data(config, model_dir, shape.feature_layers, show_progress)
        torch.save({"config": _data_key(config), "conversations": conversations}, data_file)
    held = max(1, len(conversations) // 10)
    train_set, held_out = conversations[held:], conversations[:held]
    head_config = HeadConfig(**{**asdict(shape), "draft_vocab": draft_vocabulary(
        train_set, config.draft_vocab, shape.vocab_size)})
    head = DraftHead(head_config, target_embedding(model_dir).float()).to(config.device)
    to_draft = torch.full((shape.vocab_size,), -100, dtype=torch.long)
    to_draft[torch.tensor(head_config.draft_vocab)] = torch.arange(len(head_config.draft_vocab))
    positions = [sum(len(c.token_ids) - c.prompt_len + 1 for c in part) for part in (train_set, held_out)]
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
        loss = unrolled_loss(head, batch, config.depth)
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
            accepted = acceptance_by_depth(head, held_out, to_draft, config.depth, config.device)
            history["eval"].append([step, [round(a, 4) for a in accepted]])
            head.train()
            torch.save({"config": _train_key(config), "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "history": history}, checkpoint)
            head.save(out)
            plot_history(history, out / PLOT_FILE)
    bar.close()
    head.eval()
    acceptance = history["eval"][-1][1]
    summary = {
        "steps": step, "train_positions": positions[0], "held_out_positions": positions[1],
        "acceptance_by_depth": acceptance, "mean_accepted_len": round(1 + sum(acceptance), 3),
        "head_params": head.num_shipped_params(), "head_macs_per_token": head.macs_per_token(),
        "seconds_this_run": round(time.monotonic() - started, 1), "files": [DATA_FILE, CHECKPOINT_FILE,
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
            if k in ("model", "num_prompts", "max_new_tokens", "sampled_share", "gen_batch", "seed")}


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
        eval_steps = [s for s, _ in history["eval"]]
        for d in range(len(history["eval"][0][1])):
            right.plot(eval_steps, [acc[d] for _, acc in history["eval"]], marker="o", label=f"depth {d + 1}")
        last = history["eval"][-1][1]
        right.set_title(f"held-out acceptance (mean accepted length {1 + sum(last):.2f})")
    right.set(xlabel="step", ylabel="first d guesses all accepted", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
