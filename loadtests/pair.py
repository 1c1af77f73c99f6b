"""A benchmark pair of known quality and known cost: a random Llama target
whose first-N-layer self-draft (`--draft layers:N`: the target's first N
decoder layers, then its own final norm and LM head) agrees with the target's
greedy next token at a chosen rate.

The quality is set by damping: the output projections (self_attn.o_proj and
mlp.down_proj) of every layer from N on are multiplied by eps >= 0. With
eps = 0 those layers add nothing to the residual stream, so the target is its
N-layer prefix plus norm and head (agreement 1.0); as eps grows the agreement
falls. eps is found by bisection on a log scale, measuring agreement exactly
as the draft is used: the full model decodes greedily from fixed random
prompts and, at every position, the prefix's argmax is compared with the
token the full model chose. The cost follows from the shape alone (draft_cost).

With the same pair, a setting can be benchmarked for real (`--draft layers:N`)
and simulated (`--draft synthetic:AGREEMENT`, or a cost model fed draft_cost).

    pipeinfer make-pair --shape 0.7b --draft-layers 1 --agreement 0.7 \\
        --tokenizer-from default --out /tmp/pair-0.7b-a0.7
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from loadtests.shapes import BOS_TOKEN_ID, EOS_TOKEN_ID, PairShape

REPORT_NAME = "pair.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DAMPED_PROJECTIONS = ("self_attn.o_proj", "mlp.down_proj")  # each layer's writes to the residual stream
NUM_PROMPTS = 8
PROMPT_LEN = 16
NUM_NEW_TOKENS = 64  # per prompt: 512 judged positions, so one flipped position moves agreement by 0.002
MAX_EVALUATIONS = 48
EPS_RANGE = (1e-6, 1e6)  # past these the agreement no longer moves: the target cannot be reached
BRACKET_STEP = 4.0  # eps grows or shrinks by this until the target is bracketed


class PairError(ValueError):
    """The pair cannot be made as asked."""


@dataclass(frozen=True, slots=True)
class PairReport:
    """What make_pair built. draft_cost: see PairShape.draft_cost."""

    path: Path
    draft_layers: int
    eps: float  # the damping of the output projections of layers draft_layers..num_layers-1
    agreement: float  # measured: the draft's argmax equals the target's greedy token
    target_agreement: float
    tolerance: float
    draft_cost: float
    num_stages: int
    num_params: int
    num_positions: int  # positions the agreement was measured on
    num_evaluations: int  # of the bisection
    seed: int
    shape: PairShape
    elapsed_s: float

    def as_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


def make_pair(out_dir: Path, shape: PairShape, draft_layers: int, agreement: float, *, seed: int = 0,
              tokenizer_from: Path | None = None, tolerance: float = 0.03, num_stages: int = 4,
              show_progress: bool = True) -> PairReport:
    """Build the target, damp it until its draft_layers-layer self-draft
    agrees at `agreement` (within tolerance), save it to out_dir (float32
    safetensors, the tokenizer of tokenizer_from if given) with pair.json.

    Raises PairError for an impossible request or when no eps gets within tolerance.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    if not 1 <= draft_layers < shape.num_layers:
        raise PairError(f"draft_layers must be in 1..{shape.num_layers - 1} (a prefix of the target's "
                        f"{shape.num_layers} layers), got {draft_layers}")
    if num_stages < 1:
        raise PairError(f"num_stages must be >= 1, got {num_stages}")
    if not 0.0 <= agreement <= 1.0 or tolerance <= 0:
        raise PairError(f"agreement must be in [0, 1] and tolerance > 0, got {agreement} and {tolerance}")
    special_ids = _tokenizer_special_ids(Path(tokenizer_from), shape) if tokenizer_from is not None else {}
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(shape.config(**special_ids)).eval()
    prompts = random_prompts(shape.vocab_size, seed)
    undamped = {name: p.detach().clone() for name, p in damped_parameters(model, draft_layers)}

    def evaluate(eps: float) -> float:
        damp(model, draft_layers, eps, undamped)
        return measure_agreement(model, draft_layers, prompts, show_progress=show_progress)

    eps, measured, num_evaluations = find_eps(evaluate, agreement, tolerance, show_progress)
    damp(model, draft_layers, eps, undamped)
    undamped.clear()  # the reference copies: free before saving
    out_dir.mkdir(parents=True, exist_ok=True)
    with _transformers_progress(show_progress):
        model.save_pretrained(out_dir)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy(Path(tokenizer_from) / name, out_dir / name)
    report = PairReport(out_dir, draft_layers, eps, measured, agreement, tolerance,
                        shape.draft_cost(draft_layers, num_stages), num_stages, shape.num_params,
                        prompts.shape[0] * NUM_NEW_TOKENS, num_evaluations, seed, shape,
                        round(time.monotonic() - started, 3))
    (out_dir / REPORT_NAME).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report


def damped_parameters(model: LlamaForCausalLM, draft_layers: int) -> list[tuple[str, torch.nn.Parameter]]:
    """The output projections' weights of the layers past the draft's."""
    return [(f"model.layers.{i}.{projection}.weight", model.get_submodule(f"model.layers.{i}.{projection}").weight)
            for i in range(draft_layers, len(model.model.layers)) for projection in DAMPED_PROJECTIONS]


