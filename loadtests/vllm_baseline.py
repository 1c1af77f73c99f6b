"""vLLM as a benchmark baseline: the same target, prompts and max tokens,
greedy, at a given concurrency (optional extra pipeinfer[vllm]).

kinds:
  vllm              plain vLLM
  vllm-ngram        vLLM's own n-gram (prompt lookup) speculation
  vllm-draft:PATH   vLLM's own draft-model speculation (PATH: a model dir, a
                    .gguf or "default", as --model takes; it must share the
                    target's tokenizer)

vLLM runs in a child process (compute.vllm_host.VLLMHost) with its
engine in-process there: on this 2-core CPU that is faster than vLLM's default
layout, which reserves one of the two cores for its scheduler process
(measured: see README). It is eager (enforce_eager=True; torch.compile costs a
minute or more at start for no gain here) and float32 by default, so its
greedy output equals ours token for token. The engine is driven step by step:
each step's new tokens of a request are one output chunk, timed from that
request's submission, which is what a streaming client of `vllm serve` sees
less its HTTP hop. Requests are submitted as earlier ones finish, so at most
`concurrency` are in flight.
"""

from __future__ import annotations

from pathlib import Path

from compute.vllm_host import DEFAULT_KV_CACHE_BYTES, VLLMHost, require_vllm
from loadtests.timing import RequestTiming

KINDS = "vllm, vllm-ngram, vllm-draft:PATH"
NUM_SPECULATIVE_TOKENS = 4  # as our --draft-len default
NGRAM_MAX, NGRAM_MIN = 4, 1  # prompt lookup window, in tokens


class VLLMBaselineError(ValueError):
    pass


def is_vllm_kind(kind: str) -> bool:
    """One of KINDS (a draft's PATH is looked for when vLLM starts)."""
    return kind in ("vllm", "vllm-ngram") or (kind.startswith("vllm-draft:") and bool(kind.split(":", 1)[1]))


def speculative_config(kind: str) -> dict | None:
    """vLLM's own speculative_config for a baseline kind (None: plain vLLM)."""
    if not is_vllm_kind(kind):
        raise VLLMBaselineError(f"unknown baseline {kind!r}: expected one of {KINDS}")
    if kind == "vllm":
        return None
    if kind == "vllm-ngram":
        return {"method": "ngram", "num_speculative_tokens": NUM_SPECULATIVE_TOKENS,
                "prompt_lookup_max": NGRAM_MAX, "prompt_lookup_min": NGRAM_MIN}
    if kind.startswith("vllm-draft:"):
        from compute.model_source import ModelSourceError, resolve_model

        spec = kind.split(":", 1)[1]
        try:
            draft_dir = resolve_model(spec, show_progress=False)
        except ModelSourceError as exc:
            raise VLLMBaselineError(f"baseline {kind!r}: {exc}") from None
        return {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}


class VLLMBaseline:
    def __init__(self, model_dir: Path, kind: str, dtype: str = "float32", max_num_seqs: int = 8,
                 enforce_eager: bool = True, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
                 max_model_len: int | None = None, verbose: bool = False) -> None:
        spec = speculative_config(kind)  # bad kinds fail before vLLM is needed
        require_vllm()
        if spec is not None and spec["method"] == "draft_model":
            from draft_models.factory import check_same_vocabulary

            check_same_vocabulary(Path(model_dir), Path(spec["model"]))
        self.kind = kind
        self.name = kind.split(":", 1)[0]  # vllm | vllm-ngram | vllm-draft
        self.max_num_seqs = max_num_seqs
        self.last_spec_decode: dict | None = None  # vLLM's draft/accepted counters over the last run()
        self._host = VLLMHost({
            "model": str(Path(model_dir).resolve()),
            "dtype": dtype,
            "enforce_eager": enforce_eager,
            "max_num_seqs": max_num_seqs,
            "max_model_len": max_model_len,
            "kv_cache_bytes": kv_cache_bytes,
            # Off: the benchmark sends the same prompts at every repetition and
            # concurrency, which vLLM's prefix cache would then serve without
            # computing them (pipeinfer has no prefix cache): same work on both sides.
            "enable_prefix_caching": False,
            "speculative_config": spec,
        }, verbose=verbose)
        self.info = self._host.info

    def run(self, prompts: list[list[int]], max_tokens: int, concurrency: int,
            ignore_eos: bool = True) -> list[RequestTiming]:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        result = self._host.call("generate", {"prompts": [list(p) for p in prompts], "max_tokens": max_tokens,
                                              "concurrency": concurrency, "ignore_eos": ignore_eos})
        self.last_spec_decode = result["spec_decode"]
        timings = []
        for index, request in enumerate(result["requests"]):
            timing = RequestTiming(index)
            for at_s, token_ids in zip(request["times"], request["chunks"]):
                timing.add_chunk(at_s, token_ids)
            timings.append(timing)
        return timings

    def close(self) -> None:
        self._host.close()

    def __enter__(self) -> VLLMBaseline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
