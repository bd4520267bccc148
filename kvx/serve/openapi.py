"""Request bodies in the OpenAPI schema.

The routes read their bodies themselves (body.py: JSON whatever the Content-Type, errors in the API's
shape), so FastAPI cannot see their types; each route declares its body schema here instead, so
/openapi.json describes what the server takes: for clients generated from it, and for the property-based
fuzz test that builds requests from it.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

_REF = "#/components/schemas/{model}"


def body(model: type[BaseModel]) -> dict:
    """The `openapi_extra` of a route whose JSON body is `model`."""
    schema = model.model_json_schema(ref_template=_REF)
    schema.pop("$defs", None)  # hoisted into components by install()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put the body models (and the models they refer to) into the schema's components."""
    default = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = default()
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                full = model.model_json_schema(ref_template=_REF)
                schemas.update(full.pop("$defs", {}))
                schemas.setdefault(model.__name__, full)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
