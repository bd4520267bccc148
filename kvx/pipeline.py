"""`kvx generate --jsonl`: one request object per stdin line, one result object per stdout line.

Request fields: "prompt" (question-aware), or "context" with "question" or "questions" (question-agnostic);
optional "id", "system", "max_tokens", "temperature", "top_p", "top_k", "seed", "raw". A line that cannot be
run gets {"id": ..., "line": N, "error": "..."} and the next line still runs. The model loads once.
"""

from __future__ import annotations

import json
import sys
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


def _run_one(obj: dict, engine, tok, params, max_tokens: int, raw: bool, system) -> dict:
    from kvx.inputs import check_utf8
    from kvx.options import check_memory, check_sampling, encode_prompt, split_context_question
    from kvx.result_view import result_json

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
        check_memory(engine, len(ids[0][0]), n, question_tokens=max(len(q) for _, q in ids))
        results = engine.generate_agnostic(ids[0][0], [q for _, q in ids], params, n)
        return {"results": [result_json(r, question=q) for r, q in zip(results, questions)]}
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise KvxError("field 'prompt' must be a non-empty string (or give 'context' and 'question')")
    ids = encode_prompt(tok, prompt, system, raw)
    engine.check_length(len(ids))
    check_memory(engine, len(ids), n)
    return result_json(engine.generate(ids, params, n))


def run_jsonl(inp: TextIO, out: TextIO, *, model, device, dtype, policy, budget, allocation, policy_args,
              params, max_tokens, raw, system, quiet, use_graphs=True, prefill_chunk=None) -> int:
    """Process every line; returns the number of lines that failed."""
    from kvx.options import build_engine, load

    llm, tok = load(model, device, dtype, quiet=quiet)
    engine = build_engine(llm, tok, policy, budget, allocation, policy_args, use_graphs=use_graphs,
                          prefill_chunk=prefill_chunk)
    failures = 0
    for lineno, line in enumerate(inp, start=1):
        if not line.strip():
            continue
        rid = None
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KvxError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
            rid = obj.get("id") if isinstance(obj, dict) else None
            result = _run_one(obj, engine, tok, params, max_tokens, raw, system)
            result = {"id": rid, "line": lineno, **result}
        except KvxError as exc:
            failures += 1
            result = {"id": rid, "line": lineno, "error": str(exc)}
            if not quiet:
                print(f"kvx: line {lineno}: {exc}", file=sys.stderr)
        out.write(json.dumps(result) + "\n")
        out.flush()
    return failures
