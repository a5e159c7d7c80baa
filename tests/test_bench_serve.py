"""``slkv bench-serve`` in small: every configuration plays its sessions to the end on the real engines.

No timing is asserted (the figures are the benchmark's to print); what is checked is that the load ran:
every turn of every session completed, later turns were served their history from the cache, the last turn
of every session asked for its needle, the offload configuration offloaded, and the report was written.
"""

from __future__ import annotations

import json

import pytest

from slkv_sglang.tools.bench_serve import CONFIGURATIONS, sweep
from slkv_sglang.tools.serve_report import plots, table
from slkv_sglang.tools.serve_workload import Workload, build_sessions

from .conftest import OFFLOAD_BUDGET, TEST_SLKV, set_host_budget

pytestmark = pytest.mark.engine  # every test here starts an SGLang engine or a server with one

SESSIONS, TURNS = 2, 2
# 1024-token documents: long enough that lazy layers (recent 256 in the tests' engines) offload their middle
WORKLOAD = Workload(doc_tokens=1024, turns=TURNS, stats="lmsys", reply_scale=0.05, reply_cap=8, rate=None, seed=3)


def test_every_configuration_completes_its_sessions(slkv_engine, offload_engine, tokenizer, tmp_path):
    """On the session's engines (``conftest``; offload: slots sized by the plugin, as bench-serve's default). ``sweep``
    flushes each engine's cache before each configuration, so what earlier tests left there does not count; the
    host budget, which an earlier test may have shrunk, is set here."""
    assert set_host_budget(offload_engine, OFFLOAD_BUDGET) == [True]
    sessions = build_sessions(tokenizer, SESSIONS, WORKLOAD)
    chosen = [c for c in CONFIGURATIONS if c.engine != "hicache"]
    runs = sweep({"plain": slkv_engine, "offload": offload_engine}, chosen, sessions, [SESSIONS], TEST_SLKV.last)

    assert [r["config"] for r in runs] == [c.name for c in chosen]
    for run in runs:
        f, records = run["figures"], run["records"]
        assert f["turns"] == SESSIONS * TURNS, run["config"]
        assert sorted((r["session"], r["turn"]) for r in records) == [
            (s.name, k) for s in sessions for k in range(1, TURNS + 1)]
        assert all(len(r["token_times"]) == s.turns[r["turn"] - 1].reply_tokens
                   for s in sessions for r in records if r["session"] == s.name), run["config"]
        assert f["needles_checked"] == SESSIONS, run["config"]
        assert all(r["cached_tokens"] >= r["reusable_tokens"] > 0 for r in records if r["turn"] > 1), run["config"]
    offloaded = next(r for r in runs if r["config"] == "simlayerkv-offload")["figures"]["host"]
    assert offloaded["held_peak_bytes"] > 0 and offloaded["host_saved_bytes"] > 0

    text = table(runs, "sglang")
    assert all(f"| {c.name} |" in text for c in chosen)
    pngs = plots(runs, tmp_path, "smoke")
    assert all(p.stat().st_size > 0 for p in pngs)
    json.dumps(runs)  # the --out file holds these as they are
