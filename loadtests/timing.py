"""What the benchmark records of one request, whichever engine served it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestTiming:
    """Output chunks as the client saw them: a speculative engine may deliver
    several tokens in one chunk. Times are seconds since the request was sent."""

    prompt_index: int
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_sizes: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    stats: dict | None = None  # the engine's own per-request figures, where it has them

    def add_chunk(self, at_s: float, token_ids: list[int] | tuple[int, ...]) -> None:
        if token_ids:
            self.chunk_times_s.append(at_s)
            self.chunk_sizes.append(len(token_ids))
            self.token_ids.extend(token_ids)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def elapsed_s(self) -> float:
        return self.chunk_times_s[-1] if self.chunk_times_s else 0.0

    def inter_token_latencies_s(self) -> list[float]:
        """Gaps between consecutive chunks (vLLM's benchmark convention)."""
        return [b - a for a, b in zip(self.chunk_times_s, self.chunk_times_s[1:])]
