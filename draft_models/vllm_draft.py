"""`--draft vllm:PATH`: the draft model runs in vLLM, in a child process
(compute/vllm_host.py). This adapter speaks the DraftModel protocol over it;
each propose() is one `propose` command there.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from compute.types import SamplingParams
from compute.vllm_host import DEFAULT_KV_CACHE_BYTES, DTYPE_NAMES, VLLMHost
from draft_models.base import DraftProposal

# The prefix cache reuses whole KV blocks only. vLLM's CPU default is 128
# tokens; 32 (the CPU attention's smallest) lets re-proposals after each
# verification reuse all but the last < 32 tokens of the context.
DRAFT_BLOCK_SIZE = 32

_SHARED_HOSTS: dict[tuple[str, str], VLLMHost] = {}
_SHARED_LOCK = threading.Lock()


def close_shared_hosts() -> None:
    """Stop the engines that VLLMDraft.shared started (the next use starts anew)."""
    with _SHARED_LOCK:
        hosts = list(_SHARED_HOSTS.values())
        _SHARED_HOSTS.clear()
    for host in hosts:
        host.close()


class VLLMDraft:
    """The DraftModel protocol over a VLLMHost. Keeps no per-sequence state:
    vLLM's prefix cache holds each sequence's KV, so release() has nothing to free."""

    is_free = False

    def __init__(self, name: str, host: VLLMHost) -> None:
        self.name = name
        self.host = host

    @classmethod
    def start(cls, name: str, model_dir: Path, dtype: torch.dtype = torch.float32, *,
              kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, enforce_eager: bool = True,
              threads: int | None = None, block_size: int | None = DRAFT_BLOCK_SIZE,
              verbose: bool = False) -> VLLMDraft:
        options = {
            "model": str(Path(model_dir).resolve()),
            "dtype": DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
            "enforce_eager": enforce_eager,
            "max_num_seqs": 4,
            "kv_cache_bytes": kv_cache_bytes,
            "enable_prefix_caching": True,
            "draft_sampler": True,
            "threads": threads,
            "block_size": block_size,
        }
        return cls(name, VLLMHost(options, verbose=verbose))

    @classmethod
    def shared(cls, name: str, model_dir: Path, dtype: torch.dtype = torch.float32) -> VLLMDraft:
        """A draft over this process's one host per (model, dtype), started on
        first use and closed at exit: engines loaded one after another (tests,
        benchmarks) do not each pay vLLM's start."""
        key = (str(Path(model_dir).resolve()), DTYPE_NAMES.get(dtype, str(dtype)))
        with _SHARED_LOCK:
            host = _SHARED_HOSTS.get(key)
            if host is None or not host.is_alive():
                host = cls.start(name, model_dir, dtype).host
                _SHARED_HOSTS[key] = host
        return cls(name, host)

    def propose(self, seq_id: int, token_ids: Sequence[int], max_tokens: int, sampling: SamplingParams,
                generator: torch.Generator | None) -> DraftProposal:
        if max_tokens <= 0:
            return DraftProposal()
        rng_seed = None
        if not (sampling.is_greedy or sampling.is_coupled):  # a plain sample: its randomness comes from our stream
            rng_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        tokens, confidences, qs = self.host.call("propose", {
            "context": list(token_ids), "max_tokens": max_tokens, "rng_seed": rng_seed,
            "sampling": (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed),
        })
        if qs is None:
            return DraftProposal(list(tokens), [None] * len(tokens), list(confidences))
        q = torch.from_numpy(qs)
        return DraftProposal(list(tokens), [q[i] for i in range(len(tokens))], list(confidences))

    def release(self, seq_id: int) -> None:
        pass

    def close(self) -> None:
        self.host.close()
