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


def _run_one(obj: dict, engine, tok, params, max_tokens: int, raw: bool, system) -> dict:
    from kvx.options import encode_prompt, split_context_question

    if not isinstance(obj, dict):
        raise KvxError("each line must be a JSON object")
    for key, cast in _SAMPLING_FIELDS.items():
        if key in obj:
            try:
                params = replace(params, **{key: cast(obj[key])})
            except (TypeError, ValueError):
                raise KvxError(f"field {key!r} must be a number") from None
    n = obj.get("max_tokens", max_tokens)
    if not isinstance(n, int) or n < 0:
        raise KvxError("field 'max_tokens' must be a non-negative integer")
    raw = bool(obj.get("raw", raw))
    system = obj.get("system", system)
    if "context" in obj:
        questions = obj.get("questions", [obj["question"]] if "question" in obj else None)
        if not questions or not all(isinstance(q, str) for q in questions):
            raise KvxError("a 'context' request needs 'question' (a string) or 'questions' (a list of strings)")
        if not isinstance(obj["context"], str) or not obj["context"].strip():
            raise KvxError("field 'context' must be a non-empty string")
        ids = [split_context_question(tok, obj["context"], q, system, raw) for q in questions]
        results = engine.generate_agnostic(ids[0][0], [q for _, q in ids], params, n)
        return {"results": [dict(r.to_dict(), question=q) for r, q in zip(results, questions)]}
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise KvxError("field 'prompt' must be a non-empty string (or give 'context' and 'question')")
    return engine.generate(encode_prompt(tok, prompt, system, raw), params, n).to_dict()


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
