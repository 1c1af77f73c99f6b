"""The request types every layer shares: sampling settings, a generation
request, and the typed failures that travel from a stage to the HTTP layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FailureCode(str, Enum):
    """Why a request failed; the gateway maps each to an HTTP status (server/errors.py)."""

    BAD_REQUEST = "bad_request"  # the request's own parameters cannot be computed
    KV_CACHE_FULL = "kv_cache_full"  # a stage's KV budget is used up: retry later
    STAGE_DOWN = "stage_down"  # a stage process or thread is gone
    STAGE_ERROR = "stage_error"  # a stage raised while computing
    STALLED = "stalled"  # nothing progressed anywhere in the pipeline for too long
    SHUTTING_DOWN = "shutting_down"  # the server stopped before the request finished
    LOAD_FAILED = "load_failed"  # the engine could not be loaded: the server will never be ready
    INTERNAL = "internal"  # the coordinator failed (a bug)


@dataclass(frozen=True, slots=True)
class Failure:
    code: FailureCode
    message: str
    param: str | None = None  # the request parameter at fault (bad_request)

    @classmethod
    def of(cls, exc: BaseException, default: FailureCode, where: str = "") -> Failure:
        """What an exception stands for. An exception may carry its own
        `failure_code` (and `param`); any other one is `default`."""
        code = getattr(exc, "failure_code", None)
        text = str(exc) if code is not None else f"{type(exc).__name__}: {exc}"
        return cls(code or default, f"{where}: {text}" if where else text, getattr(exc, "param", None))


class RequestError(ValueError):
    """A request whose own parameters cannot be computed: the client's fault.
    `code` names the problem more precisely for the client, where one does."""

    failure_code = FailureCode.BAD_REQUEST

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def check_context(num_prompt_tokens: int, max_tokens: int, max_context: int, max_param: str = "max_tokens") -> None:
    """The one context check: the prompt and the tokens asked for must fit."""
    if num_prompt_tokens + max_tokens > max_context:
        raise RequestError(f"this model's context is {max_context} tokens; the prompt has {num_prompt_tokens} "
                           f"tokens and {max_param} asks for {max_tokens} ({num_prompt_tokens + max_tokens} in all)",
                           param=max_param, code="context_length_exceeded")


# Below this temperature sampling is greedy decoding, its limit (as in vLLM):
# logits / 1e-39 overflow float32, and the probabilities become NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def is_coupled(self) -> bool:
        """Seeded sampling uses shared Gumbel noise: identical text in every mode."""
        return not self.is_greedy and self.seed is not None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()  # EOS and friends; empty = ignore EOS

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
