"""The chat API: OpenAI-compatible chat completions over server-held sessions, plus inspection and admin.

A session's history (messages and the exact token ids the engine saw and produced) lives in the store; a
turn sends only the new messages, and the server appends their tokens to the stored ids, so SGLang's radix
cache serves every earlier turn's KV (``usage.prompt_tokens_details.cached_tokens``).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from slkv_sglang.layer_map import layer_map_record

from .metrics import Metrics
from .store import Session, SessionStore, StoreUnavailable

MAX_BODY_BYTES = 1 << 20
ROUTING_HEADER = "X-SMG-Routing-Key"
TURN_LOCK_SECONDS = 120


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message = status, code, message


class EngineUnavailable(RuntimeError):
    """The remote SGLang worker or router failed the turn; the API answers 502 and keeps the session as it was."""


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model: str = "default"
    messages: list[Message] = Field(min_length=1)
    session_id: str | None = None
    stream: bool = False
    max_tokens: int = Field(default=128, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    stream_options: dict[str, Any] | None = None


class OffloadSettings(BaseModel):
    budget_bytes: int | None = Field(default=None, ge=0)
    threshold: float | None = Field(default=None, gt=0.0)


@dataclass
class Settings:
    api_keys: frozenset[str] = frozenset()  # empty: no authentication (local quick start)
    model_name: str = "SmolLM2-135M-Instruct"
    threshold: float = 0.9
    offload_budget_bytes: int | None = None  # None: the engine's own --slkv-offload-budget
    worker: str = "local"
    kv_bytes_per_token_layer: int = 0  # 2 (K, V) x kv heads x head dim x dtype bytes
    extra: dict[str, Any] = field(default_factory=dict)


class EngineClient:
    """The in-process ``sglang.Engine`` plus what the API needs from its tokenizer."""

    def __init__(self, engine: Any, tokenizer: Any, context_len: int):
        self.engine, self.tokenizer, self.context_len = engine, tokenizer, context_len

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def generate(self, ids: list[int], params: dict[str, Any], stream: bool,
                       routing_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """One generation; ``routing_key`` (the session id) pins a session to one worker behind a router."""
        result = await self.engine.async_generate(input_ids=ids, sampling_params=params, stream=stream)
        if stream:
            async for chunk in result:
                yield chunk
        else:
            yield result


class RemoteEngineClient(EngineClient):
    """A separate ``sglang.launch_server`` (with the plugin) reached over its native ``/generate`` API."""

    def __init__(self, url: str, tokenizer: Any, context_len: int):
        super().__init__(None, tokenizer, context_len)
        self.url = url.rstrip("/")

    async def generate(self, ids: list[int], params: dict[str, Any], stream: bool,
                       routing_key: str | None = None) -> AsyncIterator[dict[str, Any]]:
        import httpx

        body = {"input_ids": ids, "sampling_params": params, "stream": stream}
        # sglang-router's `manual` policy pins each X-SMG-Routing-Key value to one worker (docs/operations.md).
        headers = {ROUTING_HEADER: routing_key} if routing_key else {}
        try:
            async with httpx.AsyncClient(timeout=None, headers=headers) as http:
                if not stream:
                    r = await http.post(f"{self.url}/generate", json=body)
                    r.raise_for_status()
                    yield r.json()
                    return
                async with http.stream("POST", f"{self.url}/generate", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and line[5:].strip() != "[DONE]":
                            yield json.loads(line[5:])
        except httpx.HTTPError as exc:  # nothing is committed: the client may retry the turn
            raise EngineUnavailable(f"engine at {self.url} failed: {exc!r}") from exc


def turn_ids(client: EngineClient, session: Session, new: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation with ``new`` appended, reusing the stored ids token for token."""
    history = session.history
    messages = history["messages"] + new
    full = client.render(messages, generation_prompt=True)
    if not history["ids"]:
        return client.encode(full)
    before_reply = client.render(history["messages"][:-1], generation_prompt=True) + history["messages"][-1]["content"]
    suffix = full[len(before_reply):]
    if history.get("ended_with_eos") and suffix.startswith(history["eos_text"]):
        suffix = suffix[len(history["eos_text"]):]
    return history["ids"] + client.encode(suffix)


