"""Every failure as OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`,
so clients (the `openai` package raises BadRequestError, NotFoundError, RateLimitError...)
show the message. Validation errors name the field in `param` and in the message."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .schemas import KINDS, ErrorBody, ErrorResponse

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable"}

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}  # the metrics' endpoint label


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorBody(message=message, type=TYPES.get(status, "invalid_request_error"),
                                         param=param, code=code)).model_dump()


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=e.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None and request.url.path in ENDPOINTS:
            metrics.refused(ENDPOINTS[request.url.path], "invalid")
        return error_response(validation_error(e.errors()))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):  # a bug handling this request: it fails alone, as JSON
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}",
                    413: "the request body is too large (the server's --max-body-bytes limit)"}
        return error_response(ApiError(e.status_code, messages.get(e.status_code, str(e.detail)),
                                       code="request_too_large" if e.status_code == 413 else None,
                                       headers=getattr(e, "headers", None)))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def validation_error(errors: list[dict]) -> ApiError:
    """The first problem pydantic found, as a 400 naming the field (e.g. `messages.0.role`)."""
    err = errors[0]
    loc = list(err.get("loc", ()))[1:] if err.get("loc", ("",))[0] == "body" else list(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        why = (err.get("ctx") or {}).get("error", "JSON decode error")
        return ApiError(400, f"the request body is not valid JSON ({why} at position {loc[0] if loc else '?'})",
                        code="invalid_json")
    if not loc:  # the body is missing or not a JSON object
        return ApiError(400, f"the request body must be a JSON object ({err.get('msg')})")
    path = [str(p) for p in loc]
    tagged = next((i for i, p in enumerate(path) if p in _TYPE_TAGS or "[" in p or p.startswith("constrained-")),
                  None)
    if tagged is not None:  # a union's member name (pydantic lists each member): say what the field takes
        field = path[:tagged]
        param = ".".join(field)
        near = _near_miss(errors, loc[:tagged])
        if near is not None:  # the right kind of value, out of bounds (an empty prompt, two prompts)
            return ApiError(400, f"{param}: {near['msg'].lower()} (got {_short(near.get('input'))})", param=param)
        return ApiError(400, f"{param}: must be {KINDS.get(field[-1], 'of another type')}", param=param)
    param = ".".join(path)
    value = "" if err.get("type") == "missing" else f" (got {_short(err.get('input'))})"
    message = "is required" if err.get("type") == "missing" else err.get("msg", "invalid").lower()
    return ApiError(400, f"{param}: {message}{value}", param=param)


def _near_miss(errors: list[dict], field: list) -> dict | None:
    """Of a union field's member errors, one where the value had the member's type but broke
    its bounds (too short, too long, too small), if any."""
    for err in errors:
        loc = list(err.get("loc", ()))
        loc = loc[1:] if loc and loc[0] == "body" else loc
        kind = err.get("type", "")
        if loc[:len(field)] == field and not kind.endswith("_type") and kind not in ("literal_error", "missing"):
            return err
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
