"""What the agent's history holds: the agent's cycle run in-process, then its snapshots walked object by object.

    python -m benchmarks.history [--cycles 150] [--interval 1] [--no-ebpf] [--load] [--json FILE]

Runs the sources of the default configuration the way ``kvmscope run`` wires
them (bounded malloc, the garbage collector frozen after each cycle, the live
diagnosis, the /metrics server on a free loopback port, scraped every cycle)
for ``--cycles`` cycles, then reports:

* the process's RSS (anonymous / file) after the imports, after the first
  cycle and at the end, and what pymalloc holds;
* the bytes the history's snapshots hold that nothing else does, newest
  snapshot first (an object shared by several snapshots counts once, for the
  newest; what the sources keep across cycles is not counted), by source (``data:NAME``), by the memos the outputs keep on a
  snapshot (``attr:NAME``) and by health; and the object types of the probes'
  records.

``--load`` runs, for the whole run, a child that makes the probes see work:
loopback connections to port 3260 (connect, one byte, close: ten a second)
and short-lived ``dd`` processes writing with O_DIRECT (a new block-issuing
process every 1.5 s). Same load, same numbers: what to compare two versions
of the agent with (docs/performance.md, "Footprint").
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LOAD = r'''
import socket, subprocess, sys, threading, time
stop = time.time() + float(sys.argv[1])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 3260))
srv.listen(64)
def accept():
    while True:
        c, _ = srv.accept()
        c.recv(10)
        c.close()
def dd():
    while time.time() < stop:
        subprocess.run(["dd", "if=/dev/zero", "of=" + sys.argv[2], "bs=4k", "count=40", "oflag=direct,dsync"],
                       capture_output=True)
        time.sleep(1.5)
threading.Thread(target=accept, daemon=True).start()
threading.Thread(target=dd, daemon=True).start()
while time.time() < stop:
    s = socket.create_connection(("127.0.0.1", 3260))
    s.send(b"x")
    s.close()
    time.sleep(0.1)
'''


def rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                out[k] = round(int(v.split()[0]) / 1024, 1)
    return out


def pymalloc_mb() -> float | None:
    """Bytes in pymalloc's allocated blocks (sys._debugmallocstats writes to the C stderr)."""
    with tempfile.TemporaryFile("w+") as t:
        old = os.dup(2)
        os.dup2(t.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(old, 2)
            os.close(old)
        t.seek(0)
        for line in t:
            if line.startswith("# bytes in allocated blocks"):
                return round(int(line.split("=")[1].replace(",", "")) / 1e6, 1)
    return None


SKIP = ("module", "function", "builtin_function_or_method", "type")


def walk(root, seen: set[int]) -> tuple[int, collections.Counter]:
    """Bytes (sys.getsizeof) of the objects reachable from ``root`` not in ``seen`` (added to it), and by type."""
    size, types, stack = 0, collections.Counter(), [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or type(o).__name__ in SKIP:
            continue
        seen.add(id(o))
        n = sys.getsizeof(o)
        size += n
        types[type(o).__name__] += n
        stack.extend(gc.get_referents(o))
    return size, types


def held(history, outside) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """What the snapshots of ``history`` hold that ``outside`` (the sources' own state: what they keep across
    cycles) does not: bytes per part, and the object types of each eBPF source's records."""
    seen: set[int] = set()
    for o in outside:
        walk(o, seen)
    seen.add(id(history))
    parts: collections.Counter = collections.Counter()
    probe_types: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for snap in reversed(history):  # newest first
        for name, value in snap.data.items():
            n, types = walk(value, seen)
            parts["data:" + name] += n
            if name.startswith("ebpf_"):
                probe_types[name].update(types)
        parts["health"] += walk(snap.health, seen)[0]
        for name, value in vars(snap).items():
            if name not in ("data", "health"):
                parts["attr:" + name] += walk(value, seen)[0]
        parts["snapshot"] += walk(snap, seen)[0]
    return dict(parts.most_common()), {k: dict(v.most_common(8)) for k, v in probe_types.items()}


def run(cycles: int, interval: float, ebpf: bool = True, load: bool = False) -> dict:
    from agent import config as config_mod
    from agent.cli.run import _start_live_diagnosis, _start_server, bound_malloc
    from agent.engine import build_agent

    res: dict = {"cycles": cycles, "interval": interval, "ebpf": ebpf, "load": load, "rss": {"imports": rss_mb()}}
    cfg, _ = config_mod.load(None)
    bound_malloc()
    agent = build_agent(cfg)
    if not ebpf:
        agent.sources = [s for s in agent.sources if not s.name.startswith("ebpf_")]
    agent.freeze_gc = True
    live = _start_live_diagnosis(cfg, agent, None, True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.metrics.listen, cfg.api.socket = f"127.0.0.1:{port}", None
    server = _start_server(cfg, agent, None, live)
    child = None
    scratch = tempfile.NamedTemporaryFile(prefix="kvmscope-history-", dir="/var/tmp", delete=False)
    scratch.close()
    try:
        if load:
            child = subprocess.Popen([sys.executable, "-c", LOAD, str(cycles * interval + 60), scratch.name])
        cpu0 = time.process_time()
        for i in range(cycles):
            t = time.monotonic()
            agent.cycle()  # collect, with kvmscope run's garbage collector steps (freeze_gc)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            if i == 0:
                res["rss"]["first_cycle"] = rss_mb()
            time.sleep(max(0.0, interval - (time.monotonic() - t)))
        res["cpu_seconds"] = round(time.process_time() - cpu0, 2)
        res["rss"]["end"] = rss_mb()
        res["pymalloc_mb"] = pymalloc_mb()
        history = agent.history()
        res["snapshots"] = len(history)
        res["health"] = {k: h.status.value for k, h in history[-1].health.items()} if history else {}
        parts, probe_types = held(history, [agent.sources])
        res["held_mb"] = round(sum(parts.values()) / 1e6, 2)
        res["parts_mb"] = {k: round(v / 1e6, 3) for k, v in parts.items() if v}
        res["probe_types_mb"] = {k: {t: round(v / 1e6, 3) for t, v in d.items()} for k, d in probe_types.items()}
    finally:
        if child is not None:
            child.kill()
            child.wait()
        os.unlink(scratch.name)
        if server is not None:
            server.stop()
        agent.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=150)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds per cycle")
    ap.add_argument("--no-ebpf", action="store_true", help="leave the eBPF collectors out")
    ap.add_argument("--load", action="store_true", help="loopback connections to :3260 and dd writes meanwhile")
    ap.add_argument("--json", type=Path, help="write the results here as well")
    a = ap.parse_args(argv)
    res = run(a.cycles, a.interval, ebpf=not a.no_ebpf, load=a.load)
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
