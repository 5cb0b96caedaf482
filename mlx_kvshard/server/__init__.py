"""`mlx-kvshard serve`: OpenAI's HTTP API on the serving engine, on rank 0.

  app.py          the FastAPI app: routes for /v1/chat/completions, /v1/completions,
                  /v1/models, /health, /metrics
  schemas.py      OpenAI's request/response shapes (pydantic): validation before any rank
  completions.py  one request through the engine: JSON or Server-Sent Events, cancel on disconnect
  errors.py       every failure as OpenAI's error object naming the field
  guards.py       --api-key (Bearer) and the body-size limit, as ASGI middlewares
  metrics.py      Prometheus text (prometheus_client): HTTP-side counters, the engine's gauges
  state.py        the engine once loaded, health, open responses
  run.py          rank 0: uvicorn on a thread, the engine on the main thread, signals, a lost rank
"""
