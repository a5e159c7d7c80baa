"""PNG of a session's layer maps: layer x (turn, KV head), full KV / lazy / lazy with its middle KV on the host
(--slkv-offload). With layer granularity a lazy layer is lazy in every KV head; with head granularity each KV head
of a layer is decided on its own, so a turn's column splits into one sub-column per KV head."""

from __future__ import annotations

import io
from typing import Any


def layer_map_png(turns: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    maps = [t.get("layer_map") for t in turns]
    layers = max((len(m["lazy"]) for m in maps if m), default=0)
    heads = max((len(m["heads"][0]) for m in maps if m and m.get("heads")), default=1)
    grid = np.zeros((max(layers, 1), max(len(turns), 1) * heads))
    for j, (turn, m) in enumerate(zip(turns, maps)):
        if not m:
            continue
        where = turn.get("kv_location") or [[""] * heads] * layers  # per layer and KV head
        for i in range(layers):
            flags = m["heads"][i] if m.get("heads") else [m["lazy"][i]] * heads
            for h, lazy in enumerate(flags):
                if lazy:
                    grid[i, j * heads + h] = 2 if where[i][h % len(where[i])] == "host" else 1
    fig, ax = plt.subplots(figsize=(max(4.5, 2 + 0.3 * len(turns) * heads), 6))
    ax.imshow(grid, aspect="auto", cmap=ListedColormap(["#dddddd", "#3b7dd8", "#e07b39"]), vmin=0, vmax=2,
              interpolation="nearest")
    for j in range(1, len(turns)):
        ax.axvline(j * heads - 0.5, color="white", linewidth=2)
    ax.set_xlabel("turn" if heads == 1 else f"turn ({heads} KV heads each)")
    ax.set_ylabel("layer")
    ax.set_xticks([j * heads + (heads - 1) / 2 for j in range(len(turns))],
                  [str(t.get("turn", j + 1)) for j, t in enumerate(turns)])
    ax.set_title("grey: full KV, blue: lazy, orange: offloaded")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
