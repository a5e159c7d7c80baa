"""PNG of a session's layer maps: layer x turn, full KV / lazy / lazy with its middle KV on the host (--slkv-offload)."""

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
    grid = np.zeros((max(layers, 1), max(len(turns), 1)))
    for j, (turn, m) in enumerate(zip(turns, maps)):
        for i in range(layers):
            if m and m["lazy"][i]:
                grid[i, j] = 2 if turn.get("kv_location", [""] * layers)[i] == "host" else 1
    fig, ax = plt.subplots(figsize=(2 + 0.5 * len(turns), 6))
    ax.imshow(grid, aspect="auto", cmap=ListedColormap(["#dddddd", "#3b7dd8", "#e07b39"]), vmin=0, vmax=2)
    ax.set_xlabel("turn")
    ax.set_ylabel("layer")
    ax.set_xticks(range(len(turns)), [str(t.get("turn", j + 1)) for j, t in enumerate(turns)])
    ax.set_title("grey: full KV, blue: lazy, orange: offloaded")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
