"""`kvx generate --jsonl`: one request object per stdin line, one result object per stdout line.

Request fields: "prompt" (question-aware), or "context" with "question" or "questions" (question-agnostic),
or "context_file" (a .kvc file from `kvx compress`: nothing of it is prefilled, and the lines naming the same
file share its blocks in the pool) with "question" or "questions";
optional "id", "system", "max_tokens", "temperature", "top_p", "top_k", "seed", "raw", and the line's own
compression: "policy", "budget", "allocation", "policy_args" (an object or a list of "key=value"); the
command's flags are the defaults. A line that cannot be run gets {"id": ..., "line": N, "error": "..."}
and the other lines still run.

Up to --max-batch requests run at once through the batched engine (runtime/engine/batch_engine.py) over one KV pool of
--kv-memory bytes; each result is written as soon as it finishes (with its "id" and "line"), or in input
order with --ordered. The model loads once.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import replace
from typing import TextIO

from kvx.errors import KvxError

_SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "seed": int}


def _number(key: str, value, whole: bool):
    """A JSON number as the field's type: 3.0 is a whole number, 3.5, "3", true and 1e400 are not."""
    if isinstance(value, float) and whole and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (float, int)) or (whole and not isinstance(value, int)):
        raise KvxError(f"field {key!r} must be a {'whole ' if whole else ''}number")
    try:
        return value if whole else float(value)
    except OverflowError:
        raise KvxError(f"field {key!r} is too large") from None


def parse_line(obj, engine, tok, params, max_tokens: int, raw: bool, system, defaults: dict,
               contexts: dict | None = None):
    """A GenerationRequest for one decoded JSON line (KvxError for anything a user must fix, or for a
    request whose prefill activations would not fit in the device's free memory). Its KV cache is the
    pool's business (BatchEngine.submit refuses a request larger than the whole pool): the pool's memory is
    already taken from the device, so comparing the cache with what is free would count it twice."""
    from kvx.inputs import check_utf8
    from kvx.options import check_memory, check_sampling, encode_prompt, policy_and_budget, split_context_question
    from kvx.runtime.engine.sequence import GenerationRequest

    if not isinstance(obj, dict):
        raise KvxError("each line must be a JSON object")
    for key, cast in _SAMPLING_FIELDS.items():
        if key in obj:
            params = replace(params, **{key: _number(key, obj[key], whole=cast is int)})
    check_sampling(params, name=lambda field: f"field {field!r}")
    n = obj.get("max_tokens", max_tokens)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise KvxError("field 'max_tokens' must be a non-negative integer")
    raw = bool(obj.get("raw", raw))
    system = obj.get("system", system)
    if system is not None and not isinstance(system, str):
        raise KvxError("field 'system' must be a string")
    for key in ("prompt", "context", "question", "system"):
        if isinstance(obj.get(key), str):
            check_utf8(obj[key], f"field {key!r}")
    if "context_file" in obj:
        return _on_context_file(obj, engine, tok, params, n, contexts if contexts is not None else {})
    policy, budget = _compression(obj, defaults, policy_and_budget)
    common = dict(params=params, max_tokens=n, policy=policy, budget=budget, id=obj.get("id"))
    if "context" in obj:
        questions = obj.get("questions", [obj["question"]] if "question" in obj else None)
        if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise KvxError("a 'context' request needs 'question' (a string) or 'questions' (a list of strings)")
        for q in questions:
            check_utf8(q, "field 'questions'")
        if not isinstance(obj["context"], str) or not obj["context"].strip():
            raise KvxError("field 'context' must be a non-empty string")
        ids = [split_context_question(tok, obj["context"], q, system, raw) for q in questions]
        engine.check_length(len(ids[0][0]))
        check_memory(engine, len(ids[0][0]), n, question_tokens=max(len(q) for _, q in ids), policy=policy,
                     budget=budget, kv_in_pool=True)
        return GenerationRequest(context_ids=ids[0][0], question_ids=[q for _, q in ids], **common), questions
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise KvxError("field 'prompt' must be a non-empty string (or give 'context' and 'question')")
    ids = encode_prompt(tok, prompt, system, raw)
    engine.check_length(len(ids))
    check_memory(engine, len(ids), n, policy=policy, budget=budget, kv_in_pool=True)
    return GenerationRequest(prompt_ids=ids, **common), None


def _questions(obj: dict) -> list[str]:
    from kvx.inputs import check_utf8

    questions = obj.get("questions", [obj["question"]] if "question" in obj else None)
    if not isinstance(questions, list) or not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise KvxError("a 'context' request needs 'question' (a string) or 'questions' (a list of strings)")
    for q in questions:
        check_utf8(q, "field 'questions'")
    return questions


