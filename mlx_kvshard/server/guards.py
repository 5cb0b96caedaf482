"""What runs before any route, as pure ASGI middlewares (so they cover every path, unknown
ones included, before a body is read):
- --api-key: every endpoint but /health requires `Authorization: Bearer <key>` (what the
  `openai` client sends for its api_key);
- --max-body-bytes: a larger request body is refused with 413."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .errors import error_body

OPEN_PATHS = ("/health",)


class ApiKeyMiddleware:
    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = ("missing API key: send `Authorization: Bearer <key>`" if not given
                   else "invalid API key")
        response = JSONResponse(error_body(401, message, code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """Starlette has a body limit (FastAPI's `max_body_size`), but for a declared length past
    it it replaces whatever the app answers with a plain-text 413; clients expect OpenAI's
    error object, so: a declared length is refused before the body is read, and a chunked
    body's bytes are counted (the HTTPException reaches errors.py's handler)."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max:
            response = JSONResponse(error_body(413, f"the request body is {int(declared)} bytes, over this "
                                                    f"server's limit of {self.max} (--max-body-bytes)",
                                               code="request_too_large"), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max:
                raise HTTPException(413)
            return message

        return await self.app(scope, counted, send)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
