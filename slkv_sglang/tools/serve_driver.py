"""Closed-loop multi-turn load on one engine: every session sends its next turn as soon as its reply ends.

All sessions run as tasks of one asyncio loop (the engine's), each turn streamed through
``engine.async_generate(stream=True)`` so every output token gets its arrival time. A turn's prompt is the
session's whole history (earlier prompts and the engine's own output ids) plus the new user turn, so the radix
cache can serve the history if it still holds it; ``meta_info["cached_tokens"]`` says how much it did.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .serve_workload import Session


@dataclass
class TurnRecord:
    session: str
    turn: int  # 1-based
    prompt_tokens: int
    # what a cache that kept this session serves: the previous turn's prompt (computed in full and cached then;
    # its reply is left out, SGLang caches a reply's tokens only in part), at most the prompt less the last
    # ``last`` tokens, which the plugin always leaves to the prefill so that SimLayerKV has queries to score
    reusable_tokens: int
    cached_tokens: int
    sent: float  # seconds since the run's start
    token_times: list[float]  # arrival of each output token, seconds since the run's start
    answered: bool | None = None  # last turn: the passcode's digits are in the reply
    reply: str = ""  # last turn: the reply's text
    slkv: dict[str, Any] = field(default_factory=dict)  # the layer map record, if SimLayerKV decided

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.sent

    @property
    def recomputed_tokens(self) -> int:
        """Tokens the cache could have served and did not: it had evicted them."""
        return max(0, self.reusable_tokens - self.cached_tokens)


def _layer_map(meta: dict[str, Any]) -> dict[str, Any]:
    """A streamed request's layer-map record (SGLang accumulates request-level info into a list)."""
    records = meta.get("slkv") or []
    records = records if isinstance(records, list) else [records]
    return next((r for r in reversed(records) if r), {})


async def _turn(engine: Any, ids: list[int], params: dict[str, Any],
                t0: float) -> tuple[float, list[float], dict[str, Any]]:
    sent = time.perf_counter() - t0
    times: list[float] = []
    last: dict[str, Any] = {}
    async for chunk in await engine.async_generate(input_ids=ids, sampling_params=params, stream=True):
        now = time.perf_counter() - t0
        times += [now] * (len(chunk["output_ids"]) - len(times))  # a chunk may carry several tokens
        last = chunk
    return sent, times, last


async def _session(engine: Any, session: Session, slkv: dict[str, Any], last_window: int, t0: float,
                   out: list[TurnRecord], on_turn: Callable[[], None]) -> None:
    await asyncio.sleep(max(0.0, session.start - (time.perf_counter() - t0)))
    history: list[int] = []
    previous = 0
    for k, turn in enumerate(session.turns, start=1):
        ids = history + turn.ids
        params = {"temperature": 0.0, "max_new_tokens": turn.reply_tokens, "ignore_eos": True,
                  "custom_params": {"slkv": slkv}}
        sent, times, last = await _turn(engine, ids, params, t0)
        meta = last["meta_info"]
        record = TurnRecord(session.name, k, len(ids), min(previous, len(ids) - last_window), meta["cached_tokens"],
                            sent, times, slkv=_layer_map(meta))
        if k == len(session.turns) and session.passcode:  # sessions without a needle (gpu-e2e's) check none
            record.answered, record.reply = session.passcode in last["text"], last["text"]
        out.append(record)
        on_turn()
        history, previous = ids + list(last["output_ids"]), len(ids)


def run_sessions(engine: Any, sessions: list[Session], slkv: dict[str, Any], last_window: int,
                 on_turn: Callable[[], None] = lambda: None) -> tuple[float, list[TurnRecord]]:
    """Play ``sessions`` concurrently against ``engine`` with per-request ``custom_params.slkv`` = ``slkv``
    (e.g. ``{"enabled": False}`` for plain SGLang); ``last_window``: the engine's SimLayerKV ``last``.
    Returns the wall time and every turn's record."""
    records: list[TurnRecord] = []

    async def play() -> None:
        t0 = time.perf_counter()
        await asyncio.gather(*(_session(engine, s, slkv, last_window, t0, records, on_turn) for s in sessions))

    t = time.perf_counter()
    engine.loop.run_until_complete(play())
    return time.perf_counter() - t, records
