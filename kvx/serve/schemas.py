"""Request bodies of /v1/chat/completions and /v1/completions.

Fields the API defines are typed as it defines them; unknown fields are ignored, as the API does. kvx's
extras (what the `openai` client's `extra_body` sends) pick the compression per request: kv_policy,
kv_budget ("5%" or a number of tokens per kv head), kv_allocation, kv_policy_args ({"window": 16}, or
"window=16,kernel=5"). top_k and ignore_eos are not in OpenAI's API but are honoured, as vLLM does
(ignore_eos: generate max_tokens tokens even past the end-of-sequence token, for benchmarks).

Fields the API defines that kvx cannot honour (penalties, logprobs, tools, ...) are declared only so that
setting them is a clear 400 instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    _unsupported: ClassVar[tuple[str, ...]] = ("presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                                               "top_logprobs")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    ignore_eos: bool = False

    kv_policy: Optional[StrictStr] = None
    kv_budget: Union[StrictStr, StrictInt, None] = None
    kv_allocation: Optional[StrictStr] = None
    kv_policy_args: Union[dict[str, Union[StrictStr, StrictInt, float, bool]], list[StrictStr], StrictStr, None] = None
    # A stored compressed context (POST /v1/contexts) the request's messages or prompt follow: only the
    # request's own tokens are prefilled.
    kv_context: Optional[StrictStr] = None

    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    logprobs: Any = None
    top_logprobs: Optional[int] = None

    def unsupported_fields(self) -> list[str]:
        """The fields set to something kvx cannot do (a zero, false or empty value is not a request)."""
        return [name for name in self._unsupported if getattr(self, name) not in (None, False, 0, {}, [], "")]

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[ContentPart], None] = None


class ChatCompletionRequest(_Body):
    _unsupported: ClassVar[tuple[str, ...]] = _Body._unsupported + ("tools", "functions", "audio")

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    audio: Optional[dict[str, Any]] = None

    def requested_max_tokens(self) -> Optional[int]:
        # max_completion_tokens is the API's current name; max_tokens its deprecated one.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Body):
    _unsupported: ClassVar[tuple[str, ...]] = _Body._unsupported + ("echo", "suffix")

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ContextCreateRequest(BaseModel):
    """POST /v1/contexts: a document compressed once, answered from by many requests (kv_context).

    The document is `text`, or `messages`: an optional system message and one user message holding it.
    Questions asked on it later are wrapped in the same chat turn (or, with raw, follow it as plain text).
    Compression defaults to kvzip at 10%: question-agnostic, so one compression serves every question."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    text: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1, max_length=2)
    system: Optional[StrictStr] = None
    raw: bool = False
    name: Optional[StrictStr] = Field(None, max_length=256)
    kv_policy: Optional[StrictStr] = None
    kv_budget: Union[StrictStr, StrictInt, None] = None
    kv_allocation: Optional[StrictStr] = None
    kv_policy_args: Union[dict[str, Union[StrictStr, StrictInt, float, bool]], list[StrictStr], StrictStr, None] = None


class TokenizeRequest(BaseModel):
    """POST /tokenize, in vLLM's shape: a completion `prompt` or chat `messages` (exactly one)."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = None  # prompt only: None is what /v1/completions adds (the BOS, if any)
    add_generation_prompt: bool = True  # messages only; kvx's chat prompts always end with it
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    tokens: list[StrictInt]
