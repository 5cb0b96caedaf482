"""/openapi.json: FastAPI's own schema of the request and response models (schemas.py),
plus what only the loaded model bounds: the model id requests may name, top_k below the
vocabulary, token-id prompts inside the vocabulary and shorter than the context. Built once
the ranks have loaded (before that, the schema without those bounds, not cached)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .schemas import ErrorResponse
from .state import Backend

REQUESTS = ("ChatCompletionRequest", "CompletionRequest")


def install(app: FastAPI, backend: Backend, model_id: str) -> None:
    def schema() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        errors_as_sent(doc)
        if backend.engine is None:
            return doc
        bound(doc, model_id, backend.engine.loaded.cfg.vocab_size, backend.engine.max_context)
        app.openapi_schema = doc
        return doc

    app.openapi = schema


def errors_as_sent(doc: dict) -> None:
    """FastAPI lists a 422 with its own error shape for every route with a body; this server
    answers invalid input with a 400 and OpenAI's error object (errors.py)."""
    doc["components"]["schemas"]["ErrorResponse"] = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}")
    doc["components"]["schemas"].update(ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}").pop("$defs", {}))
    doc["components"]["schemas"]["ErrorResponse"].pop("$defs", None)
    for path in doc["paths"].values():
        for op in path.values():
            if op.get("responses", {}).pop("422", None) is not None:
                op["responses"]["400"] = {"description": "Invalid request (OpenAI's error object, naming the field)",
                                          "content": {"application/json": {
                                              "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for name in ("HTTPValidationError", "ValidationError"):
        doc["components"]["schemas"].pop(name, None)


def bound(doc: dict, model_id: str, vocab_size: int, max_context: int) -> None:
    models = doc["components"]["schemas"]
    for name in REQUESTS:
        props = models[name]["properties"]
        _member(props["model"], "string")["enum"] = [model_id]
        _member(props["top_k"], "integer")["maximum"] = vocab_size - 1
    for member in models["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        if member.get("type") == "array" and member["items"].get("type") == "integer":
            member["items"]["maximum"] = vocab_size - 1
            member["maxItems"] = max_context - 1  # a token of room to generate


def _member(prop: dict, kind: str) -> dict:
    """The member of an optional field's anyOf that holds `kind` values (or the field itself)."""
    return next((m for m in prop.get("anyOf", []) if m.get("type") == kind), prop)
