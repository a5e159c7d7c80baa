"""``slkv bench-offload``: host-tier offload and reload bandwidth against a plain tensor copy of the same bytes.

The plain copy is ``dst.copy_(src)`` into a preallocated tensor on the same machine: the ceiling any tier
built on tensor copies can reach. The tier's figures include its bookkeeping and host allocation. Shapes
default to the bundled model's KV (3 KV heads x 64 dims, float32) for a 4K-token session whose lazy layers
offload their middle tokens (window 4 + 1020). Prints figures; no pass/fail.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from offload import HostArena


def _median_seconds(fn: Callable[[], None], repeats: int, sync: Callable[[], None],
                    after: Callable[[], None] = lambda: None) -> float:
    """Median seconds of ``fn``; ``after`` runs untimed after each call."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        after()
    return statistics.median(times)


def bandwidth(tokens: int, window: int, units: int, kv_heads: int, head_dim: int, repeats: int,
              device: torch.device, dtype: torch.dtype = torch.float32,
              per_layer: int = 1) -> tuple[int, dict[str, float]]:
    """Bytes per transfer and median seconds of: plain copy down, offload (its slots forgotten after, untimed),
    offload with that ``forget`` (which SGLang's free of the slots causes later), plain copy up, reload. ``units`` lazy
    units of ``kv_heads`` KV heads each (a layer, or one KV head with a row per head) offload their middle tokens in
    one call, as a decision does. They reload one unit per call (a layer with a single lazy unit) and, where a
    layer has ``per_layer`` > 1 units, a layer's units per call (as a prefill restores a layer whose units are
    all lazy)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    middle = tokens - window
    kv = torch.randn(units * middle, 2, kv_heads, head_dim, device=device).to(dtype)  # unit-major, as gathered
    nbytes = kv.numel() * kv.element_size()
    host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=device.type == "cuda")
    back = torch.empty_like(kv)

    def plain_down() -> None:
        host.copy_(kv, non_blocking=True)

    def plain_up() -> None:
        back.copy_(host, non_blocking=True)

    arena = HostArena(budget_bytes=4 * nbytes, num_units=units, num_slots=2 * middle, device=device)
    resident, passing = torch.arange(1, middle + 1), torch.arange(middle + 1, 2 * middle + 1)  # slot ids
    fingerprints = torch.arange(middle)  # any: the reload below passes the same
    every = list(range(units))

    def save() -> None:
        arena.save(arena.new_entry(), "bench", every, passing, fingerprints, kv)
        arena.wait()

    def save_and_forget() -> None:  # SGLang frees the slots later (the request ends, or eviction)
        save()
        arena.forget(passing)

    arena.save(arena.new_entry(), "bench", every, resident, fingerprints, kv)  # the session reloaded below

    def reload(per_call: int) -> None:
        for lo in range(0, units, per_call):
            hi = min(units, lo + per_call)
            assert arena.reload(every[lo:hi], resident, fingerprints, back[lo * middle : hi * middle], reader="bench")
        arena.wait()

    figures = {
        "plain device->host": _median_seconds(plain_down, repeats, sync),
        "offload": _median_seconds(save, repeats, sync, after=lambda: arena.forget(passing)),
        "offload + forget": _median_seconds(save_and_forget, repeats, sync),
        "plain host->device": _median_seconds(plain_up, repeats, sync),
        "reload": _median_seconds(lambda: reload(1), repeats, sync),
    }
    if per_layer > 1:
        figures["reload, layer per call"] = _median_seconds(lambda: reload(per_layer), repeats, sync)
    return nbytes, figures


def report(nbytes: int, figures: dict[str, float]) -> None:
    for name, secs in figures.items():
        print(f"  {name:<20} {secs * 1e3:8.2f} ms  {nbytes / secs / 2**30:6.2f} GiB/s")
    print(f"  offload / plain copy: {figures['plain device->host'] / figures['offload']:.2f} "
          f"({figures['plain device->host'] / figures['offload + forget']:.2f} with the forget of its slots)")
    print(f"  reload / plain copy:  {figures['plain host->device'] / figures['reload']:.2f} (a unit per call)")
    if "reload, layer per call" in figures:
        print(f"                        {figures['plain host->device'] / figures['reload, layer per call']:.2f} "
              f"(a layer's units per call)")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="slkv bench-offload", description=__doc__)
    p.add_argument("--tokens", type=int, default=4096, help="session length (default 4096)")
    p.add_argument("--window", type=int, default=1024, help="sink + recent tokens a lazy layer keeps (default 1024)")
    p.add_argument("--units", type=int, default=30,
                   help="lazy units offloaded: layers, or KV heads with a row per head (default 30: 10 layers' heads)")
    p.add_argument("--kv-heads", type=int, default=1, help="KV heads per unit (default 1: a row per KV head)")
    p.add_argument("--per-layer", type=int, default=3,
                   help="units per layer, reloaded in one call as well (default 3: the bundled model's KV heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    nbytes, figures = bandwidth(args.tokens, args.window, args.units, args.kv_heads, args.head_dim, args.repeats,
                                device, per_layer=args.per_layer)
    print(f"{args.units} units x {args.tokens - args.window} tokens x {args.kv_heads} kv heads x {args.head_dim} "
          f"dims, float32: {nbytes / 2**20:.1f} MiB per transfer, device {device}, {torch.get_num_threads()} CPU threads")
    report(nbytes, figures)
    return 0
