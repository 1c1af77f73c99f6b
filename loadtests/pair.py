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

import argparse
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
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

REPORT_NAME = "pair.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Token ids the config names when no tokenizer is given (as the tests' tiny models).
BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1
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
class PairShape:
    """The target's shape: a Llama decoder (head_dim = hidden_size // num_heads).

    initializer_range is large on purpose: random weights of the usual 0.02
    give near-uniform logits, whose argmax flips with tiny perturbations; a
    large one makes them peaked, so agreement moves smoothly with eps.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float = 0.3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_layer_params(self) -> int:
        """One decoder layer: q, k, v, o, the gated MLP and its two norms."""
        h, q_dim, kv_dim = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * h * q_dim + 2 * h * kv_dim + 3 * h * self.intermediate_size + 2 * h

    @property
    def num_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Stored parameters: the embedding, the layers, the final norm and an untied head."""
        head = 0 if self.tie_word_embeddings else self.num_head_params
        return self.num_head_params + self.num_layers * self.num_layer_params + self.hidden_size + head

    def num_draft_params(self, draft_layers: int) -> int:
        """Parameters the N-layer self-draft touches per token: its layers,
        the final norm and the head (the embedding lookup reads one row)."""
        return draft_layers * self.num_layer_params + self.hidden_size + self.num_head_params

    def draft_cost(self, draft_layers: int, num_stages: int) -> float:
        """The draft's parameters touched per token over those of one stage
        when the target's layers are split evenly over num_stages: an average
        non-last stage, layers only (the last one also holds the head)."""
        return self.num_draft_params(draft_layers) / (self.num_layers / num_stages * self.num_layer_params)

    def config(self, bos_token_id: int = BOS_TOKEN_ID, eos_token_id: int = EOS_TOKEN_ID,
               pad_token_id: int | None = EOS_TOKEN_ID) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, dtype="float32",
        )


SHAPES: dict[str, PairShape] = {
    # For tests: builds and bisects in about a second.
    "tiny": PairShape(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                      vocab_size=96, max_position_embeddings=512),
    # ~0.75B parameters with the default tokenizer's vocabulary. The head
    # (vocab x hidden) is what makes a self-draft dear, so the hidden size is
    # small and the MLP wide: a 1-layer draft is ~0.24 of a 10-layer stage.
    "0.7b": PairShape(num_layers=40, hidden_size=512, intermediate_size=11264, num_heads=8, num_kv_heads=4,
                      vocab_size=49152),
    # Llama-3-8B's decoder (32 layers of 4096, MLP 14336, 32 heads, 8 for keys
    # and values) with the default tokenizer's vocabulary: 7.4B parameters.
    # For speed figures (pipeinfer make-model): too large to bisect a damping.
    "8b": PairShape(num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
                    vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=False,
                    initializer_range=0.02),
}


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pipeinfer make-pair` (and of this module run as a script)."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.7b",
                        help="the target's shape: 0.7b (40 layers, ~0.75B parameters) or tiny (for tests)")
    parser.add_argument("--draft-layers", type=int, default=1, help="the self-draft's layers (--draft layers:N)")
    parser.add_argument("--agreement", type=float, required=True,
                        help="the rate at which the draft's argmax equals the target's greedy token")
    parser.add_argument("--tolerance", type=float, default=0.03, help="how close the measured agreement must be")
    parser.add_argument("--stages", type=int, default=4, help="stages the draft's relative cost is given for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", help="copy this model's tokenizer ('default' or a directory); "
                                                 "its vocabulary must be the shape's")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write the target to")


def run(args: argparse.Namespace) -> int:
    tokenizer_from = None
    if args.tokenizer_from:
        from compute.model_source import resolve_model

        tokenizer_from = resolve_model(args.tokenizer_from)
    report = make_pair(args.out, SHAPES[args.shape], args.draft_layers, args.agreement, seed=args.seed,
                       tokenizer_from=tokenizer_from, tolerance=args.tolerance, num_stages=args.stages)
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
