"""Turning logits into tokens: temperature / top-k / top-p, and the Gumbel
noise that couples the draft's and the target's choices in seeded requests.
"""

from __future__ import annotations

import hashlib

import torch

from compute.types import RequestError, SamplingParams


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [..., vocab] -> the distribution to sample from [..., vocab] (float32).

    Greedy requests get softmax at temperature 1 (used only as a confidence).
    """
    logits = logits.float()
    if params.is_greedy:
        return torch.softmax(logits, dim=-1)
    is_finite = bool(torch.isfinite(logits).all())
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= params.top_p
        drop_sorted[..., 0] = False  # even when top_p rounds to 0 in float32
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if is_finite and not bool(torch.isfinite(probs).all()):  # the request's parameters broke the arithmetic
        raise RequestError(f"temperature {params.temperature:g} with top_p {params.top_p:g} and top_k "
                           f"{params.top_k} gives no valid distribution", param="temperature")
    return probs


def gumbel_noise(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """g [vocab] ~ Gumbel(0, 1), a pure function of (seed, position).

    Never drawn from a stream whose consumption depends on timing, so the same
    seed gives the same text whatever the mode, draft or cancellations.
    """
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    uniform = torch.rand(vocab_size, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0 - 1e-16)
    return -torch.log(-torch.log(uniform))


def coupled_token(probs: torch.Tensor, seed: int, position: int) -> int:
    """argmax(log p + g): an exact sample from p, fixed by (seed, position)."""
    noise = gumbel_noise(seed, position, probs.shape[-1])
    return int(torch.argmax(torch.log(probs.double()) + noise))


def choose_token(
    logits: torch.Tensor, params: SamplingParams, position: int, generator: torch.Generator | None
) -> tuple[int, torch.Tensor]:
    """One token for `position` from logits [vocab], and the distribution it came from.

    The same rule serves target and draft: greedy -> argmax; seeded -> coupled
    Gumbel-max; unseeded -> a plain sample (drafts; the target uses verify.py).
    """
    probs = sampling_probs(logits, params)
    if params.is_greedy:
        return int(torch.argmax(logits)), probs
    if params.is_coupled:
        return coupled_token(probs, params.seed, position), probs
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def target_tokens(logits: torch.Tensor, params: SamplingParams, first_position: int) -> list[int]:
    """logits [n, vocab] predicting positions first_position.. -> the target's token per row.

    Only for greedy and seeded requests: their target token does not depend on the draft.
    """
    if params.is_greedy:
        return torch.argmax(logits, dim=-1).tolist()
    probs = sampling_probs(logits, params)
    return [coupled_token(probs[i], params.seed, first_position + i) for i in range(probs.shape[0])]
