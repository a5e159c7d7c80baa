"""The session stores' turn contract, on a real redis-server of its own and on the in-process store: claims,
fenced commits, closes that win, idempotency records, and a commit stalled behind CLIENT PAUSE."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from api.store import COMMIT_WINDOW_MS, LOCK_TTL_MS, MemoryStore, RedisStore, Session, StoreUnavailable, TurnWrite

from .test_api import redis_server  # noqa: F401  (a module fixture: this module gets its own redis-server)


@pytest.fixture(params=["redis", "memory"])
def store(request, redis_server):
    if request.param == "memory":
        return MemoryStore()
    return RedisStore(f"redis://127.0.0.1:{redis_server.port}/0", prefix=f"store-test-{time.monotonic_ns()}:")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def _write(session: Session, turn_id: str, replay_key: str | None = None) -> TurnWrite:
    session.turns += 1
    session.history = {"messages": [{"role": "user", "content": turn_id}], "ids": [1, 2, 3]}
    return TurnWrite(session, {"turn": session.turns, "id": turn_id}, replay_key, {"completion": {"id": turn_id}})


async def _open(store) -> str:
    session = Session(id=f"sess_{time.monotonic_ns():032d}", owner="alice", created=time.time())
    await store.create(session)
    return session.id


def test_claim_commit_and_replay(store):
    async def scenario() -> None:
        sid = await _open(store)
        assert (await store.claim(sid, "bob", None)).status == "missing"  # another owner's session is no session
        claim = await store.claim(sid, "alice", "k1")
        assert claim.status == "ok" and claim.session.turns == 0
        assert (await store.claim(sid, "alice", None)).status == "busy"
        assert await store.commit(claim.lease, _write(claim.session, "t1", "k1")) == "committed"
        assert await store.commit(claim.lease, _write(claim.session, "t1-again", "k1")) == "lost"  # fenced
        replay = await store.claim(sid, "alice", "k1")
        assert replay.status == "replay" and replay.replay == {"completion": {"id": "t1"}}
        assert [t["id"] for t in await store.turns(sid)] == ["t1"]
        assert (await store.get(sid)).turns == 1

    run(scenario())


def test_close_during_a_turn_wins(store):
    async def scenario() -> None:
        sid = await _open(store)
        claim = await store.claim(sid, "alice", None)
        assert await store.close(sid, "alice") == "ok"
        assert await store.close(sid, "alice") == "closed"
        assert await store.commit(claim.lease, _write(claim.session, "t1")) == "closed"
        assert (await store.get(sid)).status == "closed" and await store.turns(sid) == []
        assert (await store.claim(sid, "alice", None)).status == "closed"

    run(scenario())


def test_released_lock_frees_the_session_and_fences_the_holder(store):
    async def scenario() -> None:
        sid = await _open(store)
        first = await store.claim(sid, "alice", None)
        await store.release(sid, first.lease)
        second = await store.claim(sid, "alice", None)
        assert second.status == "ok"
        await store.renew(sid, first.lease)
        assert first.lease.lost
        assert await store.commit(first.lease, _write(first.session, "stale")) == "lost"
        assert await store.commit(second.lease, _write(second.session, "fresh")) == "committed"
        assert [t["id"] for t in await store.turns(sid)] == ["fresh"]

    run(scenario())


def test_redis_commit_refuses_after_its_deadline(redis_server):
    """The fence against a commit that waited in Redis: past its deadline (on Redis's clock) it writes nothing."""
    store = RedisStore(f"redis://127.0.0.1:{redis_server.port}/0", prefix="deadline-test:")

    async def scenario() -> None:
        sid = await _open(store)
        claim = await store.claim(sid, "alice", None)
        claim.lease.clock_ms -= 2 * COMMIT_WINDOW_MS  # as if the commit had been sent 2 windows ago
        assert await store.commit(claim.lease, _write(claim.session, "late")) == "lost"
        assert await store.turns(sid) == []
        assert (await store.claim(sid, "alice", None)).status == "ok"  # and it let the lock go

    run(scenario())


def test_redis_commit_stalled_by_client_pause(redis_server):
    """A commit stuck behind CLIENT PAUSE WRITE times out; reads still work, so the store finds out that the
    turn was not written and says so. When Redis resumes, the queued script is past its deadline: nothing lands."""
    store = RedisStore(f"redis://127.0.0.1:{redis_server.port}/0", prefix="pause-test:")
    raw = redis_server.client()

    async def scenario() -> None:
        sid = await _open(store)
        claim = await store.claim(sid, "alice", None)
        raw.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
        try:
            with pytest.raises(StoreUnavailable) as failed:
                await store.commit(claim.lease, _write(claim.session, "stalled"))
        finally:
            raw.execute_command("CLIENT", "UNPAUSE")
        assert failed.value.committed is False
        deadline = time.monotonic() + 2 * LOCK_TTL_MS / 1000
        while raw.exists(f"pause-test:session:{sid}:lock"):  # the queued commit ran, refused, and let go
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert await store.turns(sid) == []

    run(scenario())
