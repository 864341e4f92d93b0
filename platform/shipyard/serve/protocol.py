"""OpenAI's wire format: the request bodies Shipyard accepts, its errors, and its answers.

Request bodies follow OpenAI's API reference for `/v1/completions` and `/v1/chat/completions`
(what the official `openai` client sends). Fields that would change the answer and that
Shipyard does not implement (logprobs, echo, suffix, penalties, logit_bias, tools, JSON mode)
are accepted only at their neutral value, so a client that sends `presence_penalty: 0` works
and one that asks for `presence_penalty: 0.5` gets a 400 naming the field instead of an answer
that silently ignored it. Fields that do not change the answer (`user`, `metadata`, `store`,
`service_tier`, `parallel_tool_calls`) are accepted and ignored. Any other field is a 400 that
names it: a typo is never ignored. `top_k` is an extension, as in vLLM.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 16
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "timeout_error",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """What both endpoints share: the model, how to sample, when to stop, how to answer."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # Accepted at their neutral value only (see the module docstring).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Accepted and ignored: they do not change the answer.
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def problems(self) -> ApiError | None:
        """The first thing asked for that Shipyard does not do, or does not do this way."""
        neutral = {
            "presence_penalty": self.presence_penalty == 0,
            "frequency_penalty": self.frequency_penalty == 0,
            "logit_bias": not self.logit_bias,
            **self._neutral(),
        }
        for name, fine in neutral.items():
            if not fine:
                return ApiError(400, f"{name} is not supported by this server", name, "unsupported")
        stops = self.stop_strings
        if len(stops) > MAX_STOP_STRINGS or any(not stop for stop in stops):
            return ApiError(
                400, f"stop: give at most {MAX_STOP_STRINGS} non-empty strings", "stop", None
            )
        if self.stream_options is not None and not self.stream:
            return ApiError(
                400, "stream_options: only allowed when stream is true", "stream_options"
            )
        return None

    def _neutral(self) -> dict[str, bool]:
        return {}


class CompletionBody(_Sampling):
    """`POST /v1/completions`."""

    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    limit_field: ClassVar[str] = "max_tokens"  # the field a too-large limit is blamed on

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)

    def _neutral(self) -> dict[str, bool]:
        return {
            "logprobs": self.logprobs is None,
            "echo": not self.echo,
            "suffix": not self.suffix,
            "best_of": self.best_of in (None, 1, self.n),
        }


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ResponseFormat(_Body):
    type: StrictStr


class ChatBody(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: StrictBool | None = None

    limit_field: ClassVar[str] = "max_completion_tokens"

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens."""
        return self.max_completion_tokens or self.max_tokens

    def _neutral(self) -> dict[str, bool]:
        return {
            "logprobs": not self.logprobs,
            "top_logprobs": not self.top_logprobs,
            "response_format": self.response_format is None or self.response_format.type == "text",
            "tools": not self.tools,
            "tool_choice": self.tool_choice in (None, "none"),
            "functions": not self.functions,
            "function_call": self.function_call in (None, "none"),
        }


class Answer:
    """The identity every chunk of one answer shares."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, fingerprint: str):
        self.kind = kind
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def envelope(self, chunk: bool) -> dict[str, Any]:
        kinds = {
            ("completion", False): "text_completion",
            ("completion", True): "text_completion",
            ("chat", False): "chat.completion",
            ("chat", True): "chat.completion.chunk",
        }
        return {
            "id": self.id,
            "object": kinds[(self.kind, chunk)],
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        """A whole choice of a non-streamed answer."""
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            return {
                "index": index,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(
        self, index: int, text: str | None, finish_reason: str | None, first: bool = False
    ) -> dict[str, Any]:
        """One choice's part of a streamed chunk."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        return {
            "index": index,
            "text": text or "",
            "logprobs": None,
            "finish_reason": finish_reason,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
