"""Session store: Redis (redis.asyncio) in production, an in-process dict for the quick start.

Key layout (prefix ``slkv:`` by default, configurable so tests and tenants can share a Redis):

    {p}session:{id}               hash  owner, created, status (open|closed), turns, prompt_tokens,
                                        completion_tokens, cached_tokens, worker, history (JSON: messages + ids)
    {p}session:{id}:turns         list  one JSON record per turn: layer map, KV location per layer, token counts
    {p}session:{id}:lock          str   the running turn's fencing token (SET NX PX, renewed while it runs)
    {p}session:{id}:idem:{hash}   str   a committed turn's response, kept for retries with its Idempotency-Key

Every write that matters is one Lua script, so it is atomic and checks its preconditions where the data is:
claiming a turn checks owner, status and idempotency record and takes the lock in one step; a commit writes
only while its token still holds the lock, the session is open and the store's clock is before the commit's
deadline. A commit whose reply is lost is resolved by reading the turns list after that deadline, when the
script can no longer run (see ``RedisStore.commit``).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

LOCK_TTL_MS = 6000  # a turn's lock outlives a dead holder by at most this
RENEW_SECONDS = 2.0  # the holder renews it this often
SOCKET_TIMEOUT = 2.0
COMMIT_WINDOW_MS = 1000  # a commit script refuses to write this long after it was sent; < SOCKET_TIMEOUT
RESOLVE_SECONDS = 5.0  # how long a lost commit reply is looked up before the outcome is reported unknown

ClaimStatus = Literal["ok", "missing", "closed", "busy", "replay"]
CommitOutcome = Literal["committed", "missing", "closed", "lost"]


class StoreUnavailable(RuntimeError):
    """The session store cannot be reached; the API answers 503.

    ``committed`` says what became of a turn whose commit failed: False (not written and never will be) or
    None (unknown: a retry with the same Idempotency-Key finds out)."""

    def __init__(self, message: str, committed: bool | None = False):
        super().__init__(message)
        self.committed = committed


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
        return {"owner": self.owner, "created": str(self.created), "status": self.status, **self.turn_fields()}

    def turn_fields(self) -> dict[str, str]:
        """What a committed turn changes (never owner or status: a DELETE during the turn must stick)."""
        return {
            "turns": str(self.turns), "prompt_tokens": str(self.prompt_tokens),
            "completion_tokens": str(self.completion_tokens), "cached_tokens": str(self.cached_tokens),
            "worker": self.worker, "history": json.dumps(self.history),
        }

    @classmethod
    def from_hash(cls, sid: str, h: dict[str, str]) -> "Session":
        return cls(
            id=sid, owner=h["owner"], created=float(h["created"]), status=h["status"], turns=int(h["turns"]),
            prompt_tokens=int(h["prompt_tokens"]), completion_tokens=int(h["completion_tokens"]),
            cached_tokens=int(h["cached_tokens"]), worker=h.get("worker", ""), history=json.loads(h["history"]),
        )


@dataclass
class Lease:
    """A held turn lock: its fencing token and the store's clock as last seen (a lower bound of it from then on)."""

    token: str
    clock_ms: float
    seen_at: float = field(default_factory=time.monotonic)
    lost: bool = False

    def observe(self, clock_ms: float) -> None:
        # Each reply bounds the store's clock from below; a reply read late (a busy event loop) bounds it
        # less tightly than an earlier one, so keep the tighter bound.
        if clock_ms > self.store_now_ms():
            self.clock_ms, self.seen_at = clock_ms, time.monotonic()

    def store_now_ms(self) -> float:
        return self.clock_ms + (time.monotonic() - self.seen_at) * 1000


@dataclass
class Claim:
    """The answer to "may this request run a turn of this session?"."""

    status: ClaimStatus
    session: Session | None = None
    lease: Lease | None = None
    replay: dict[str, Any] | None = None  # the stored response for the request's Idempotency-Key


@dataclass
class TurnWrite:
    """Everything a committed turn writes."""

    session: Session
    record: dict[str, Any]
    replay_key: str | None  # the Idempotency-Key's digest, if the request had one
    replay: dict[str, Any]


class SessionStore(Protocol):
    async def create(self, session: Session) -> None: ...
    async def get(self, sid: str) -> Session | None: ...
    async def turns(self, sid: str) -> list[dict[str, Any]]: ...
    async def claim(self, sid: str, owner: str, replay_key: str | None) -> Claim: ...
    async def renew(self, sid: str, lease: Lease) -> None: ...
    async def release(self, sid: str, lease: Lease) -> None: ...
    async def commit(self, lease: Lease, write: TurnWrite) -> CommitOutcome: ...
    async def close(self, sid: str, owner: str) -> Literal["ok", "missing", "closed"]: ...
    async def ping(self) -> bool: ...


