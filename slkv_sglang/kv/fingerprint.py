"""Prefix fingerprints: a 62-bit hash of the token ids up to each position.

A host copy of a (layer, slot) stores the fingerprint of the prefix it was computed for; a reader computes its own
from its token ids, and a copy is restored only where the two are equal (``offload.HostArena.reload``). Two
polynomial hashes modulo 31-bit primes, so every product stays inside int64 and the whole prefix is one vectorised
pass (no per-token Python): h[i] = sum_j (t_j + 1) * P^(i - j) mod M.
"""

from __future__ import annotations

from typing import Sequence

import torch

_MODULI = (2_147_483_647, 2_147_483_629)  # primes below 2^31
_BASES = (1_000_003, 999_983)


class _Powers:
    """P^j and P^-j mod M for j < n, grown on demand (cached per process)."""

    def __init__(self, base: int, modulus: int):
        self.base, self.modulus, self.inverse = base, modulus, pow(base, modulus - 2, modulus)
        self.up = torch.ones(1, dtype=torch.int64)
        self.down = torch.ones(1, dtype=torch.int64)

    def get(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.up.numel() < n:
            size = max(n, 2 * self.up.numel())
            up, down = [1] * size, [1] * size
            for j in range(1, size):
                up[j] = up[j - 1] * self.base % self.modulus
                down[j] = down[j - 1] * self.inverse % self.modulus
            self.up, self.down = torch.tensor(up), torch.tensor(down)
        return self.up[:n], self.down[:n]


_POWERS = [_Powers(b, m) for b, m in zip(_BASES, _MODULI)]


def prefix_fingerprints(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """``[n]`` int64: the fingerprint of ``ids[: i + 1]`` at each position ``i``."""
    t = torch.as_tensor(ids, dtype=torch.int64).cpu() + 1
    n = t.numel()
    out = torch.zeros(n, dtype=torch.int64)
    for powers, modulus in zip(_POWERS, _MODULI):
        up, down = powers.get(n)
        h = (torch.cumsum(t * down % modulus, 0) % modulus) * up % modulus
        out = (out << 31) | h
    return out
