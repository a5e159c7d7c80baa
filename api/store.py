"""Session store: Redis (redis.asyncio) in production, an in-process dict for the quick start.

Key layout (prefix ``slkv:`` by default, configurable so tests and tenants can share a Redis):

    {p}session:{id}          hash  owner, created, status (open|closed), turns, prompt_tokens,
                                   completion_tokens, cached_tokens, worker, history (JSON: messages + ids)
    {p}session:{id}:turns    list  one JSON record per turn: layer map, KV location per layer, token counts
    {p}session:{id}:lock     str   held while a turn runs (SET NX EX): one turn at a time per session

Every key of a session expires ``ttl`` seconds after its last turn. A turn's results are written in one
MULTI/EXEC transaction, so a Redis failure mid-turn leaves the previous state intact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


class StoreUnavailable(RuntimeError):
    """The session store cannot be reached; the API answers 503."""


@dataclass
class Session:
    id: str
    owner: str
    created: float
    status: str = "open"
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker: str = ""
    history: dict[str, Any] = field(default_factory=lambda: {"messages": [], "ids": []})

    def to_hash(self) -> dict[str, str]:
        return {
            "owner": self.owner, "created": str(self.created), "status": self.status, "turns": str(self.turns),
            "prompt_tokens": str(self.prompt_tokens), "completion_tokens": str(self.completion_tokens),
            "cached_tokens": str(self.cached_tokens), "worker": self.worker, "history": json.dumps(self.history),
        }

    @classmethod
    def from_hash(cls, sid: str, h: dict[str, str]) -> "Session":
        return cls(
            id=sid, owner=h["owner"], created=float(h["created"]), status=h["status"], turns=int(h["turns"]),
            prompt_tokens=int(h["prompt_tokens"]), completion_tokens=int(h["completion_tokens"]),
            cached_tokens=int(h["cached_tokens"]), worker=h.get("worker", ""), history=json.loads(h["history"]),
        )


class SessionStore(Protocol):
    async def create(self, session: Session) -> None: ...
    async def get(self, sid: str) -> Session | None: ...
    async def turns(self, sid: str) -> list[dict[str, Any]]: ...
    async def lock(self, sid: str, seconds: int) -> bool: ...
    async def unlock(self, sid: str) -> None: ...
    async def commit_turn(self, session: Session, record: dict[str, Any]) -> None: ...
    async def close(self, session: Session) -> None: ...
    async def ping(self) -> bool: ...


class RedisStore:
    def __init__(self, url: str, prefix: str = "slkv:", ttl: int = 3600):
        import redis.asyncio as redis

        self._redis = redis.from_url(url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)
        self.prefix, self.ttl = prefix, ttl

    def _k(self, sid: str, suffix: str = "") -> str:
        return f"{self.prefix}session:{sid}{suffix}"

    async def _call(self, coro: Any) -> Any:
        import redis

        try:
            return await coro
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"session store unavailable: {exc}") from exc

    async def create(self, session: Session) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._k(session.id), mapping=session.to_hash())
        pipe.expire(self._k(session.id), self.ttl)
        await self._call(pipe.execute())

    async def get(self, sid: str) -> Session | None:
        h = await self._call(self._redis.hgetall(self._k(sid)))
        return Session.from_hash(sid, h) if h else None

    async def turns(self, sid: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in await self._call(self._redis.lrange(self._k(sid, ":turns"), 0, -1))]

    async def lock(self, sid: str, seconds: int) -> bool:
        return bool(await self._call(self._redis.set(self._k(sid, ":lock"), "1", nx=True, ex=seconds)))

    async def unlock(self, sid: str) -> None:
        await self._call(self._redis.delete(self._k(sid, ":lock")))

    async def commit_turn(self, session: Session, record: dict[str, Any]) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._k(session.id), mapping=session.to_hash())
        pipe.rpush(self._k(session.id, ":turns"), json.dumps(record))
        for key in (self._k(session.id), self._k(session.id, ":turns")):
            pipe.expire(key, self.ttl)
        await self._call(pipe.execute())

    async def close(self, session: Session) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._k(session.id), "status", "closed")
        pipe.expire(self._k(session.id), self.ttl)
        await self._call(pipe.execute())

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except Exception:
            return False


class MemoryStore:
    """Same interface, in-process; for the quick start only (nothing survives a restart)."""

    def __init__(self, ttl: int = 3600):
        self.ttl = ttl
        self._sessions: dict[str, tuple[float, Session]] = {}
        self._turns: dict[str, list[dict[str, Any]]] = {}
        self._locks: dict[str, float] = {}

    def _alive(self, sid: str) -> Session | None:
        found = self._sessions.get(sid)
        if found is None or found[0] < time.time():
            self._sessions.pop(sid, None)
            return None
        return found[1]

    async def create(self, session: Session) -> None:
        self._sessions[session.id] = (time.time() + self.ttl, session)

    async def get(self, sid: str) -> Session | None:
        s = self._alive(sid)
        return Session.from_hash(sid, s.to_hash()) if s else None

    async def turns(self, sid: str) -> list[dict[str, Any]]:
        return list(self._turns.get(sid, []))

    async def lock(self, sid: str, seconds: int) -> bool:
        if self._locks.get(sid, 0) > time.time():
            return False
        self._locks[sid] = time.time() + seconds
        return True

    async def unlock(self, sid: str) -> None:
        self._locks.pop(sid, None)

    async def commit_turn(self, session: Session, record: dict[str, Any]) -> None:
        self._sessions[session.id] = (time.time() + self.ttl, session)
        self._turns.setdefault(session.id, []).append(record)

    async def close(self, session: Session) -> None:
        session.status = "closed"
        self._sessions[session.id] = (time.time() + self.ttl, session)

    async def ping(self) -> bool:
        return True