# KEYS: session hash, lock[, idempotency record]. ARGV: owner, token, lock ms.
_CLAIM = """
local h = redis.call('HGETALL', KEYS[1])
local f = {}
for i = 1, #h, 2 do f[h[i]] = h[i + 1] end
if f['owner'] ~= ARGV[1] then return {'missing'} end
if KEYS[3] then
  local replay = redis.call('GET', KEYS[3])
  if replay then return {'replay', replay} end
end
if f['status'] ~= 'open' then return {'closed'} end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {'busy'} end
local t = redis.call('TIME')
return {'ok', t[1] * 1000 + math.floor(t[2] / 1000), unpack(h)}
"""

# KEYS: lock. ARGV: token, lock ms.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local t = redis.call('TIME')
return t[1] * 1000 + math.floor(t[2] / 1000)
"""

# KEYS: lock. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: session hash, turns list, lock[, idempotency record].
# ARGV: token, deadline (store clock, ms), ttl s, turn record, replay record, field/value pairs...
_COMMIT = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then return 'lost' end
redis.call('DEL', KEYS[3])
local t = redis.call('TIME')
if t[1] * 1000 + math.floor(t[2] / 1000) > tonumber(ARGV[2]) then return 'lost' end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'open' then return 'closed' end
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if KEYS[4] then redis.call('SET', KEYS[4], ARGV[5], 'EX', ARGV[3]) end
return 'committed'
"""

# KEYS: session hash. ARGV: owner, ttl s.
_CLOSE = """
local f = redis.call('HMGET', KEYS[1], 'owner', 'status')
if f[1] ~= ARGV[1] then return 'missing' end
if f[2] == 'closed' then return 'closed' end
redis.call('HSET', KEYS[1], 'status', 'closed')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 'ok'
"""


class _MaybeRan(Exception):
    """A command was sent but its reply never came: it may have run, or may still run."""


