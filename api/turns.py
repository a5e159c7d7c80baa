"""A chat turn from claim to commit, run as its own task so that a client going away changes nothing.

A session turn claims the session (owner, status, Idempotency-Key and lock in one store script), renews its
lock while it runs, and commits with a compare-and-set on the lock's token. The HTTP response only watches the
task: a client that disconnects, streaming or not, leaves the turn to finish and commit as if it had stayed,
and its retry with the same Idempotency-Key gets the stored result. Every path that does not commit releases
the lock before it answers (or, if the store is down, leaves it to expire within LOCK_TTL_MS).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import Request

from slkv_sglang.layer_map import layer_map_record

from . import openai_format as fmt
from .engine import EngineClient, Generation
from .errors import ApiError, EngineUnavailable, clip, engine_error, store_error
from .metrics import Metrics
from .schemas import ChatRequest, is_session_id
from .settings import Settings
from .store import RENEW_SECONDS, Lease, Session, SessionStore, StoreUnavailable, TurnWrite

logger = logging.getLogger("slkv.api")

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")

_REFUSED = {  # claims that do not get the session
    "missing": (404, "session_not_found", "no such session"),
    "closed": (410, "session_closed", "the session is closed"),
    "busy": (409, "turn_in_progress", "this session is already running a turn; retry when it ends"),
}
_NOT_COMMITTED = {  # commits that did not write
    "missing": (404, "session_not_found", "the session expired during the turn; not saved"),
    "closed": (410, "session_closed", "the session was closed during the turn; not saved"),
    "lost": (503, "lock_lost", "the turn's session lock expired before the turn was saved (the store was "
                               "unreachable or slow); not saved, retry the turn"),
}


def idempotency_digest(request: Request) -> str | None:
    """The request's Idempotency-Key as it is stored (a digest: the key itself never reaches the store)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(400, "invalid_request", "Idempotency-Key must be 1 to 255 visible ASCII characters")
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def kv_location(layer_map: dict[str, Any] | None) -> list[list[str]]:
    """Per layer and KV head, where the middle tokens' KV is (--slkv-offload): "device" (all of it), "host"
    (offloaded), or "recompute" (freed without a host copy: the next turn recomputes it)."""
    if not layer_map:
        return []
    kv = layer_map.get("kv")
    if kv is None:
        heads = layer_map.get("heads") or [[lazy] for lazy in layer_map["lazy"]]
        return [["device"] * len(layer) for layer in heads]
    return [["device" if n >= layer_map["decided_at"] else "host" if held else "recompute" for n, held in zip(*pair)]
            for pair in zip(kv["device_tokens"], kv["host_tokens"])]


@dataclass
class Event:
    """What a turn tells its response: a stream delta, the finished completion, or the error that ended it."""

    kind: Literal["delta", "done", "error"]
    delta: dict[str, Any] = field(default_factory=dict)
    logprobs: list[dict[str, Any]] | None = None
    completion: dict[str, Any] | None = None
    error: ApiError | None = None
    replayed: bool = False


class KeyLimiter:
    """At most ``limit`` turns per API key at once. A turn holds its slot until it ends, not until its client
    leaves, so disconnecting and retrying cannot pile up work."""

    def __init__(self, limit: int):
        self.limit, self.running = limit, Counter[str]()

    def take(self, key: str) -> None:
        if self.running[key] >= self.limit:
            raise ApiError(429, "rate_limit_exceeded", f"this API key already runs {self.limit} turns; retry when "
                                                       "one has finished")
        self.running[key] += 1

    def give(self, key: str) -> None:
        self.running[key] -= 1
        if not self.running[key]:
            del self.running[key]