def _on_context_file(obj: dict, engine, tok, params, n: int, contexts: dict):
    """A line on a stored context: its questions after the file's context (read once per run: the lines
    naming one file share its ResidentContext, so its blocks are held once in the pool)."""
    from kvx.context_options import open_context_file, question_ids
    from kvx.runtime.contexts.resident import ResidentContext
    from kvx.runtime.engine.sequence import GenerationRequest

    path = obj["context_file"]
    if not isinstance(path, str) or not path:
        raise KvxError("field 'context_file' must be a path (a .kvc file from `kvx compress`)")
    given = [k for k in ("prompt", "context", "policy", "budget", "allocation", "policy_args", "system", "raw") if k in obj]
    if given:
        raise KvxError(f"a 'context_file' line takes its context, policy and chat wrapping from the file; drop "
                       f"{', '.join(repr(k) for k in given)}")
    questions = _questions(obj)
    ctx = contexts.get(path)
    if ctx is None:
        from kvx.runtime.parallel.stored_shards import share_of

        ctx = contexts[path] = ResidentContext(open_context_file(path, engine.model, tok, engine.dtype),
                                               share=share_of(engine.model))
    ids = [question_ids(tok, ctx, q) for q in questions]
    engine.check_length(ctx.tokens + max(len(q) for q in ids))
    return GenerationRequest(context=ctx, question_ids=ids, params=params, max_tokens=n, id=obj.get("id")), questions


def _compression(obj: dict, defaults: dict, policy_and_budget):
    """The line's (Policy, Budget): its own fields over the command's flags; a fresh Policy per line."""
    fields = {}
    for key in ("policy", "budget", "allocation"):
        value = obj.get(key, defaults[key])
        if value is not None and not isinstance(value, (str, int)) or isinstance(value, bool):
            raise KvxError(f"field {key!r} must be a string")
        fields[key] = None if value is None else str(value)
    args = obj.get("policy_args", defaults["policy_args"])
    if isinstance(args, dict):
        args = [f"{k}={v}" for k, v in args.items()]
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise KvxError("field 'policy_args' must be an object or a list of 'key=value' strings")
    if "policy" in obj and "budget" not in obj and obj["policy"] == "full":
        fields["budget"] = None  # a line asking for the full cache drops the command's budget
    return policy_and_budget(fields["policy"] or "full", fields["budget"], fields["allocation"], args)


def run_jsonl(inp: TextIO, out: TextIO, *, model, device, dtype, policy, budget, allocation, policy_args,
              params, max_tokens, raw, system, quiet, use_graphs=True, prefill_chunk=None, max_batch=None,
              kv_memory=None, ordered=False, prefill_step=None, prefill_first=False, progress=None,
              loaded=None, tp=None) -> int:
    """Process every line; returns the number of lines that failed. `progress`: a BatchProgress
    (kvx/status_line.py) to keep up to date, or None. loaded: (model, tokenizer) already loaded; tp: rank 0's
    process group of a tensor-parallel run (the other ranks follow its plans: jsonl_batch, plan.follow)."""
    from kvx.options import build_engine, load
    from kvx.result_view import result_json

    llm, tok = loaded if loaded is not None else load(model, device, dtype, quiet=quiet)
    engine = build_engine(llm, tok, "full", None, None, [], use_graphs=use_graphs, prefill_chunk=prefill_chunk)
    batch = jsonl_batch(engine, kv_memory, max_batch, prefill_step, prefill_first, tp)
    defaults = dict(policy=policy, budget=budget, allocation=allocation, policy_args=list(policy_args))
    failures = _run_lines(inp, out, batch, engine, tok, defaults, params, max_tokens, raw, system, quiet, ordered,
                          progress, result_json)
    if tp is not None:
        batch.close()  # the other ranks stop following (after a failure, run_ranks stops them)
    return failures