@torch.no_grad()
def damp(model: LlamaForCausalLM, draft_layers: int, eps: float, undamped: dict[str, torch.Tensor]) -> None:
    """Set the damped weights to eps times their undamped values (which stay
    the reference, so repeated trials never compound)."""
    for name, weight in damped_parameters(model, draft_layers):
        torch.mul(undamped[name], eps, out=weight)


def random_prompts(vocab_size: int, seed: int, num_prompts: int = NUM_PROMPTS, prompt_len: int = PROMPT_LEN
                   ) -> torch.Tensor:
    """Fixed prompts of random token ids, all one length (a batch without padding)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_prompts, prompt_len), generator=generator)


def draft_logits(model: LlamaForCausalLM, hidden_state: torch.Tensor) -> torch.Tensor:
    """The self-draft's logits from the residual stream after its N layers:
    the target's own final norm and head, as --draft layers:N runs them."""
    return model.lm_head(model.model.norm(hidden_state))


@torch.no_grad()
def greedy_with_draft(model: LlamaForCausalLM, draft_layers: int, prompts: torch.Tensor,
                      num_new_tokens: int = NUM_NEW_TOKENS, show_progress: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The full model's greedy tokens and, at each of them, the N-layer
    self-draft's argmax given the same prefix -> two [batch, num_new_tokens].

    No second pass is needed: layer i sees only layers before it, so the
    residual stream after N layers (hidden_states[N], before the final norm)
    and the first N layers' KV cache are exactly the prefix model's.
    """
    tokens, guesses = [], []
    cache, step_ids = DynamicCache(config=model.config), prompts
    for _ in tqdm(range(num_new_tokens), desc="agreement", unit="token", leave=False, disable=not show_progress):
        out = model(step_ids, past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(step_ids)
        guesses.append(draft_logits(model, out.hidden_states[draft_layers][:, -1]).argmax(-1, keepdim=True))
    return torch.cat(tokens, 1), torch.cat(guesses, 1)


def measure_agreement(model: LlamaForCausalLM, draft_layers: int, prompts: torch.Tensor,
                      num_new_tokens: int = NUM_NEW_TOKENS, show_progress: bool = False) -> float:
    """The fraction of the full model's greedy tokens the self-draft guesses."""
    tokens, guesses = greedy_with_draft(model, draft_layers, prompts, num_new_tokens, show_progress)
    return (tokens == guesses).float().mean().item()


def find_eps(evaluate: Callable[[float], float], target: float, tolerance: float, show_progress: bool = False
             ) -> tuple[float, float, int]:
    """eps whose agreement is within tolerance of target -> (eps, agreement,
    evaluations). Agreement falls as eps grows (1.0 at eps = 0): step eps by
    BRACKET_STEP until the target is bracketed, then bisect geometrically."""
    tried: list[tuple[float, float]] = []
    low = high = None  # the largest eps known to agree too much, the smallest known to agree too little
    eps = 0.0 if target >= 1.0 - tolerance else 1.0  # eps = 0: agreement exactly 1.0
    with tqdm(total=MAX_EVALUATIONS, desc="damping", unit="eval", disable=not show_progress) as bar:
        while len(tried) < MAX_EVALUATIONS:
            measured = evaluate(eps)
            tried.append((eps, measured))
            bar.update()
            bar.set_postfix(eps=f"{eps:.3g}", agreement=f"{measured:.3f}")
            if abs(measured - target) <= tolerance:
                return eps, measured, len(tried)
            if measured > target:
                low = eps
            else:
                high = eps
            if low is not None and high is not None:
                if high / max(low, 1e-300) < 1.0 + 1e-6:
                    break  # agreement jumps across the target here: no eps in between
                eps = math.sqrt(low * high) if low > 0 else high / BRACKET_STEP
            else:
                eps = eps * BRACKET_STEP if high is None else eps / BRACKET_STEP
                if not EPS_RANGE[0] <= eps <= EPS_RANGE[1]:
                    break
    closest = min(tried, key=lambda t: abs(t[1] - target))
    raise PairError(f"no damping gets agreement within {tolerance} of {target} after {len(tried)} evaluations "
                    f"(closest: eps {closest[0]:.4g} gives {closest[1]:.4f}); try another seed or a larger tolerance")


@contextmanager
def _transformers_progress(show: bool) -> Iterator[None]:
    """transformers' own bars (writing shards) on or off, as ours are."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _tokenizer_special_ids(tokenizer_from: Path, shape: PairShape) -> dict[str, int | None]:
    """Check the tokenizer fits the shape -> the special token ids its model's config names."""
    if not (tokenizer_from / "tokenizer.json").exists():
        raise PairError(f"{tokenizer_from} has no tokenizer.json")
    config_path = tokenizer_from / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if "vocab_size" in config:
        vocab_size = config["vocab_size"]
    else:
        from tokenizers import Tokenizer

        vocab_size = Tokenizer.from_file(str(tokenizer_from / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if vocab_size != shape.vocab_size:
        raise PairError(f"the tokenizer of {tokenizer_from} has a vocabulary of {vocab_size} tokens but the "
                        f"shape's vocab_size is {shape.vocab_size}: they must match")
    ids = {"bos_token_id": config.get("bos_token_id", BOS_TOKEN_ID),
           "eos_token_id": config.get("eos_token_id", EOS_TOKEN_ID)}
    return {**ids, "pad_token_id": config.get("pad_token_id", ids["eos_token_id"])}
