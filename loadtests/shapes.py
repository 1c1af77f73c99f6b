"""The random Llama shapes `pipeinfer make-pair` and `make-model` build, by
name: read by the CLI before anything loads, so nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaConfig

# Token ids the config names when no tokenizer is given (as the tests' tiny models).
BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1


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
        from transformers import LlamaConfig

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