def jsonl_batch(engine, kv_memory, max_batch, prefill_step, prefill_first, tp=None):
    """The BatchEngine of --jsonl over one pool of kv_memory bytes (default: what the device can give); on
    tensor-parallel ranks every rank's pool is the smallest rank's, and rank 0's engine a LeaderBatch."""
    from kvx.runtime.engine.batch_engine import DEFAULT_MAX_BATCH, BatchEngine
    from kvx.runtime.memory import available_bytes, human_bytes
    from kvx.runtime.cache.pool import default_kv_memory

    if kv_memory is not None:
        # The pool is the whole KV budget of the run; each request is then admitted only when it fits in it.
        free, _ = available_bytes(engine.device)
        if free is not None and kv_memory > free:
            raise KvxError(f"--kv-memory {human_bytes(kv_memory)} is more than the {human_bytes(free)} this "
                           "device has free; give a smaller --kv-memory (or leave it out for a safe default)")
    if kv_memory is None:
        # The default pool never claims more than the device can give (KVX_MEMORY_LIMIT included): the
        # pool is the one budget every line's cache is checked against.
        free, _ = available_bytes(engine.device)
        kv_memory = default_kv_memory(engine.device) if free is None else min(default_kv_memory(engine.device), free)
    if tp is not None:
        kv_memory = tp.min_int(kv_memory)
    batch = BatchEngine(engine, kv_memory, max_batch or DEFAULT_MAX_BATCH,
                        prefill_step=prefill_step, prefill_first=prefill_first)
    if tp is not None and tp.rank == 0:
        from kvx.runtime.parallel.plan import LeaderBatch

        batch = LeaderBatch(batch, tp)
    return batch


def _run_lines(inp, out, batch, engine, tok, defaults, params, max_tokens, raw, system, quiet, ordered, progress,
               result_json) -> int:
    writer = _Writer(out, ordered)
    failures = 0
    live: dict = {}  # Sequence -> (line number, id, questions)
    contexts: dict = {}  # context_file path -> its ResidentContext, shared by the lines that name it
    lines = enumerate(inp, start=1)

    def fail(lineno: int, rid, message: str) -> None:
        nonlocal failures
        failures += 1
        writer.put(lineno, {"id": rid, "line": lineno, "error": message})
        if progress is not None:
            progress.failed += 1
            progress.note(f"kvx: line {lineno}: {message}")
        elif not quiet:
            print(f"kvx: line {lineno}: {message}", file=sys.stderr)

    def take(lineno: int, line) -> None:
        """Submit one input line, or write why it cannot run."""
        if isinstance(line, KvxError):  # not UTF-8, or nested too deep: this line alone fails
            fail(lineno, None, str(line))
            return
        if not line.strip():
            writer.skip(lineno)
            return
        rid = None
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KvxError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
            rid = obj.get("id") if isinstance(obj, dict) else None
            request, questions = parse_line(obj, engine, tok, params, max_tokens, raw, system, defaults, contexts)
            live[batch.submit(request)] = (lineno, rid, questions)
        except KvxError as exc:
            fail(lineno, rid, str(exc))

    def finish(seq) -> None:
        lineno, rid, questions = live.pop(seq)
        if seq.error is not None:
            fail(lineno, rid, seq.error)
            return
        if questions is not None:
            writer.put(lineno, {"id": rid, "line": lineno, "results": [
                result_json(r, question=q) for r, q in zip(seq.results, questions)]})
        else:
            writer.put(lineno, {"id": rid, "line": lineno, **result_json(seq.results[0])})
        if progress is not None:
            progress.written += 1

    exhausted = False
    with progress or nullcontext():
        while True:
            # Read while the queue is short, so a long input streams through instead of being held at once.
            while not exhausted and len(batch.scheduler.waiting) < batch.scheduler.max_batch:
                item = next(lines, None)
                if item is None:
                    exhausted = True
                    break
                take(*item)
            if not batch.has_work:
                if exhausted:
                    break
                continue
            for seq in batch.step():
                finish(seq)
            if progress is not None:
                progress.update(batch.stats())
    writer.close()
    return failures


class _Writer:
    """Writes results as they finish, or (ordered) holds each until every earlier line is written."""

    def __init__(self, out: TextIO, ordered: bool):
        self.out = out
        self.ordered = ordered
        self.held: dict[int, dict | None] = {}
        self.next_line = 1

    def put(self, lineno: int, obj: dict) -> None:
        if not self.ordered:
            self._write(obj)
            return
        self.held[lineno] = obj
        self._drain()

    def skip(self, lineno: int) -> None:
        """A blank line: nothing to write, but ordered output must not wait for it."""
        if self.ordered:
            self.held[lineno] = None
            self._drain()

    def _drain(self) -> None:
        while self.next_line in self.held:
            obj = self.held.pop(self.next_line)
            if obj is not None:
                self._write(obj)
            self.next_line += 1

    def _write(self, obj: dict) -> None:
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()

    def close(self) -> None:
        for lineno in sorted(self.held):
            if self.held[lineno] is not None:
                self._write(self.held[lineno])
        self.held.clear()
