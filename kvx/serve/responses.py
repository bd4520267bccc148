"""The API's response objects: chat.completion(.chunk) and text_completion, usage, SSE framing.

`usage` carries the API's token counts plus kvx's K+V bytes: kv_bytes_held (what the request's cache
held at the end: kept entries plus decode headroom) and kv_bytes_full (what a full cache of the same
tokens takes).
"""

from __future__ import annotations

import json
import time
import uuid

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens,
            # The tokens of a stored context (kv_context) the request read instead of prefilling them.
            "prompt_tokens_details": {"cached_tokens": getattr(result, "cached_tokens", 0)},
            "kv_bytes_held": result.kv_bytes_held, "kv_bytes_full": result.kv_bytes_full}


def sse(obj) -> str:
    """One server-sent event: `data: <json>` and a blank line; the stream ends with `data: [DONE]`."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


DONE = sse("[DONE]")


class Reply:
    """How one endpoint shapes its answers: `chat` (messages, deltas) or `text` (completions)."""

    def __init__(self, kind: str, model: str):
        self.chat = kind == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}

    def complete(self, result) -> dict:
        """The whole answer (no streaming)."""
        finish = _FINISH[result.finish_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                      "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage=usage(result))
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], usage=usage(result))

    def chunk(self, text: str | None = None, finish: str | None = None, role: bool = False,
              with_usage: bool = False) -> dict:
        """One streamed piece; `role` opens a chat stream, `finish` (kvx's reason) closes it."""
        reason = None if finish is None else _FINISH[finish]
        extra = {"usage": None} if with_usage else {}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._envelope("text_completion", [choice], **extra)

    def usage_chunk(self, result) -> dict:
        """The last chunk when the client asked for stream_options.include_usage: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(result))
