"""A neural draft: a small causal LM, the target's first N layers, or an
int8 copy of the target, all run by StageModel over the whole model with a
per-sequence DraftKV (rollback = truncate to the common prefix)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from compute.line_kv import DraftKV
from compute.sampling import choose_token
from compute.stage_model import StageModel
from compute.types import SamplingParams
from draft_models.base import DraftProposal


@dataclass(slots=True)
class _SequenceDraftState:
    kv: DraftKV
    cached_token_ids: list[int] = field(default_factory=list)  # tokens whose KV is in kv


class ModelDraft:
    is_free = False

    def __init__(self, name: str, model: StageModel) -> None:
        if not (model.is_first and model.is_last):
            raise ValueError("a draft model needs its embeddings and its head")
        self.name = name
        self.model = model
        self._states: dict[int, _SequenceDraftState] = {}

    @torch.inference_mode()
    def propose(
        self,
        seq_id: int,
        token_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> DraftProposal:
        proposal = DraftProposal()
        if max_tokens <= 0:
            return proposal
        state = self._states.setdefault(seq_id, _SequenceDraftState(DraftKV(self.model.num_layers)))
        context = list(token_ids)
        # Reuse the cached prefix; at least one token must be fed to get logits.
        keep = min(_common_prefix_len(state.cached_token_ids, context), len(context) - 1)
        state.kv.truncate(keep)
        del state.cached_token_ids[keep:]
        logits = self._forward(state, context[keep:])
        while True:
            position = len(context)
            token, probs = choose_token(logits, sampling, position, generator)
            proposal.token_ids.append(token)
            proposal.probs.append(None if sampling.is_greedy or sampling.is_coupled else probs)
            proposal.confidences.append(float(probs.max()))
            context.append(token)
            if len(proposal.token_ids) == max_tokens:
                break
            logits = self._forward(state, [token])
        return proposal

    def _forward(self, state: _SequenceDraftState, new_token_ids: list[int]) -> torch.Tensor:
        """Feed tokens, keep their KV; -> logits [vocab] for the next position."""
        hidden = self.model.forward_layers(self.model.embed(new_token_ids), state.kv)
        state.kv.advance(len(new_token_ids))
        state.cached_token_ids.extend(new_token_ids)
        return self.model.logits(hidden[:, -1:])[0]

    def release(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
