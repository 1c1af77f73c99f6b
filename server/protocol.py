"""OpenAI-compatible request and response models (the HTTP boundary).

Types follow JSON Schema exactly so that what the OpenAPI page promises is
what is accepted: integers accept 3 and 3.0 but not "3" or true; booleans are
strict. Parameters that exist in OpenAI's API but that we do not implement are
rejected by name (see UNSUPPORTED_*), never silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
)


def _json_integer(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError("must be a number")
    return value


def _json_boolean(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError("must be a boolean")
    return value


def is_valid_unicode(text: str) -> bool:
    """JSON lets a string hold a lone UTF-16 surrogate ("\\ud800"), which no
    tokenizer (and no UTF-8 encoder) accepts."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _encodable(value: str) -> str:
    if not is_valid_unicode(value):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    return value


# Text from the client: a JSON string that is also valid Unicode.
Text = Annotated[StrictStr, AfterValidator(_encodable)]


def JsonInt(**bounds):  # noqa: N802 - a type factory
    """An integer as JSON Schema means it (3 or 3.0, not "3" or true); bounds
    go before the validator so that they appear in the OpenAPI schema."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_integer)]


def JsonFloat(**bounds):  # noqa: N802 - a type factory
    return Annotated[float, Field(**bounds), BeforeValidator(_json_number)]


def _prompt_kind(value: Any) -> str | None:
    """Which form of prompt this is, so that only that form's errors are reported."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "texts" if value and all(isinstance(v, str) for v in value) else "token_ids"
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="Send a last chunk with the request's usage.")


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")  # extras are reported by name (400), not dropped

    model: Text = Field(..., description="The served model name (see GET /v1/models).")
    temperature: JsonFloat(ge=0.0, le=2.0) | None = Field(None, description="0 = greedy. Default 1.")
    top_p: JsonFloat(gt=0.0, le=1.0) | None = Field(None, description="Nucleus sampling mass. Default 1.")
    top_k: JsonInt(ge=-1) | None = Field(None, description="vLLM extension: keep the k most likely tokens; -1 or 0 = off.")
    seed: JsonInt(ge=-(2**63), le=2**63 - 1) | None = Field(None,
                                 description="Seeded sampling: the same text every time, in every mode.")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 strings; the text ends before the first one.")
    n: JsonInt(ge=1, le=1) | None = Field(None, description="Completions per prompt: only 1 is supported.")
    stream: StrictBool | None = Field(False, description="Stream Server-Sent Events, one chunk per token.")
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, description="End-user id, logged only.")
    ignore_eos: StrictBool | None = Field(False, description="vLLM extension: do not stop at end-of-text.")
    presence_penalty: JsonFloat(ge=0.0, le=0.0) | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: JsonFloat(ge=0.0, le=0.0) | None = Field(None, description="Only 0 is supported.")


class CompletionRequest(_SamplingFields):
    prompt: Annotated[
        Annotated[Text, Tag("text")] | Annotated[list[JsonInt()], Tag("token_ids")] | Annotated[list[Text], Tag("texts")],
        Discriminator(_prompt_kind, custom_error_type="invalid_prompt",
                      custom_error_message="must be a string, a list of token ids, or a list of strings"),
    ] = Field(
        ..., description="One prompt: text, or a list of token ids. A list of several strings is refused.")
    max_tokens: JsonInt(ge=1) | None = Field(16, description="Tokens to generate. Default 16.")
    echo: Annotated[Literal[False], BeforeValidator(_json_boolean)] | None = Field(
        False, description="Only false is supported.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation, oldest first.")
    max_tokens: JsonInt(ge=1) | None = Field(None, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: JsonInt(ge=1) | None = Field(None, description="Tokens to generate. Default: up to the context.")


# OpenAI parameters we do not implement, accepted only at their neutral value
# (anything else is refused by name). n, penalties and echo are fields whose
# schema allows only the neutral value.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None,),
    "best_of": (None, 1),
    "suffix": (None,),
    "tools": (None,),
    "tool_choice": (None, "none"),
    "functions": (None,),
    "function_call": (None,),
    "response_format": (None,),
    "parallel_tool_calls": (None,),
}


class Speculation(BaseModel):
    draft_tokens: int = Field(..., description="Draft tokens sent for verification.")
    accepted_tokens: int = Field(..., description="Draft tokens the target accepted.")
    acceptance_rate: float = Field(..., description="accepted_tokens / draft_tokens (0 when none).")
    mean_accepted_len: float = Field(..., description="Tokens produced per verification (1 = no gain).")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculation: Speculation | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pipeinfer"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok", "loading", "unhealthy", "failed"]
    stages: list[dict[str, Any]] = Field(default_factory=list)
    draft: dict[str, Any] | None = None  # where the draft runs: {"runs_on": ..., "node_id": ..., ...}
    # What runs (draft, stages, mode, transport) and, under "defaults", each of
    # them the user left out: what the defaults chose and why.
    config: dict[str, Any] | None = None
    detail: str | None = None
