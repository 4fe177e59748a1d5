"""The OpenAI request bodies the router's HTTP API accepts (pydantic, as FastAPI validates them).

Fields follow OpenAI's API reference and vLLM's extensions (`top_k`, `ignore_eos`, `min_tokens`).
Unknown fields are ignored, as OpenAI clients send many; fields we cannot honour with a non-default
value (penalties, `logit_bias`, `best_of`, tools) are refused with 400 naming the field rather than
silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from distserve.errors import InvalidRequest


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False  # a last chunk with usage and no choices (benchmark tools count tokens from it)


class _Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = None  # vLLM: -1 or 0 = off
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM
    min_tokens: int = Field(default=0, ge=0)  # vLLM
    user: str | None = None
    # accepted only at their neutral value
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None

    def check_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise InvalidRequest(name, "is not supported by this server (only 0)")
        if self.logit_bias:
            raise InvalidRequest("logit_bias", "is not supported by this server")

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Any  # a string, a list of strings, a list of token ids or a list of token-id lists (checked in prompts())
    logprobs: int | None = Field(default=None, ge=0, le=20)  # top log-probabilities per token (OpenAI: at most 5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.best_of not in (None, 1, self.n):
            raise InvalidRequest("best_of", "is not supported by this server (only equal to n)")
        if self.suffix:
            raise InvalidRequest("suffix", "is not supported by this server")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not isinstance(p, list) or not p:
            raise InvalidRequest("prompt", "must be a non-empty string, list of strings, list of token ids or list of token-id lists")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
            return [list(x) for x in p]
        raise InvalidRequest("prompt", "must be a string, a list of strings, a list of token ids or a list of token-id lists (not a mix)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest("messages", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.tools:
            raise InvalidRequest("tools", "tool calling is not supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs set to true")
