"""The FastAPI app: OpenAI's endpoints over the engine, /health, /metrics.

FastAPI (on Starlette, served by uvicorn) is the stack vLLM and exo serve OpenAI's API
with: pydantic validates bodies against schemas.py before a handler runs, Starlette's
StreamingResponse carries Server-Sent Events and cancels a stream whose client left."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..settings import ServerSettings
from . import errors, openapi
from .guards import ApiKeyMiddleware, BodyLimitMiddleware
from .completions import complete
from .metrics import ServerMetrics
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .state import Backend


def create_app(backend: Backend, settings: ServerSettings, metrics: ServerMetrics | None = None) -> FastAPI:
    """The app for `backend` (its Engine attached once every rank has loaded)."""
    metrics = metrics or ServerMetrics(backend)
    app = FastAPI(title="mlx-kvshard", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    errors.install(app)
    openapi.install(app, backend, settings.model_id)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.api_key:  # added last: the outermost, so nothing about a request is read before its key
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.state.backend, app.state.metrics = backend, metrics
    model_id = settings.model_id

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await complete(request, body, backend, metrics, model_id, settings.default_max_tokens)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await complete(request, body, backend, metrics, model_id, settings.default_max_tokens)

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=model_id, created=backend.started)]).model_dump()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            raise errors.ApiError(404, f"The model `{name}` does not exist; this server serves `{model_id}`",
                                  param="model", code="model_not_found")
        return ModelCard(id=model_id, created=backend.started).model_dump()

    @app.get("/health")
    async def health():
        return JSONResponse(health_body(backend, model_id), status_code=200 if backend.ready else 503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def health_body(backend: Backend, model_id: str) -> dict:
    body = {"status": "ok" if backend.ready else backend.state, "model": model_id, "world": backend.world}
    if not backend.ready:
        body["reason"] = backend.reason
    if backend.engine is not None:
        info = backend.engine.info()
        body.update(max_context=info["max_context"], max_batch=info["max_batch"], dtype=info["dtype"],
                    kv_capacity_tokens=info["kv_capacity_tokens"],
                    ranks=[{"rank": r["rank"], "kv_tokens": r["kv_tokens"]} for r in info["ranks"]])
    return body
