"""A draft head that knows the target (EAGLE-3 style, arXiv 2503.01840).

The head reads the target's own hidden states at a low, a middle and a high
layer, fuses them into one feature, and runs one Llama-shaped decoder layer
whose entry at position j takes (the feature of position j - 1, token j) and
predicts token j + 1; its attention spans every earlier entry of the
sequence. To draft, its output feeds the next step in place of the target's
feature, k tokens in k small steps. The last pipeline stage keeps each
sequence's features and entries (HeadLine, written in place by position as
the KV is), runs the head right after the target's logits
(pipeline/stage.py), and the guesses ride back with the result.

It predicts over a reduced vocabulary (the tokens the target writes most,
`draft_vocab`, mapped to the target's ids); its input embedding and output
matrix are the target's own embedding rows, frozen and not shipped, so the
head file holds only the fusion, the input projection and the layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from compute.line_kv import append_at
from compute.model_source import load_config
from compute.sampling import choose_token
from compute.stage_model import can_pack, pack_linears, read_safetensors
from compute.types import SamplingParams
from draft_models.base import DraftProposal

CONFIG_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
DEFAULT_HEAD = "default"  # head:default, shipped in draft_models/heads/default for the default model


class HeadError(ValueError):
    """A head that cannot serve this target (missing, or trained for another)."""


@dataclass(frozen=True)
class HeadConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's
    feature_layers: tuple[int, ...]  # target layers whose outputs are the features (global indices)
    target_layers: int  # the target's layer count (a head for another target is refused)
    draft_vocab: tuple[int, ...] = ()  # the target ids the head predicts, most written first

    @classmethod
    def for_target(cls, model_dir: Path, draft_vocab: tuple[int, ...]) -> HeadConfig:
        config = load_config(model_dir)
        layers = config.num_hidden_layers
        # EAGLE-3's choice: a low, a middle and a high layer (not the last).
        features = tuple(sorted({min(1, layers - 1), max(0, layers // 2 - 1), max(0, layers - 4)}))
        return cls(config.hidden_size, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                   config.intermediate_size, config.rms_norm_eps, float(getattr(config, "rope_theta", 10000.0)),
                   config.vocab_size, features, layers, tuple(draft_vocab))

    def check_target(self, model_dir: Path) -> None:
        config = load_config(model_dir)
        theirs = (config.hidden_size, config.vocab_size, config.num_hidden_layers)
        if (self.hidden_size, self.vocab_size, self.target_layers) != theirs:
            raise HeadError(f"the head was trained for a target with hidden size {self.hidden_size}, vocabulary "
                            f"{self.vocab_size} and {self.target_layers} layers; {model_dir} has {theirs[0]}, "
                            f"{theirs[1]} and {theirs[2]} (train one with pipeinfer train-draft)")


def head_dir(path: str) -> Path:
    """head:default or head:PATH -> the directory holding the head."""
    if path == DEFAULT_HEAD:
        return Path(str(resources.files("draft_models") / "heads" / DEFAULT_HEAD))
    return Path(path).expanduser().resolve()  # absolute: a Ray actor or MPI rank may start elsewhere


def read_head_config(directory: Path) -> HeadConfig:
    file = directory / CONFIG_FILE
    if not file.exists():
        raise HeadError(f"{directory} holds no {CONFIG_FILE}: not a head (train one with pipeinfer train-draft)")
    raw = json.loads(file.read_text())
    raw["feature_layers"], raw["draft_vocab"] = tuple(raw["feature_layers"]), tuple(raw["draft_vocab"])
    return HeadConfig(**raw)


def target_embedding(target_dir: Path) -> torch.Tensor:
    """The target's input embedding [vocab, hidden], read alone from its checkpoint."""
    return read_safetensors(target_dir, ["model.embed_tokens.weight"])["model.embed_tokens.weight"]


