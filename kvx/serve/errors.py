"""Errors in the OpenAI API's own shape: {"error": {"message", "type", "param", "code"}}.

Every failure a client can cause answers with this body and a 4xx status. The handlers installed here give
FastAPI's own errors (validation, malformed JSON, unknown routes, wrong methods) the same shape, and turn
anything unexpected into a 500 of that shape: no request reaches the client as a traceback or stops the
server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("kvx.serve")

INVALID = "invalid_request_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = INVALID, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str = INVALID, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# Pydantic names the member of a union that failed inside `loc` ("stop", "str"): not a field.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _field_path(loc) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content' (the API's `param`)."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "-" in part:
            break
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(errors: list[dict]) -> ApiError:
    """Pydantic's first complaint as a 400 naming the field."""
    if not errors:
        return bad_request("the request body is invalid")
    first = errors[0]
    path = _field_path(first.get("loc", ()))
    if not path:
        return bad_request("the request body must be a JSON object")
    return bad_request(f"{path}: {first.get('msg', 'invalid value')}", param=path)


def install_handlers(app: FastAPI, on_error: Callable[[int], None] | None = None) -> None:
    """Every error answer in the API's shape; `on_error(status)` counts each one (429s are counted where
    the queue refuses them)."""

    def answer(err: ApiError):
        if on_error is not None and err.status != 429:
            on_error(err.status)
        return err.response()

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return answer(validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else INVALID
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return answer(ApiError(exc.status_code, message, type=kind, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return answer(ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error"))
