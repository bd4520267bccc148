"""Reading a request body: JSON whatever the Content-Type says (curl -d sends a form type), validated
against the endpoint's schema; every failure is a 400 in the API's shape."""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import ValidationError

from kvx.serve.errors import bad_request, validation_error


async def read_body(request: Request, schema):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise bad_request(f"the request body is not valid JSON ({reason})" if raw.strip() else
                          "the request needs a JSON object body", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False)) from None