def checked_head_dir(path: str, target_dir: Path) -> Path:
    """head:PATH's directory, checked to hold a head for this target."""
    directory = head_dir(path)
    read_head_config(directory).check_target(target_dir)
    if not (directory / WEIGHTS_FILE).exists():
        raise HeadError(f"{directory} holds no {WEIGHTS_FILE}")
    return directory


class TailDraft:
    """The coordinator's side of a head draft: it proposes nothing itself;
    the last stage runs the head and its guesses come with each result
    (pipeline/stage.py, the coordinator's _take_guesses)."""

    is_free = True

    def __init__(self, name: str) -> None:
        self.name = name

    def propose(self, seq_id, token_ids, max_tokens, sampling, generator) -> DraftProposal:
        return DraftProposal()

    def release(self, seq_id: int) -> None:
        pass


class DraftHead(nn.Module):
    def __init__(self, config: HeadConfig, embedding: torch.Tensor) -> None:
        """embedding: the target's input embedding [vocab, hidden] (frozen)."""
        super().__init__()
        self.config = config
        h, d = config.hidden_size, config.head_dim
        self.fuse = nn.Linear(len(config.feature_layers) * h, h, bias=False)
        self.in_proj = nn.Linear(2 * h, h, bias=False)
        self.embed_norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.feature_norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.attn_norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=False)
        self.mlp_norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.gate_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)
        self.out_norm = nn.RMSNorm(h, eps=config.rms_norm_eps)
        self.register_buffer("embedding", embedding.detach(), persistent=False)
        vocab = torch.tensor(config.draft_vocab, dtype=torch.long)
        self.register_buffer("draft_vocab", vocab, persistent=False)  # draft index -> target id
        self.register_buffer("out_weight", embedding.detach()[vocab], persistent=False)  # [draft vocab, hidden]
        self.output: nn.Module | None = None  # packed() sets it (serving); training uses out_weight
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # ---- files -----------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        save_file(weights, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config)) + "\n")

    @classmethod
    def load(cls, directory: Path, target_dir: Path, dtype: torch.dtype = torch.float32) -> DraftHead:
        """The head in `directory`, for the target in target_dir (its
        embedding is read from the target's checkpoint), as served."""
        config = read_head_config(directory)
        config.check_target(target_dir)
        head = cls(config, target_embedding(target_dir).to(dtype))
        weights = load_file(str(directory / WEIGHTS_FILE))
        head.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True)
        return head.to(dtype).eval().packed()

    def packed(self) -> DraftHead:
        """For serving on CPU: every matrix, the output one too, in oneDNN's
        packed layout (as the stages' are: compute/stage_model.py). Not int8:
        dynamic int8 took the shipped head's first-guess acceptance from 0.66
        to 0.21 on held-out answers."""
        if self.out_weight.device.type != "cpu" or not can_pack(self.out_weight.dtype):
            return self
        self.output = nn.Linear(self.config.hidden_size, len(self.config.draft_vocab), bias=False)
        self.output.weight = nn.Parameter(self.out_weight, requires_grad=False)
        pack_linears(self)
        return self

    def num_shipped_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def macs_per_token(self) -> int:
        """Multiply-adds of one drafted token (the bench compares it with a target forward)."""
        c = self.config
        layer = sum(m.in_features * m.out_features for m in (self.in_proj, self.q_proj, self.k_proj, self.v_proj,
                                                             self.o_proj, self.gate_proj, self.up_proj, self.down_proj))
        return layer + len(c.draft_vocab) * c.hidden_size

    # ---- compute -------------------------------------------------------

    def fused(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., len(feature_layers) * hidden] -> [..., hidden]"""
        return self.fuse(features)

    def inputs(self, feature: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The layer's input at an entry: feature [..., H] (fused target
        features of the position before, or the head's previous output) and
        the entry's token ids [...] -> [..., H]."""
        return self.in_proj(torch.cat([self.embed_norm(self.embedding[token_ids]), self.feature_norm(feature)], -1))

    def qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """x [..., N, H] at positions [N] -> q [..., heads, N, d], k and v [..., kv_heads, N, d]."""
        c = self.config
        y = self.attn_norm(x)
        shape = (*x.shape[:-1], -1, c.head_dim)
        q, k, v = (proj(y).view(shape).transpose(-2, -3) for proj in (self.q_proj, self.k_proj, self.v_proj))
        angle = positions.to(self.inv_freq.dtype)[:, None] * self.inv_freq[None]
        cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., N, H] and its attention [..., heads, N, d] -> (output
        [..., N, H], what logits() reads [..., N, H])."""
        x = x + self.o_proj(attn.transpose(-2, -3).flatten(-2))
        y = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))
        return x, self.out_norm(x)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., H] -> draft-vocabulary logits [..., draft vocab] (half the
        head's compute: training asks it only where there are labels)."""
        return self.output(normed) if self.output is not None else normed @ self.out_weight.T

    # ---- serving: one sequence's line on the last stage ---------------------

    @torch.inference_mode()
    def extend(self, line: HeadLine, start: int, features: torch.Tensor, token_ids: Sequence[int]) -> None:
        """Positions [start, start + n) of a sequence were computed by the
        target: keep their features [n, F] and the head's keys and values
        there (entry j reads the features of position j - 1 and token j;
        position 0 reads none). Written in place, as the stages' KV: a later
        run overwrites what a cancelled one left."""
        features = features.to(self.out_weight.dtype)
        before = features.new_zeros((1, features.shape[1])) if start == 0 else line.features[0, 0, start - 1:start]
        previous = torch.cat([before, features[:-1]])
        x = self.inputs(self.fused(previous), torch.tensor(list(token_ids)))
        _, k, v = self.qkv(x.unsqueeze(0), torch.arange(start, start + len(token_ids)))
        line.features = append_at(line.features, start, features[None, None])
        line.keys = append_at(line.keys, start, k)
        line.values = append_at(line.values, start, v)

    @torch.inference_mode()
    def draft(self, line: HeadLine, end: int, token_id: int, num_tokens: int,
              sampling: SamplingParams, floor: float = 0.0) -> tuple[list[int], list[float]]:
        """Up to num_tokens guesses for the positions after end + 1, whose
        token is token_id (the target's, verified), from the line up to `end`
        (its features and the head's entries); fewer once the product of the
        head's probabilities falls below floor. Greedy requests get the
        argmax, seeded ones the target's own Gumbel choice at each position
        (so that the guesses match where the head is right). -> (target token
        ids, the head's probability of each)."""
        feature = self.fused(line.features[0, 0, end:end + 1])  # [1, H]
        keys, values = line.keys[:, :, :end + 1], line.values[:, :, :end + 1]
        token, guesses, confidences, chance = token_id, [], [], 1.0
        for index in range(num_tokens):
            if chance < floor:
                break
            position = end + 1 + index
            x = self.inputs(feature, torch.tensor([token])).view(1, 1, -1)
            q, k, v = self.qkv(x, torch.tensor([position]))
            keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
            attn = F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)  # all before it: no mask
            out, normed = self.finish(x, attn)
            feature, logits = out[0], self.logits(normed[0])[0].float()
            if sampling.is_greedy:
                best = int(torch.argmax(logits))
                token, confidence = int(self.draft_vocab[best]), float(torch.softmax(logits, -1)[best])
            else:
                full = torch.full((self.config.vocab_size,), float("-inf"))
                full[self.draft_vocab] = logits
                token, probs = choose_token(full, sampling, position + 1, None)
                confidence = float(probs[token])
            guesses.append(token)
            confidences.append(confidence)
            chance *= confidence
        return guesses, confidences


@dataclass(slots=True)
class HeadLine:
    """A sequence's state for the head on the last stage, by position:
    the target's features [1, 1, capacity, F] and the head's keys and values
    [1, kv_heads, capacity, d]."""

    features: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, self.keys, self.values) if t is not None)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
