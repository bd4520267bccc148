"""The token ids a request's prompt stands for, encoded exactly as `kvx generate` encodes them.

A chat of one user turn (with or without a system message) goes through options.encode_prompt, the very
function `kvx generate` uses, so the server and the CLI feed the model the same ids. Longer conversations
go through the model's chat template. A completion prompt is raw text (`kvx generate --raw`) or token ids.
"""

from __future__ import annotations

from kvx.errors import KvxError
from kvx.serve.errors import bad_request

# A normaliser may compose characters (a letter and its accent into one), so a token can stand for more
# characters of the request than its own text has: the bound allows twice as many.
_COMPOSE = 2


def longest_token(tokenizer) -> int:
    """The most non-space characters one token of the vocabulary stands for (computed once per server)."""
    texts = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)])
    return max(1, max((len("".join(t.split())) for t in texts), default=1))


def fewest_tokens(texts, longest: int) -> int:
    """A lower bound on how many tokens `texts` encode to, without tokenizing them: every token stands for
    at most `longest` non-space characters. A prompt whose bound already exceeds the context is refused
    before the (seconds long, for megabytes) tokenization."""
    chars = sum(len(t) - sum(t.count(c) for c in " \n\t\r") for t in texts)
    return -(-chars // (_COMPOSE * longest))


def chat_texts(messages) -> list[str]:
    out = []
    for m in messages:
        if isinstance(m.content, str):
            out.append(m.content)
        elif m.content:
            out += [p.text for p in m.content if p.text]
    return out


def completion_texts(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    return [p for p in prompt if isinstance(p, str)]


def _text(message, i: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"content part of type {part.type!r} is not supported: kvx takes text only",
                              f"messages[{i}].content[{j}]")
        parts.append(part.text)
    return "".join(parts)


def chat_ids(tokenizer, messages) -> list[int]:
    from kvx.options import encode_prompt

    # The API's "developer" role is what chat templates call "system".
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m, i)}
             for i, m in enumerate(messages)]
    roles = [t["role"] for t in turns]
    if roles in (["user"], ["system", "user"]):
        system = turns[0]["content"] if len(turns) == 2 else None
        return encode_prompt(tokenizer, turns[-1]["content"], system, raw=False)
    if not tokenizer.has_chat_template:
        raise bad_request("this model has no chat template, so it takes one user message (optionally after a "
                          "system message); use /v1/completions for raw text", "messages")
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
    except KvxError as exc:
        raise bad_request(str(exc), "messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def completion_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > 1:
            raise bad_request("one prompt per request: send several requests (they are batched)", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        from kvx.options import encode_prompt

        return encode_prompt(tokenizer, prompt, None, raw=True)
    vocab = tokenizer.vocab_size
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
    return list(prompt)