@dataclass
class TurnContext:
    """What every turn shares: engine, store, live settings and metrics."""

    client: EngineClient
    store: SessionStore
    settings: Settings
    metrics: Metrics
    limiter: KeyLimiter
    background: set[asyncio.Task] = field(default_factory=set)

    def spawn(self, coro: Any) -> asyncio.Task:
        """A task that outlives the request that started it (kept referenced until it ends)."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task


class Turn:
    """One chat request's turn: started on construction, watched through ``next()`` / ``stream()``."""

    def __init__(self, ctx: TurnContext, who: str, req: ChatRequest, slkv: dict[str, Any], replay_key: str | None):
        """``slkv``: the turn's own SimLayerKV settings (``ChatRequest.slkv_overrides``)."""
        self.ctx, self.who, self.req, self.slkv, self.replay_key = ctx, who, req, slkv, replay_key
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.head = fmt.head(req.model)
        try:
            ctx.limiter.take(who)
        except ApiError as exc:
            self._fail(exc)
            return
        ctx.spawn(self._run())

    async def next(self) -> Event:
        return await self.events.get()

    async def _run(self) -> None:
        try:
            await self._turn()
        except ApiError as exc:
            self._fail(exc)
        except StoreUnavailable as exc:
            self.ctx.metrics.redis_errors.inc()
            self._fail(store_error(exc))
        except EngineUnavailable as exc:
            self.ctx.metrics.engine_errors.inc()
            self._fail(engine_error(exc))
        except Exception:
            logger.exception("turn failed")
            self._fail(ApiError(500, "internal_error", "internal error (logged by the server); whether the turn "
                                "was saved is unknown: retry with the same Idempotency-Key", committed=None))
        finally:
            self.ctx.limiter.give(self.who)

    def _fail(self, error: ApiError) -> None:
        self.ctx.metrics.turn_failures.labels(error.code).inc()
        self.events.put_nowait(Event("error", error=error))

    async def _turn(self) -> None:
        sid = self.req.session_id
        if sid is None:
            out, done = await self._answer(None, await self.ctx.client.prompt_ids(None, self._new()))
            self._finish(out, done, None)
            return
        if not is_session_id(sid):
            raise ApiError(404, "session_not_found", "no such session")
        claim = await self.ctx.store.claim(sid, self.who, self.replay_key)
        if claim.status == "replay":
            self._replay(claim.replay or {})
            return
        if claim.status != "ok":
            raise ApiError(*_REFUSED[claim.status])
        assert claim.session is not None and claim.lease is not None
        session, lease = claim.session, claim.lease
        keeper = asyncio.create_task(self._keep(sid, lease))
        outcome = None
        try:
            ids = await self.ctx.client.prompt_ids(session, self._new())
            out, done = await self._answer(session, ids)
            write = self._write(session, ids, out, done)
            keeper.cancel()
            outcome = await self.ctx.store.commit(lease, write)
        finally:
            keeper.cancel()
            if outcome is None:  # no commit ran (or its outcome is unknown): free the session before answering
                await self._release(sid, lease)
        if outcome != "committed":
            raise ApiError(*_NOT_COMMITTED[outcome], committed=False)
        self._finish(out, done, write)

    def _new(self) -> list[dict[str, str]]:
        return [m.chat() for m in self.req.messages]

    async def _answer(self, session: Session | None, ids: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Generate the answer (streaming its deltas if asked) and format it as a completion."""
        client, req = self.ctx.client, self.req
        if len(ids) + req.new_tokens() > client.context_len:
            raise ApiError(400, "context_length_exceeded",
                           f"prompt ({len(ids)} tokens) + max_tokens ({req.new_tokens()}) exceeds the context "
                           f"length {client.context_len}")
        slkv: dict[str, Any] = {"threshold": self.ctx.settings.threshold, **self.slkv}
        if session is not None:
            slkv["session"] = session.id  # a label for the engine's reports
        params = {**req.sampling_params(), "custom_params": {"slkv": slkv}}
        top = (req.top_logprobs or 0) if req.logprobs else None
        gen = Generation(ids, params, stream=bool(req.stream), top_logprobs=top,
                         routing_key=session.id if session else None)
        out = await self._generate(gen)
        host = (layer_map_record(out["meta_info"]) or {}).get("kv")
        if host is not None:  # the engine's host tier says what its budget is
            self.ctx.settings.host_budget = host["host_budget"]
        kept = fmt.content_tokens(client, out)
        logprobs = fmt.logprob_entries(client, out["meta_info"], 0, kept) if top is not None else None
        done = fmt.completion(self.head, out["text"], fmt.finish_reason(out), fmt.usage(out), logprobs,
                              session_id=req.session_id, slkv=layer_map_record(out["meta_info"]))
        return out, done

    async def _generate(self, gen: Generation) -> dict[str, Any]:
        """The engine's final output; when streaming, each new piece of text (and its logprobs) goes out first."""
        out: dict[str, Any] = {}
        sent_text, sent_tokens = "", 0
        async for out in self.ctx.client.generate(gen):
            meta = out["meta_info"]
            reason = (meta.get("finish_reason") or {})
            if reason.get("type") == "abort":
                raise EngineUnavailable(f"the engine aborted the turn: {clip(str(reason.get('message')), 200)}")
            if not gen.stream:
                continue
            text = out["text"]
            end = fmt.content_tokens(self.ctx.client, out) if reason else len(out.get("output_ids") or [])
            logprobs = fmt.logprob_entries(self.ctx.client, meta, sent_tokens, end) if gen.top_logprobs is not None else None
            if text.startswith(sent_text) and (len(text) > len(sent_text) or logprobs):
                delta = {"content": text[len(sent_text):]}
                if not sent_text and not sent_tokens:
                    delta = {"role": "assistant", **delta}
                self.events.put_nowait(Event("delta", delta=delta, logprobs=logprobs))
                sent_text, sent_tokens = text, end
        return out

    def _write(self, session: Session, ids: list[int], out: dict[str, Any], done: dict[str, Any]) -> TurnWrite:
        """The session after this turn, its turn record, and what a retry with its Idempotency-Key gets back."""
        meta = out["meta_info"]
        layer_map = layer_map_record(meta)
        output_ids = list(out.get("output_ids") or [])
        worker = (layer_map or {}).get("worker") or self.ctx.settings.worker
        # A turn served by another worker than the last one found none of the session's KV there and
        # recomputed the history in its prefill: correct, slower, and counted.
        switched = session.turns > 0 and session.worker != worker
        eos_id = self.ctx.client.tokenizer.eos_token_id
        session.worker = worker
        session.history = {
            "messages": session.history["messages"] + self._new() + [{"role": "assistant", "content": out["text"]}],
            "ids": ids + output_ids,
            "ended_with_eos": bool(output_ids) and output_ids[-1] == eos_id,
            "eos_text": self.ctx.client.tokenizer.decode([eos_id]) if eos_id is not None else "",
        }
        session.turns += 1
        session.prompt_tokens += meta["prompt_tokens"]
        session.completion_tokens += meta["completion_tokens"]
        session.cached_tokens += meta.get("cached_tokens", 0)
        record = {
            "turn": session.turns, "id": done["id"], "prompt_tokens": meta["prompt_tokens"],
            "completion_tokens": meta["completion_tokens"], "cached_tokens": meta.get("cached_tokens", 0),
            "worker": worker, "worker_switched": switched, "layer_map": layer_map,
            "kv_location": kv_location(layer_map),
            "host_bytes": (layer_map or {}).get("kv", {}).get("host_bytes", 0),
            "device_kv_bytes": Metrics.device_bytes(layer_map, len(ids) + len(output_ids),
                                                    self.ctx.settings.kv_bytes_per_token_layer),
        }
        return TurnWrite(session, record, self.replay_key, {"fingerprint": self.req.fingerprint(), "completion": done})

    def _finish(self, out: dict[str, Any], done: dict[str, Any], write: TurnWrite | None) -> None:
        self.events.put_nowait(Event("done", completion=done))
        meta = out["meta_info"]
        self.ctx.metrics.observe_turn(meta, layer_map_record(meta), self.ctx.settings.kv_bytes_per_token_layer)
        if write is not None and write.record["worker_switched"]:
            self.ctx.metrics.worker_switches.inc()

    def _replay(self, stored: dict[str, Any]) -> None:
        if stored.get("fingerprint") != self.req.fingerprint():
            raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used for a different request")
        self.ctx.metrics.replays.inc()
        self.events.put_nowait(Event("done", completion=stored["completion"], replayed=True))

    async def _keep(self, sid: str, lease: Lease) -> None:
        """Renew the lock while the turn runs; a lost lock is noticed by the commit, which then refuses."""
        while not lease.lost:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                await self.ctx.store.renew(sid, lease)
            except StoreUnavailable:
                self.ctx.metrics.redis_errors.inc()

    async def _release(self, sid: str, lease: Lease) -> None:
        try:
            await self.ctx.store.release(sid, lease)
        except StoreUnavailable:  # the lock expires by itself within LOCK_TTL_MS
            self.ctx.metrics.redis_errors.inc()

    async def stream(self, first: Event) -> AsyncIterator[bytes]:
        """The turn as server-sent events, from its first event on (the turn goes on if this stops early)."""
        event = first
        include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        while True:
            if event.kind == "delta":
                yield fmt.sse(fmt.chunk(self.head, event.delta, logprobs=event.logprobs))
            elif event.kind == "done" and event.completion is not None:
                parts = fmt.replayed_stream if event.replayed else fmt.closing_chunks
                for part in parts(event.completion, include_usage):
                    yield part
                return
            else:
                assert event.error is not None
                yield fmt.sse(event.error.body())
                return
            event = await self.next()
