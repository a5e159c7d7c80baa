"""Request bodies as the API accepts them: OpenAI's chat completion fields that the engine can honour, strictly typed.

Unknown fields are ignored, as OpenAI does; OpenAI fields this server cannot honour are refused with a 400
naming them (``refusal``), never silently dropped. Types are strict: ``true`` is not 1 and ``"5"`` is not 5.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slkv_sglang.config import MAX_HOST_BUDGET
from slkv_sglang.model_layers import ModelLayers
from slkv_sglang.request_params import RequestParamsError, parse_overrides

from .errors import ApiError

MAX_NEW_TOKENS = 4096
DEFAULT_NEW_TOKENS = 128
MAX_STOP = 4  # as OpenAI

_SESSION_ID = re.compile(r"sess_[A-Za-z0-9_-]{32}")
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)

# OpenAI fields that would change the answer but that this server cannot honour, with the values that need
# nothing from it (e.g. ``tool_choice: "none"``).
_REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "tools": ("tool calling is not supported", ([],)),
    "functions": ("function calling is not supported", ([],)),
    "tool_choice": ("tool calling is not supported", ("none",)),
    "function_call": ("function calling is not supported", ("none",)),
    "logit_bias": ("logit_bias is not supported", ({},)),
    "audio": ("audio output is not supported", ()),
    "modalities": ("only text output is supported", (["text"],)),
    "prediction": ("predicted outputs are not supported", ()),
    "reasoning_effort": ("the model does not reason", ()),
    "web_search_options": ("web search is not supported", ()),
    "store": ("completions are not stored for distillation or evals", (False,)),
}


def new_session_id() -> str:
    return f"sess_{secrets.token_urlsafe(24)}"


def is_session_id(sid: str) -> bool:
    """Only ids of the format the server issues reach the store (no other key can be named through one)."""
    return _SESSION_ID.fullmatch(sid) is not None


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def chat(self) -> dict[str, str]:
        """The message as the chat template takes it (OpenAI's ``developer`` role is the system role)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class JsonSchema(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)
    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self

    def constraint(self) -> str | None:
        """The JSON schema SGLang's constrained decoding follows, or None for free text."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema" and self.json_schema is not None:
            return json.dumps(self.json_schema.schema_)
        return None


class ChatRequest(BaseModel):
    # extra="allow" keeps unknown fields only to look the refused ones up; nothing else reads them.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    model: str = Field("default", max_length=256)
    messages: list[Message] = Field(min_length=1)
    session_id: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)  # default 0: greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # the turn's SimLayerKV settings (``enabled``, ``threshold``, ``score``, ``granularity``, ``force_lazy``,
    # ``force_lazy_heads``), as an SGLang request's ``custom_params.slkv``; the server sets the session label
    slkv: Any = None

    def refusal(self) -> ApiError | None:
        """The first thing asked for that this server cannot do, as the 400 that says so."""
        for name, (why, harmless) in _REFUSED.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value not in harmless:
                return _unsupported(name, why)
        if (self.n or 1) > 1:
            return _unsupported("n", "n > 1 is not supported: one choice per request (a session keeps one history)")
        if self.seed is not None and self.temperature:
            return _unsupported("seed", "seeded sampling needs SGLang's deterministic inference, which this engine "
                                        "does not run; with temperature 0 (greedy) the output needs no seed")
        if self.top_logprobs is not None and not self.logprobs:
            return _unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            return _unsupported("max_tokens", "max_tokens and max_completion_tokens disagree; send one")
        stops = self.stop_list()
        if len(stops) > MAX_STOP or not all(0 < len(s) <= 256 for s in stops):
            return _unsupported("stop", f"stop takes up to {MAX_STOP} non-empty sequences of up to 256 characters")
        return None

    def slkv_overrides(self, layers: ModelLayers) -> dict[str, Any]:
        """The turn's SimLayerKV settings, checked as the engine checks them (for the served model's layers);
        a 400 naming the field otherwise."""
        try:
            overrides = parse_overrides(self.slkv, layers, where="slkv")
        except RequestParamsError as exc:
            raise ApiError(400, "invalid_request", str(exc), param=exc.field) from None
        if "session" in overrides:
            raise ApiError(400, "invalid_request", "slkv.session is set by the server (the session id)",
                           param="slkv.session")
        return overrides

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_NEW_TOKENS

    def sampling_params(self) -> dict[str, Any]:
        """SGLang sampling parameters for this request."""
        params: dict[str, Any] = {
            "max_new_tokens": self.new_tokens(), "temperature": self.temperature or 0.0, "top_p": self.top_p or 1.0,
            "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
        }
        if self.stop is not None:
            params["stop"] = self.stop_list()
        constraint = self.response_format.constraint() if self.response_format else None
        if constraint is not None:
            params["json_schema"] = constraint
        return params

    def fingerprint(self) -> str:
        """What an Idempotency-Key is bound to: the request's fields, except how the answer is delivered."""
        fields = self.model_dump(include=set(type(self).model_fields) - {"stream", "stream_options"}, by_alias=True)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", why, param=param)


class OffloadSettings(BaseModel):
    """``PUT /admin/offload``: a field left out keeps its value; a ``null`` threshold restores the start-up
    one. The budget goes to the engine, which keeps no start-up value to go back to: a number only."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")
    budget_bytes: int | None = Field(None, ge=0, le=MAX_HOST_BUDGET)
    threshold: float | None = Field(None, gt=0.0, le=2.0)

    @field_validator("budget_bytes", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("the host budget is set by number only (bytes)")
        return value
