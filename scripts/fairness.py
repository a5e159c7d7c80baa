"""Do long prompts starve short turns? Latency of 1-token turns while clients keep sending long prompts.

    python scripts/fairness.py --url http://127.0.0.1:8000 --long-clients 4 --long-tokens 6000 --probes 30

Each long client sends sessionless prompts of about --long-tokens tokens (a fresh prefix each time, so the
radix cache cannot serve them) with max_tokens 1, back to back. Once all of them are in flight, one probe
client sends --probes short 1-token turns one after another and times them. Loopback only, bounded.
Prints the probes' p50/p99/max and the long prompts' latency.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from urllib.parse import urlparse

import httpx


async def _turn(client: httpx.AsyncClient, text: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "max_tokens": 1})
    r.raise_for_status()
    return time.perf_counter() - t0, r.json()["usage"]["prompt_tokens"]


async def _long_client(client: httpx.AsyncClient, words: int, started: asyncio.Event, done: asyncio.Event,
                       latencies: list[float], sizes: list[int]) -> None:
    while not done.is_set():
        started.set()
        seconds, tokens = await _turn(client, f"{secrets.token_hex(8)} " + "word " * words + "Say one word.")
        latencies.append(seconds)
        sizes.append(tokens)


def _quantiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return f"p50 {q[49]:.2f} s, p99 {q[98]:.2f} s, max {max(values):.2f} s"


async def run(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout) as client:
        idle = [(await _turn(client, f"{secrets.token_hex(4)} Say hi."))[0] for _ in range(3)]
        done, long_latencies, sizes = asyncio.Event(), [], []
        starts = [asyncio.Event() for _ in range(args.long_clients)]
        longs = [asyncio.create_task(_long_client(client, args.long_tokens, s, done, long_latencies, sizes))
                 for s in starts]
        await asyncio.gather(*(s.wait() for s in starts))
        await asyncio.sleep(1.0)  # the long prompts have reached the engine
        probes = []
        for n in range(args.probes):
            probes.append((await _turn(client, f"{secrets.token_hex(4)} Say hi."))[0])
            print(f"  probe {n + 1}: {probes[-1]:.2f} s", flush=True)
        done.set()
        await asyncio.gather(*longs)
    print(f"1-token turns, idle server: {_quantiles(idle)}")
    print(f"1-token turns while {args.long_clients} clients send {statistics.mean(sizes):.0f}-token prompts: "
          f"{len(probes)} turns, {_quantiles(probes)}")
    print(f"long prompts (max_tokens 1): {len(long_latencies)} done, {_quantiles(long_latencies)}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="")
    p.add_argument("--long-clients", type=int, default=4)
    p.add_argument("--long-tokens", type=int, default=6000, help="words per long prompt (about one token each)")
    p.add_argument("--probes", type=int, default=30)
    p.add_argument("--timeout", type=float, default=1200)
    args = p.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("the fairness test only targets loopback servers")
    if not 1 <= args.long_clients <= 16 or not 1 <= args.probes <= 200 or not 1 <= args.long_tokens <= 7500:
        p.error("bounded: 1-16 long clients, 1-200 probes, 1-7500 words")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