def create_app(client: EngineClient, store: SessionStore, settings: Settings) -> FastAPI:
    app = FastAPI(title="slkv chat API")
    metrics = Metrics()
    eos_id = client.tokenizer.eos_token_id
    eos_text = client.tokenizer.decode([eos_id]) if eos_id is not None else ""

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_req: Request, exc: StoreUnavailable) -> JSONResponse:
        metrics.redis_errors.inc()
        return JSONResponse({"error": {"code": "store_unavailable", "message": str(exc)}}, status_code=503)

    @app.exception_handler(EngineUnavailable)
    async def _engine_down(_req: Request, exc: EngineUnavailable) -> JSONResponse:
        metrics.engine_errors.inc()
        return JSONResponse({"error": {"code": "engine_unavailable", "message": str(exc)}}, status_code=502)

    @app.middleware("http")
    async def _limit_size(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and int(length) > MAX_BODY_BYTES:
            return JSONResponse({"error": {"code": "too_large", "message": f"body over {MAX_BODY_BYTES} bytes"}},
                                status_code=413)
        return await call_next(request)

    def owner(request: Request) -> str:
        if not settings.api_keys:
            return "anonymous"
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else ""
        if key not in settings.api_keys:
            raise ApiError(401, "unauthorized", "missing or unknown API key")
        return key

    async def owned_session(sid: str, who: str) -> Session:
        session = await store.get(sid)
        if session is None or session.owner != who:  # another key's session looks like no session
            raise ApiError(404, "session_not_found", f"no session {sid!r}")
        return session

    async def body(request: Request, model: type[BaseModel]) -> Any:
        try:
            return model.model_validate(json.loads(await request.body() or b"{}"))
        except json.JSONDecodeError as exc:
            raise ApiError(400, "invalid_json", f"body is not JSON: {exc}") from None
        except ValidationError as exc:
            raise ApiError(400, "invalid_request", "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())) from None

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok = await store.ping()
        return JSONResponse({"engine": True, "store": ok}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        owner(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "slkv"}]}

    @app.post("/v1/sessions")
    async def open_session(request: Request) -> JSONResponse:
        who = owner(request)
        session = Session(id=f"sess_{secrets.token_urlsafe(24)}", owner=who, created=time.time())
        await store.create(session)
        metrics.sessions.inc()
        return JSONResponse({"id": session.id, "object": "session", "created": int(session.created)}, status_code=201)

    @app.delete("/v1/sessions/{sid}")
    async def close_session(sid: str, request: Request) -> dict[str, Any]:
        session = await owned_session(sid, owner(request))
        if session.status == "closed":
            raise ApiError(410, "session_closed", f"session {sid!r} is already closed")
        await store.close(session)
        metrics.sessions.dec()
        return {"id": sid, "object": "session", "deleted": True}

    @app.get("/v1/sessions/{sid}")
    async def inspect(sid: str, request: Request) -> dict[str, Any]:
        session = await owned_session(sid, owner(request))
        return {"id": sid, "status": session.status, "turns": await store.turns(sid), "worker": session.worker,
                "prompt_tokens": session.prompt_tokens, "completion_tokens": session.completion_tokens,
                "cached_tokens": session.cached_tokens}

    @app.get("/v1/sessions/{sid}/layers.png")
    async def layers_png(sid: str, request: Request) -> Response:
        await owned_session(sid, owner(request))
        from .plots import layer_map_png

        return Response(layer_map_png(await store.turns(sid)), media_type="image/png")

    @app.get("/admin/offload")
    async def get_offload(request: Request) -> dict[str, Any]:
        owner(request)
        return {"budget_bytes": settings.offload_budget_bytes, "threshold": settings.threshold}

    @app.put("/admin/offload")
    async def put_offload(request: Request) -> dict[str, Any]:
        owner(request)
        new = await body(request, OffloadSettings)
        if new.budget_bytes is not None:
            settings.offload_budget_bytes = new.budget_bytes
        if new.threshold is not None:
            settings.threshold = new.threshold
        return {"budget_bytes": settings.offload_budget_bytes, "threshold": settings.threshold}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        who = owner(request)
        req = await body(request, ChatRequest)
        new = [m.model_dump() for m in req.messages]
        session: Session | None = None
        if req.session_id is not None:
            session = await owned_session(req.session_id, who)
            if session.status == "closed":
                raise ApiError(410, "session_closed", f"session {req.session_id!r} is closed")
            if not await store.lock(session.id, TURN_LOCK_SECONDS):
                raise ApiError(409, "turn_in_progress", "this session is already running a turn; retry when it ends")
        streaming = False  # once the stream owns the turn, it releases the lock
        try:
            ids = turn_ids(client, session, new) if session else client.encode(client.render(new, True))
            if len(ids) + req.max_tokens > client.context_len:
                raise ApiError(400, "context_length_exceeded",
                               f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                               f"length {client.context_len}")
            slkv: dict[str, Any] = {"threshold": settings.threshold}
            if session is not None:
                slkv["session"] = session.id  # the engine keys this session's offloaded KV by it
            if settings.offload_budget_bytes is not None:
                slkv["offload_budget"] = settings.offload_budget_bytes
            params = {"max_new_tokens": req.max_tokens, "temperature": req.temperature,
                      "custom_params": {"slkv": slkv}}
            cid = f"chatcmpl-{secrets.token_hex(12)}"
            key = session.id if session else None
            if req.stream:
                gen = client.generate(ids, params, stream=True, routing_key=key)
                first = await gen.__anext__()  # errors before the first byte still become HTTP errors
                streaming = True
                return StreamingResponse(_stream(req, cid, ids, first, gen, session, new), media_type="text/event-stream")
            out = await client.generate(ids, params, stream=False, routing_key=key).__anext__()
            await _commit(session, new, ids, out)
            return JSONResponse(_completion(req, cid, out))
        finally:
            if session is not None and not streaming:
                await store.unlock(session.id)

    async def _stream(req: ChatRequest, cid: str, ids: list[int], first: dict[str, Any], gen: AsyncIterator,
                      session: Session | None, new: list[dict[str, str]]) -> AsyncIterator[bytes]:
        sent, out = "", first
        try:
            chunk: dict[str, Any] | None = first
            while chunk is not None:
                out = chunk
                delta, sent = out["text"][len(sent):], out["text"]
                if delta:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "model": req.model, "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": delta}, "finish_reason": None}]})
                chunk = await anext(gen, None)
            await _commit(session, new, ids, out)
            final = {"id": cid, "object": "chat.completion.chunk", "model": req.model,
                     "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(out)}]}
            if (req.stream_options or {}).get("include_usage"):
                final["usage"] = _usage(out)
            yield _sse(final)
            yield b"data: [DONE]\n\n"
        except StoreUnavailable as exc:
            metrics.redis_errors.inc()
            yield _sse({"error": {"code": "store_unavailable", "message": str(exc)}})
        except EngineUnavailable as exc:  # mid-stream: nothing was committed, the turn can be retried
            metrics.engine_errors.inc()
            yield _sse({"error": {"code": "engine_unavailable", "message": str(exc)}})
        finally:
            if session is not None:
                try:
                    await store.unlock(session.id)
                except StoreUnavailable:
                    metrics.redis_errors.inc()

    async def _commit(session: Session | None, new: list[dict[str, str]], ids: list[int], out: dict[str, Any]) -> None:
        meta = out["meta_info"]
        layer_map = layer_map_record(meta)
        metrics.observe_turn(meta, layer_map, settings.kv_bytes_per_token_layer)
        if session is None:
            return
        output_ids = list(out.get("output_ids") or [])
        worker = (layer_map or {}).get("worker") or settings.worker
        # A turn served by another worker than the last one found none of the session's KV there and
        # recomputed the history in its prefill: correct, slower, and counted.
        switched = session.turns > 0 and session.worker != worker
        if switched:
            metrics.worker_switches.inc()
        session.worker = worker
        session.history = {
            "messages": session.history["messages"] + new + [{"role": "assistant", "content": out["text"]}],
            "ids": ids + output_ids,
            "ended_with_eos": bool(output_ids) and output_ids[-1] == eos_id,
            "eos_text": eos_text,
        }
        session.turns += 1
        session.prompt_tokens += meta["prompt_tokens"]
        session.completion_tokens += meta["completion_tokens"]
        session.cached_tokens += meta.get("cached_tokens", 0)
        num_layers = len(layer_map["lazy"]) if layer_map else 0
        record = {
            "turn": session.turns, "prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
            "cached_tokens": meta.get("cached_tokens", 0), "worker": worker, "worker_switched": switched,
            "layer_map": layer_map,
            "kv_location": kv_location(layer_map, num_layers),
            "host_bytes": (layer_map or {}).get("kv", {}).get("session_host_bytes", 0),
            "device_kv_bytes": Metrics.device_bytes(layer_map, len(ids) + len(output_ids), settings.kv_bytes_per_token_layer),
        }
        await store.commit_turn(session, record)

    return app


def kv_location(layer_map: dict[str, Any] | None, num_layers: int) -> list[str]:
    """Per layer, where the middle tokens' KV is (--slkv-offload): "device" (all of it), "host" (offloaded),
    or "recompute" (freed without a host copy: the next turn recomputes it)."""
    kv = (layer_map or {}).get("kv")
    if kv is None:
        return ["device"] * num_layers
    return ["device" if n >= layer_map["decided_at"] else "host" if held else "recompute"
            for n, held in zip(kv["device_tokens"], kv["host_tokens"])]


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def _finish(out: dict[str, Any]) -> str:
    reason = (out["meta_info"].get("finish_reason") or {}).get("type", "stop")
    return "length" if reason == "length" else "stop"


def _usage(out: dict[str, Any]) -> dict[str, Any]:
    meta = out["meta_info"]
    return {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
            "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": meta.get("cached_tokens", 0)}}


def _completion(req: ChatRequest, cid: str, out: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]}, "finish_reason": _finish(out)}],
        "usage": _usage(out), "session_id": req.session_id, "slkv": layer_map_record(out["meta_info"]),
    }
