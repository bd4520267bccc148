"""Text <-> token ids for a Hugging Face model folder, and its chat template, without `transformers`.

`encode` follows what transformers (5.x) does with the same folder: the post-processor stored in
tokenizer.json alone decides which special tokens surround the text (Llama-3 and Mistral folders add BOS
there); `add_bos_token` / `add_eos_token` in tokenizer_config.json are ignored once a tokenizer.json exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from kvx.errors import KvxError


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KvxError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise KvxError(f"{path} does not hold a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _pick_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    # A separate chat_template.jinja takes priority over the config entry, as in transformers.
    template: Any = None
    if (folder / "chat_template.jinja").is_file():
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KvxError(f"cannot read {folder / 'chat_template.jinja'} as UTF-8 text ({exc})") from None
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


class Tokenizer:
    """A folder's tokenizer.json plus the settings around it (special tokens, chat template, EOS ids)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        eos_token_ids: list[int] | None = None,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
    ) -> None:
        self.backend = backend
        config = tokenizer_config or {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.unk_token = _token_text(config.get("unk_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        if bos_token_id is None and self.bos_token is not None:
            bos_token_id = backend.token_to_id(self.bos_token)
        if self.bos_token is None and bos_token_id is not None:
            self.bos_token = backend.id_to_token(bos_token_id)
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_id: int | None = backend.token_to_id(self.eos_token) if self.eos_token else None
        ids = list(eos_token_ids or [])
        if self.eos_token_id is not None and self.eos_token_id not in ids:
            ids.append(self.eos_token_id)
        self.eos_token_ids: list[int] = ids
        if self.eos_token is None and ids:
            self.eos_token = backend.id_to_token(ids[0])
        self.chat_template = chat_template
        self._compiled_template: Any = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise KvxError(f"{folder} has no tokenizer.json (kvx needs a fast-tokenizer file)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad input
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KvxError(f"{tokenizer_file} is corrupt ({reason})") from None
        tokenizer_config = _read_json(folder / "tokenizer_config.json")
        model_config = _read_json(folder / "config.json")
        generation_config = _read_json(folder / "generation_config.json")
        eos_ids: list[int] = []
        for value in (generation_config.get("eos_token_id"), model_config.get("eos_token_id")):
            eos_ids += [i for i in _id_list(value) if i not in eos_ids]
        bos_id = None
        if _token_text(tokenizer_config.get("bos_token")) is None:
            bos_id = next(iter(_id_list(model_config.get("bos_token_id"))), None)
        return cls(
            backend,
            tokenizer_config,
            eos_token_ids=eos_ids,
            chat_template=_pick_chat_template(folder, tokenizer_config),
            bos_token_id=bos_id,
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ({"role", "content"} dicts), as the model was trained to see it."""
        if self.chat_template is None:
            raise KvxError("this model has no chat template; pass the prompt as plain text instead")
        from kvx.models.chat_template import compile_template, render

        if self._compiled_template is None:
            self._compiled_template = compile_template(self.chat_template)
        return render(
            self._compiled_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            unk_token=self.unk_token or "",
            pad_token=self.pad_token or "",
        )

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


# An invisible marker no prompt text contains: the template is rendered once with it, then split there.
_TURN_SPLIT = "\u2063KVX_SPLIT\u2063"


def split_chat_turn(tokenizer, before: str, after: str, system: str | None = None) -> tuple[str, str]:
    """The chat-templated text of one user turn `before + after`, cut where `after` starts.

    The head is everything up to the end of `before` (template prefix included), the tail is `after` plus
    the end of the turn and the assistant header: what kvx prefills and compresses before the question is
    seen, and the question that comes after it.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": before + _TURN_SPLIT + after}]
    parts = tokenizer.apply_chat_template(messages, add_generation_prompt=True).split(_TURN_SPLIT, 1)
    if len(parts) != 2:  # a template may rewrite or drop the user's text
        raise KvxError("the model's chat template does not keep the user's message as given, so the context "
                       "cannot be split from the question; use --raw")
    return parts[0], parts[1]


class StreamDecoder:
    """Turns generated token ids, pushed one at a time, into text as soon as it is complete.

    Byte-level tokens can end in the middle of a UTF-8 character; such text decodes with a trailing
    U+FFFD, so it is held back until a later token completes it. Only a short window of recent ids is
    re-decoded each step: the ids since the last point where text was emitted, plus the ids before it
    that serve as context (tokenizers that strip a leading space from the first token need it).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # ids before this have been emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; returns the text it completes ("" while a character is still unfinished)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of generation), even if it ends in U+FFFD."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]
