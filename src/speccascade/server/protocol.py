"""The wire format: pydantic request models (OpenAI's completions and chat completions, plus the
speculation fields), OpenAI-style error bodies, and response / stream-chunk builders.

Unknown fields are refused (a misspelled ``alhpa`` is an error naming it, not silently ignored).
OpenAI clients send the speculation fields with ``extra_body={"method": "opt", "alpha": 0.3}``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None, str]:
    """(message, param, code) from pydantic / FastAPI validation errors: the first error, its field."""
    e = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": "invalid"}
    # the field's path, without "body" and without the union member pydantic tried (str, list[int], ...)
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _UNION_TAG.match(str(x))]
    param = ".".join(loc) or None
    if e.get("type") == "json_invalid":
        ctx = (e.get("ctx") or {}).get("error", "")
        return f"malformed JSON body{': ' + str(ctx) if ctx else ''}", None, "json_invalid"
    if e.get("type") == "missing":
        if param is None:
            return "the request body is empty: send a JSON object", None, "missing"
        return f"{param} is required", param, "missing"
    if e.get("type") == "extra_forbidden":
        return f"unknown field {param!r} (speculation fields: method, alpha, gamma, options, quality_floor, " \
               f"latency_budget, top_k)", param, "unknown_field"
    if not loc and e.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None, "invalid_type"
    more = f" (and {len(errors) - 1} more problem{'s' * (len(errors) > 2)})" if len(errors) > 1 else ""
    return f"{param or 'body'}: {e.get('msg', 'invalid')}{more}", param, e.get("type")


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|function-.*|[A-Z]\w*)$")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Speculation(BaseModel):
    """The speculation fields of a request (defaults: the server's flags)."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    alpha: float | None = None
    gamma: int | None = None
    options: dict[str, Any] | None = None
    quality_floor: float | None = Field(None, description="max quality loss vs the verifier (calibration)")
    latency_budget: float | None = Field(None, description="max latency relative to the verifier (calibration)")
    top_k: int | None = None


class Sampling(Speculation):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


# ---------------------------------------------------------------------------------------------
# responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, speculation: dict | None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if speculation is not None:
        out["speculation"] = speculation
    return out


def completion_response(rid: str, model: str, choices: list[dict], usage_: dict, created: int | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chat_response(rid: str, model: str, choices: list[dict], usage_: dict, created: int | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
