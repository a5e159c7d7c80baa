"""Every answer that is not a success is JSON ``{"error": {"code", "message", "type", ...}}``.

The handlers here cover what the routes raise and what happens around them (unknown routes and methods,
store and engine failures, bugs), so no client ever sees a plain-text error or Starlette's ``{"detail"}``.
Messages are built from our own words and clipped fragments of input, never from unbounded input.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .metrics import Metrics
from .store import StoreUnavailable

logger = logging.getLogger("slkv.api")

_HTTP_ERRORS = {404: ("not_found", "no route {path}"), 405: ("method_not_allowed", "{method} is not allowed on {path}")}


class ApiError(Exception):
    """An answer other than success; ``extra`` fields go into the error object (e.g. ``committed``)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"code": self.code, "message": self.message, "type": kind, **self.extra}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class EngineUnavailable(RuntimeError):
    """The engine (remote worker, router, or the in-process engine aborting) failed the turn: 502, not committed."""


def clip(text: str, limit: int = 60) -> str:
    """A fragment of client input that is safe to put in a message."""
    return text if len(text) <= limit else f"{text[:limit]}…"


def store_error(exc: StoreUnavailable) -> ApiError:
    return ApiError(503, "store_unavailable", str(exc), committed=exc.committed)


def engine_error(exc: EngineUnavailable) -> ApiError:
    return ApiError(502, "engine_unavailable", str(exc), committed=False)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_req: Request, exc: StoreUnavailable) -> JSONResponse:
        metrics.redis_errors.inc()
        return store_error(exc).response()

    @app.exception_handler(HTTPException)
    async def _http(req: Request, exc: HTTPException) -> JSONResponse:
        code, message = _HTTP_ERRORS.get(exc.status_code, ("http_error", "{detail}"))
        message = message.format(path=clip(req.url.path), method=clip(req.method, 16), detail=clip(str(exc.detail)))
        return ApiError(exc.status_code, code, message).response(headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return ApiError(500, "internal_error", "internal error (logged by the server)").response()
