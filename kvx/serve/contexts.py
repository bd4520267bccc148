"""Stored compressed contexts in the server: /v1/contexts and the `kv_context` of a completion.

A context is compressed once by the engine (a store request: prefill and compress, question-agnostic),
then lives in three tiers: in the pool while requests use it (its blocks held once, shared read-only:
runtime/contexts/resident.py), in host memory (the kept entries, on the CPU), and, with --context-dir,
in a `.kvc` file per context, written when it is made and read back at start-up. Admission unloads an
unused context from the pool when it needs the blocks; past --context-memory bytes of host copies, the
least recently used contexts that have a file drop their host copy and are read from the file on their
next use. Without --context-dir nothing can leave host memory, so a context beyond the cap is refused.

Ids are random (`ctx-` and 32 hex digits), never guessable. With API keys on, a context belongs to the
key that made it: another key gets 404, as if it did not exist (an id alone must not let anyone read or
delete someone else's document). The owner is a hash of the key, and is stored in the file beside it.

Thread-safety: residency (users, loads, the pool) belongs to the engine thread; deleting a context goes
through `EngineLoop.call`. The registry itself (ids, host copies) is touched on the event loop only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvx.errors import KvxError
from kvx.serve.errors import ApiError, bad_request

log = logging.getLogger("kvx.serve")

DEFAULT_CONTEXT_MEMORY = 2 << 30  # host bytes of stored contexts' entries (--context-memory)


def owner_of(key: str | None) -> str:
    """Who a context belongs to: a hash of the API key (never the key itself), '' when keys are off."""
    return "" if not key else hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class Entry:
    id: str
    ctx: object  # kvx.runtime.contexts.resident.ResidentContext
    owner: str
    created: int
    name: str | None = None
    file: Path | None = None
    file_bytes: int = 0
    hits: int = 0
    extra: dict = field(default_factory=dict)


class ContextRegistry:
    def __init__(self, runner, block_size: int, directory: str | None = None,
                 host_cap: int = DEFAULT_CONTEXT_MEMORY):
        self.runner = runner  # the ModelRunner: the model's config, fingerprints and dtype
        self.block_size = block_size
        self.block_bytes = 0  # set by the server from its pool
        self.directory = Path(directory) if directory else None
        self.host_cap = host_cap
        self.entries: dict[str, Entry] = {}
        self.hits = 0

    # -- start-up -----------------------------------------------------------------------------------
    def load_directory(self) -> int:
        """Register every context file of --context-dir made for this model; returns how many. A file made
        for another model or damaged is skipped with a warning (the folder may be shared)."""
        if self.directory is None:
            return 0
        from kvx.runtime.contexts.context_file import SUFFIX, read_info

        self.directory.mkdir(parents=True, exist_ok=True)
        n = 0
        for path in sorted(self.directory.glob(f"ctx-*{SUFFIX}")):
            try:
                meta, _ = read_info(path)
                server = json.loads(meta.get("server", "{}"))
                stored = self._read(path)
            except (KvxError, ValueError) as exc:
                log.warning("skipping stored context %s: %s", path.name, exc)
                continue
            entry = self._register(stored, path.stem, str(server.get("owner", "")), int(server.get("created", 0)),
                                   server.get("name"), path)
            entry.file_bytes = path.stat().st_size
            n += 1
        self.trim_host()
        return n

    # -- making one -----------------------------------------------------------------------------------
    def add(self, stored, owner: str, name: str | None) -> Entry:
        """Register a freshly compressed context (and write its file, with --context-dir)."""
        if self.directory is None and self.host_bytes() + stored.kv_bytes() > self.host_cap:
            raise ApiError(507, f"the server already holds {self.host_bytes()} bytes of contexts (--context-memory "
                           f"{self.host_cap}); delete some, or start the server with --context-dir so that idle "
                           "ones can wait on disk", type="server_error", code="contexts_full")
        cid = "ctx-" + secrets.token_hex(16)
        path = None
        created = int(time.time())
        if self.directory is not None:
            from kvx.runtime.contexts.context_file import SUFFIX, save_context

            path = self.directory / f"{cid}{SUFFIX}"
            save_context(stored, path, extra={"server": json.dumps({"owner": owner, "created": created, "name": name})})
        entry = self._register(stored, cid, owner, created, name, path)
        if path is not None:
            entry.file_bytes = path.stat().st_size
        self.trim_host(keep=entry)
        return entry

    def _register(self, stored, cid, owner, created, name, path) -> Entry:
        from kvx.runtime.contexts.resident import ResidentContext

        reload = None if path is None else (lambda p=path: self._read(p))
        from kvx.runtime.parallel.stored_shards import share_of

        ctx = ResidentContext(stored, reload=reload, name=cid, share=share_of(self.runner.model))
        entry = Entry(cid, ctx, owner, created, name, path)
        self.entries[cid] = entry
        return entry

    def _read(self, path: Path):
        from kvx.runtime.contexts.context_file import load_context, weights_of

        r = self.runner
        return load_context(path, r.model.full_config, r.model.fingerprint, r.tokenizer.fingerprint, r.dtype,
                            weights_of(r.model, r.dtype))

    # -- lookups ----------------------------------------------------------------------------------------
    def get(self, cid: str, owner: str, param: str = "kv_context") -> Entry:
        entry = self.entries.get(cid) if isinstance(cid, str) else None
        if entry is None or entry.owner != owner or entry.ctx.deleted:
            raise ApiError(404, f"no stored context {cid!r}", type="not_found_error", param=param,
                           code="context_not_found")
        return entry

    def owned(self, owner: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.owner == owner and not e.ctx.deleted]

    def use(self, entry: Entry) -> None:
        entry.hits += 1
        self.hits += 1

    # -- deleting ---------------------------------------------------------------------------------------
    def delete_now(self, entry: Entry, contexts) -> None:
        """On the engine thread: no new request may use it; its blocks go back once no request reads them
        (`contexts`: the pool's ResidentContexts)."""
        entry.ctx.deleted = True
        if entry.ctx.users == 0:
            contexts.drop(entry.ctx)

    def forget(self, entry: Entry) -> None:
        """On the event loop, after delete_now: the id, the host copy and the file go."""
        self.entries.pop(entry.id, None)
        entry.ctx.stored = None
        if entry.file is not None:
            entry.file.unlink(missing_ok=True)

    # -- host memory --------------------------------------------------------------------------------------
    def host_bytes(self) -> int:
        return sum(e.ctx.kv_bytes for e in self.entries.values() if e.ctx.stored is not None)

    def trim_host(self, keep: Entry | None = None) -> None:
        """Past the cap, drop the host copies that have a file, least recently used first."""
        for e in sorted(self.entries.values(), key=lambda e: e.ctx.last_used):
            if self.host_bytes() <= self.host_cap:
                return
            if e is not keep and e.file is not None and e.ctx.stored is not None:
                e.ctx.stored = None

    def stats(self) -> dict:
        """Figures for /metrics (read from the event loop; the engine thread's ints are read atomically)."""
        live = [e for e in self.entries.values() if not e.ctx.deleted]
        return {"contexts": len(live), "hits": self.hits,
                "loads": sum(e.ctx.loads for e in self.entries.values()),
                "load_s": sum(e.ctx.load_s for e in self.entries.values()),
                "bytes_pool": sum(e.ctx.reserved for e in live) * self.block_bytes,
                "bytes_host": self.host_bytes(),
                "bytes_disk": sum(e.file_bytes for e in live if e.file is not None)}

    def describe(self, entry: Entry) -> dict:
        """A context as /v1/contexts shows it."""
        ctx = entry.ctx
        cfg = self.runner.model.full_config  # the whole model's, on tensor-parallel ranks too
        full_entries = cfg.num_layers * cfg.num_kv_heads * ctx.tokens
        kept = int(ctx.model_lengths.sum())
        bs = self.block_size
        return {"id": entry.id, "object": "kv_context", "created": entry.created, "name": entry.name,
                "context_tokens": ctx.tokens, "policy": ctx.info.policy.get("name"),
                "budget": _budget_text(ctx.info.budget), "entries_kept": kept, "entries_full": full_entries,
                "bytes_held": int((-(-ctx.model_lengths // bs)).sum()) * self.block_bytes,
                "bytes_full": full_entries * self.runner.entry_bytes(),
                "resident": ctx.resident, "in_host_memory": ctx.stored is not None,
                "file_bytes": entry.file_bytes if entry.file is not None else None, "hits": entry.hits,
                "requests_running": ctx.users}


def _budget_text(budget: dict) -> str | None:
    if "fraction" in budget:
        return f"{budget['fraction'] * 100:g}%"
    return str(budget["tokens"]) if "tokens" in budget else None


def context_question_ids(tokenizer, entry: Entry, chat: bool, body) -> list[int]:
    """The ids a completion on a stored context prefills: a chat's one user message wrapped as the
    context's questions are (kvx generate --load-context), or a completion's prompt as raw continuation."""
    from kvx.context_options import question_ids
    from kvx.serve.prompts import _text

    if not chat:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            return list(prompt)
        text = prompt if isinstance(prompt, str) else "".join(prompt)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise bad_request("the prompt is empty", "prompt")
        return ids
    msgs = body.messages
    if len(msgs) != 1 or msgs[0].role != "user":
        raise bad_request("a request on a stored context (kv_context) takes one user message, its question: the "
                          "system message and the document are the context's", "messages")
    ids = question_ids(tokenizer, entry.ctx, _text(msgs[0], 0))
    if not ids:
        raise bad_request("the question is empty", "messages")
    return ids
