"""POST /tokenize and /detokenize in vLLM's shapes, over the very encoding the completion routes use, so a
client can count a prompt's tokens (`count` equals the `usage.prompt_tokens` the same prompt gets) and
check it against `max_model_len` before sending it."""

from __future__ import annotations

from kvx.serve.errors import bad_request
from kvx.serve.prompts import chat_ids, completion_ids
from kvx.serve.schemas import DetokenizeRequest, TokenizeRequest


def tokenize(tokenizer, body: TokenizeRequest, max_model_len: int) -> dict:
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send either `prompt` (text) or `messages` (a chat), not both or neither",
                          "prompt" if body.prompt is not None else "messages")
    if body.messages is not None:
        if not body.add_generation_prompt:
            raise bad_request("add_generation_prompt=false is not supported: kvx's chat prompts end with the "
                              "assistant's turn", "add_generation_prompt")
        ids = chat_ids(tokenizer, body.messages)
    elif body.add_special_tokens is False:
        ids = tokenizer.encode(body.prompt, add_special_tokens=False)
    else:
        ids = completion_ids(tokenizer, body.prompt)
    strs = [tokenizer.backend.id_to_token(i) for i in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(tokenizer, body: DetokenizeRequest) -> dict:
    vocab = tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}
