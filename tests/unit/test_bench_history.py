"""benchmarks/history.py: what the history holds, counted once per object and newest first; and a short run of
the agent's real sources in-process (no eBPF: the probes need root and their own tests)."""

from __future__ import annotations

import sys

from benchmarks.history import held, run, walk
from agent.records.snapshot import Snapshot


def test_an_object_shared_by_snapshots_counts_once_for_the_newest():
    shared = tuple(range(1000, 1100))  # one record two snapshots hold
    old = Snapshot(1, 0.0, "h", 0.0, data={"src": (shared, "x" * 500)})
    new = Snapshot(2, 5.0, "h", 0.0, data={"src": (shared,)})
    new.__dict__["_memo"] = [1.5, 2.5]  # a memo an output keeps on the snapshot
    parts, _ = held([old, new], [])
    big = walk(shared, set())[0]  # the tuple and its ints
    assert parts["data:src"] >= big + sys.getsizeof("x" * 500)
    assert parts["data:src"] < 2 * big + 1000  # not counted twice
    assert parts["attr:_memo"] > 0
    kept = held([old, new], [shared])[0]  # held by a source's own state: not the history's
    assert kept["data:src"] < big


def test_a_short_run_reports_rss_and_what_the_history_holds():
    res = run(3, 0.1, ebpf=False)
    assert res["snapshots"] == 3 and res["health"]["host_tcp"] == "ok"
    assert res["rss"]["end"]["VmRSS"] > 10 and res["pymalloc_mb"] > 1
    assert res["held_mb"] > 0 and "data:host_tcp" in res["parts_mb"] and "health" in res["parts_mb"]
