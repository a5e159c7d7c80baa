"""The chat API: OpenAI-compatible chat completions over server-held sessions, plus inspection and admin.

A session's history (messages and the exact token ids the engine saw and produced) lives in the store; a
turn sends only the new messages, and the server appends their tokens to the stored ids, so SGLang's radix
cache serves every earlier turn's KV (``usage.prompt_tokens_details.cached_tokens``). How a turn runs and
commits is in ``turns``; how bodies are read in ``bodies``; how errors look in ``errors``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .bodies import BodyLimit, read_model
from .engine import EngineClient
from .errors import ApiError, install_error_handlers
from .metrics import Metrics
from .schemas import ChatRequest, OffloadSettings, is_session_id, new_session_id
from .settings import Settings
from .store import Session, SessionStore
from .turns import KeyLimiter, Turn, TurnContext, idempotency_digest, kv_location

__all__ = ["Settings", "create_app", "kv_location"]  # kv_location: the offload tests read turn records with it


def create_app(client: EngineClient, store: SessionStore, settings: Settings) -> FastAPI:
    app = FastAPI(title="slkv chat API", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # a 307 to another path is no answer for an API client
    app.add_middleware(BodyLimit)
    metrics = Metrics()
    install_error_handlers(app, metrics)
    keys = settings.keys
    turns = TurnContext(client, store, settings, metrics, KeyLimiter(settings.max_turns_per_key))

    async def owned_session(sid: str, who: str) -> Session:
        session = await store.get(sid) if is_session_id(sid) else None  # other ids never reach the store
        if session is None or session.owner != who:  # another key's session looks like no session
            raise ApiError(404, "session_not_found", "no such session")
        return session

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok = await store.ping()
        return JSONResponse({"engine": True, "store": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        if settings.metrics_need_admin:
            keys.admin(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        keys.user(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "slkv"}]}

    @app.post("/v1/sessions")
    async def open_session(request: Request) -> JSONResponse:
        session = Session(id=new_session_id(), owner=keys.user(request), created=time.time())
        await store.create(session)
        metrics.sessions.inc()
        return JSONResponse({"id": session.id, "object": "session", "created": int(session.created)}, status_code=201)

    @app.delete("/v1/sessions/{sid}")
    async def close_session(sid: str, request: Request) -> dict[str, Any]:
        who = keys.user(request)
        outcome = await store.close(sid, who) if is_session_id(sid) else "missing"
        if outcome == "missing":
            raise ApiError(404, "session_not_found", "no such session")
        if outcome == "closed":
            raise ApiError(410, "session_closed", f"session {sid} is already closed")
        metrics.sessions.dec()
        return {"id": sid, "object": "session", "deleted": True}

    @app.get("/v1/sessions/{sid}")
    async def inspect(sid: str, request: Request) -> dict[str, Any]:
        session = await owned_session(sid, keys.user(request))
        return {"id": sid, "status": session.status, "turns": await store.turns(sid), "worker": session.worker,
                "prompt_tokens": session.prompt_tokens, "completion_tokens": session.completion_tokens,
                "cached_tokens": session.cached_tokens}

    @app.get("/v1/sessions/{sid}/layers.png")
    async def layers_png(sid: str, request: Request) -> Response:
        await owned_session(sid, keys.user(request))
        from .plots import layer_map_png

        return Response(layer_map_png(await store.turns(sid)), media_type="image/png")

    @app.get("/admin/offload")
    async def get_offload(request: Request) -> dict[str, Any]:
        keys.admin(request)
        return settings.offload()

    @app.put("/admin/offload")
    async def put_offload(request: Request) -> dict[str, Any]:
        """The threshold is this server's; the host budget is the engine's, sent through its admin channel."""
        keys.admin(request)
        new = (await read_model(request, OffloadSettings)).model_dump(exclude_unset=True)
        if "budget_bytes" in new:
            if not await client.set_host_budget(new["budget_bytes"]):
                raise ApiError(409, "offload_unavailable", "the engine refused the host budget: it has no host tier "
                                                           "(an engine started without --slkv-offload)",
                               param="budget_bytes")
            settings.host_budget = new["budget_bytes"]
        if "threshold" in new:
            settings.threshold = settings.initial_threshold if new["threshold"] is None else new["threshold"]
        return settings.offload()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        who = keys.user(request)
        req = await read_model(request, ChatRequest)
        refusal = req.refusal()
        if refusal is not None:
            raise refusal
        turn = Turn(turns, who, req, req.slkv_overrides(settings.layers), idempotency_digest(request))
        first = await turn.next()
        if first.error is not None:
            return first.error.response()
        headers = {"Idempotent-Replayed": "true"} if first.replayed else None
        if req.stream:
            return StreamingResponse(turn.stream(first), media_type="text/event-stream", headers=headers)
        return JSONResponse(first.completion, headers=headers)  # not streaming: the first event ends the turn

    return app