class RedisStore:
    def __init__(self, url: str, prefix: str = "slkv:", ttl: int = 3600):
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No client-side retries: a retried write could run twice, and a stalled Redis would hold a turn for
        # retries x timeout. Failures surface at once and the API says what happened.
        self._redis = redis.from_url(url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT,
                                     socket_connect_timeout=SOCKET_TIMEOUT, retry=Retry(NoBackoff(), 0))
        self.prefix, self.ttl = prefix, ttl

    def _k(self, sid: str, suffix: str = "") -> str:
        return f"{self.prefix}session:{sid}{suffix}"

    def _replay_key(self, sid: str, digest: str) -> str:
        return self._k(sid, f":idem:{digest}")

    async def _call(self, coro: Any) -> Any:
        import redis

        try:
            return await coro
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise StoreUnavailable(f"session store unavailable: {type(exc).__name__}") from exc

    async def _eval(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await self._call(self._redis.eval(script, len(keys), *keys, *args))

    async def _eval_once(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run a script on one connection, telling "never sent" (StoreUnavailable) from "maybe ran" (_MaybeRan)."""
        import redis

        errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        pool = self._redis.connection_pool
        try:
            conn = await pool.get_connection()
        except errors as exc:
            raise StoreUnavailable(f"session store unavailable: {type(exc).__name__}") from exc
        try:
            await conn.send_command("EVAL", script, len(keys), *keys, *args)
            return await conn.read_response()
        except errors as exc:
            await conn.disconnect()
            raise _MaybeRan() from exc
        finally:
            await pool.release(conn)

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

    async def claim(self, sid: str, owner: str, replay_key: str | None) -> Claim:
        keys = [self._k(sid), self._k(sid, ":lock")] + ([self._replay_key(sid, replay_key)] if replay_key else [])
        token = secrets.token_hex(16)
        reply = await self._eval(_CLAIM, keys, [owner, token, LOCK_TTL_MS])
        status = reply[0]
        if status == "replay":
            return Claim("replay", replay=json.loads(reply[1]))
        if status != "ok":
            return Claim(status)
        h = dict(zip(reply[2::2], reply[3::2]))
        return Claim("ok", session=Session.from_hash(sid, h), lease=Lease(token, float(reply[1])))

    async def renew(self, sid: str, lease: Lease) -> None:
        clock = await self._eval(_RENEW, [self._k(sid, ":lock")], [lease.token, LOCK_TTL_MS])
        if clock is None:
            lease.lost = True
        else:
            lease.observe(float(clock))

    async def release(self, sid: str, lease: Lease) -> None:
        await self._eval(_RELEASE, [self._k(sid, ":lock")], [lease.token])

    async def commit(self, lease: Lease, write: TurnWrite) -> CommitOutcome:
        """Write the turn if ``lease`` still holds the lock; exactly once, or StoreUnavailable saying whether.

        The script refuses to write after a deadline on the store's own clock, one COMMIT_WINDOW_MS after the
        send (``lease`` bounds that clock from below). A reply that never comes is resolved after that
        deadline: a script still queued behind a stalled Redis can no longer write, so what the turns list
        holds then is final."""
        sid = write.session.id
        keys = [self._k(sid), self._k(sid, ":turns"), self._k(sid, ":lock")]
        if write.replay_key:
            keys.append(self._replay_key(sid, write.replay_key))
        fields = [x for kv in write.session.turn_fields().items() for x in kv]
        sent = time.monotonic()
        args = [lease.token, int(lease.store_now_ms()) + COMMIT_WINDOW_MS, self.ttl, json.dumps(write.record),
                json.dumps(write.replay), *fields]
        try:
            return await self._eval_once(_COMMIT, keys, args)
        except _MaybeRan:
            await asyncio.sleep(max(0.0, sent + COMMIT_WINDOW_MS / 1000 + 0.05 - time.monotonic()))
            return await self._resolve(sid, write)

    async def _resolve(self, sid: str, write: TurnWrite) -> CommitOutcome:
        """After a lost commit reply and its deadline: did the turn land? (Its record is at index turns - 1.)"""
        deadline = time.monotonic() + RESOLVE_SECONDS
        while True:
            try:
                stored = await self._call(self._redis.lindex(self._k(sid, ":turns"), write.session.turns - 1))
                break
            except StoreUnavailable:
                if time.monotonic() > deadline:
                    raise StoreUnavailable("session store unavailable while the turn was saved; whether it was "
                                           "saved is unknown: retry with the same Idempotency-Key", committed=None)
                await asyncio.sleep(0.5)
        if stored is not None and json.loads(stored).get("id") == write.record["id"]:
            return "committed"
        raise StoreUnavailable("session store unavailable while the turn was saved; it was not saved")

    async def close(self, sid: str, owner: str) -> Literal["ok", "missing", "closed"]:
        return await self._eval(_CLOSE, [self._k(sid)], [owner, self.ttl])

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
        self._locks: dict[str, tuple[float, str]] = {}
        self._replays: dict[tuple[str, str], dict[str, Any]] = {}

    def _alive(self, sid: str) -> Session | None:
        found = self._sessions.get(sid)
        if found is None or found[0] < time.time():
            self._sessions.pop(sid, None)
            return None
        return found[1]

    def _holds(self, sid: str, lease: Lease) -> bool:
        expires, token = self._locks.get(sid, (0.0, ""))
        return token == lease.token and expires > time.time()

    def _lock(self, sid: str, token: str) -> None:
        self._locks[sid] = (time.time() + LOCK_TTL_MS / 1000, token)

    def _keep(self, session: Session) -> None:
        """Store a copy, as Redis would: the caller's object may change afterwards."""
        self._sessions[session.id] = (time.time() + self.ttl, Session.from_hash(session.id, session.to_hash()))

    async def create(self, session: Session) -> None:
        self._keep(session)

    async def get(self, sid: str) -> Session | None:
        s = self._alive(sid)
        return Session.from_hash(sid, s.to_hash()) if s else None

    async def turns(self, sid: str) -> list[dict[str, Any]]:
        return list(self._turns.get(sid, []))

    async def claim(self, sid: str, owner: str, replay_key: str | None) -> Claim:
        session = await self.get(sid)
        if session is None or session.owner != owner:
            return Claim("missing")
        if replay_key and (sid, replay_key) in self._replays:
            return Claim("replay", replay=self._replays[(sid, replay_key)])
        if session.status != "open":
            return Claim("closed")
        if self._locks.get(sid, (0.0, ""))[0] > time.time():
            return Claim("busy")
        lease = Lease(secrets.token_hex(16), time.time() * 1000)
        self._lock(sid, lease.token)
        return Claim("ok", session=session, lease=lease)

    async def renew(self, sid: str, lease: Lease) -> None:
        if self._holds(sid, lease):
            self._lock(sid, lease.token)
        else:
            lease.lost = True

    async def release(self, sid: str, lease: Lease) -> None:
        if self._holds(sid, lease):
            del self._locks[sid]

    async def commit(self, lease: Lease, write: TurnWrite) -> CommitOutcome:
        sid = write.session.id
        if not self._holds(sid, lease):
            return "lost"
        del self._locks[sid]
        current = self._alive(sid)
        if current is None:
            return "missing"
        if current.status != "open":
            return "closed"
        self._keep(write.session)
        self._turns.setdefault(sid, []).append(write.record)
        if write.replay_key:
            self._replays[(sid, write.replay_key)] = write.replay
        return "committed"

    async def close(self, sid: str, owner: str) -> Literal["ok", "missing", "closed"]:
        session = self._alive(sid)
        if session is None or session.owner != owner:
            return "missing"
        if session.status == "closed":
            return "closed"
        session.status = "closed"
        return "ok"

    async def ping(self) -> bool:
        return True
