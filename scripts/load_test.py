"""Bounded loopback load test for `slkv serve`: N concurrent sessions x T turns of short prompts.

    python scripts/load_test.py --url http://127.0.0.1:8000 --sessions 50 --turns 3

Prints p50/p99 turn latency and throughput; exits non-zero if any turn failed.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from urllib.parse import urlparse

import httpx

PROMPTS = ["Name a colour.", "Now name a fruit of that colour.", "Say both words again."]


async def session(client: httpx.AsyncClient, turns: int, max_tokens: int, latencies: list[float], failures: list[str]) -> int:
    r = await client.post("/v1/sessions")
    if r.status_code != 201:
        failures.append(f"open: {r.status_code} {r.text[:200]}")
        return 0
    sid, tokens = r.json()["id"], 0
    for t in range(turns):
        body = {"messages": [{"role": "user", "content": PROMPTS[t % len(PROMPTS)]}], "session_id": sid, "max_tokens": max_tokens}
        t0 = time.perf_counter()
        r = await client.post("/v1/chat/completions", json=body)
        latencies.append(time.perf_counter() - t0)
        if r.status_code != 200:
            failures.append(f"turn {t + 1}: {r.status_code} {r.text[:200]}")
            return tokens
        tokens += r.json()["usage"]["completion_tokens"]
    await client.delete(f"/v1/sessions/{sid}")
    return tokens


async def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    latencies: list[float] = []
    failures: list[str] = []
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout,
                                 limits=httpx.Limits(max_connections=args.sessions)) as client:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(session(client, args.turns, args.max_tokens, latencies, failures)
                                        for _ in range(args.sessions)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    print(f"{args.sessions} sessions x {args.turns} turns: {len(latencies)} turns, {len(failures)} failed, {wall:.1f} s")
    print(f"turn latency p50 {q[49]:.2f} s, p99 {q[98]:.2f} s")
    print(f"throughput {len(latencies) / wall:.2f} turns/s, {sum(tokens) / wall:.1f} completion tokens/s")
    for f in failures[:10]:
        print("  failure:", f)
    return 1 if failures else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="")
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("the load test only targets loopback servers")
    if not 1 <= args.sessions <= 500 or not 1 <= args.turns <= 20:
        p.error("bounded: 1-500 sessions, 1-20 turns")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
