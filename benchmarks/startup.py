"""Start-up of ``kvmscope run`` with the eBPF object cache cold (compiling) and warm (loaded from the cache).

    python -m benchmarks.startup [--starts 5] [--interval 5] [--no-doc]

Each start is a fresh ``kvmscope run`` (default collectors, every eBPF probe; the interval of the
footprint benchmark) with ``ebpf.cache_dir`` in a directory of the benchmark's own; it is measured as
:mod:`benchmarks.footprint` measures start-up: from just before the process is started to the end of
the first snapshot in which every eBPF collector is ``ok`` (read over the agent's API), with the CPU
seconds of the agent and of its reaped children (the compiler processes) by then; then it is stopped.
Cold and warm starts alternate (cold: the cache directory removed first, so the probes are compiled
and the entries written; warm: the entries the cold start before it wrote), so both see the same
load of this shared machine. Root needed (the probes). The section of docs/performance.md between
the "startup" markers is rewritten unless ``--no-doc``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks._doc import write_section
from benchmarks.footprint import Agent, _first_full, cpu_seconds, log

BEGIN, END = "<!-- startup: begin -->", "<!-- startup: end -->"


@dataclass
class Start:
    mode: str  # cold | warm
    seconds: float | None  # to the end of the first snapshot with every eBPF collector ok
    seq: int | None
    cpu_agent: float
    cpu_children: float
    entries: int  # cache entries there before the start
    load1: float
    ebpf: dict[str, str] = field(default_factory=dict)


def one_start(mode: str, cache: Path, interval: float) -> Start:
    if mode == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    entries = len(list(cache.glob("*.json"))) if cache.is_dir() else 0
    work = Path(tempfile.mkdtemp(prefix="kvmscope-startup-"))
    agent = Agent(work, interval, [])
    cfg = json.loads(agent.cfg.read_text())
    cfg["ebpf"] = {"cache_dir": str(cache)}
    agent.cfg.write_text(json.dumps(cfg))
    load1 = os.getloadavg()[0]
    agent.start()
    try:
        secs, seq, ebpf = _first_full(agent, 120)
        cpu = cpu_seconds(agent.proc.pid)
    finally:
        agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    st = Start(mode, secs, seq, cpu["agent"], cpu["children"], entries, load1, ebpf)
    log(f"{mode}: {secs if secs is None else round(secs, 2)} s (snapshot {seq}), CPU agent {cpu['agent']:.2f} s, "
        f"children {cpu['children']:.2f} s, {entries} entries before, load {load1:.1f}")
    return st


def run(starts: int, interval: float) -> list[Start]:
    cache = Path(tempfile.mkdtemp(prefix="kvmscope-bpfcache-"))
    os.chmod(cache, 0o700)
    out = []
    try:
        for _ in range(starts):
            for mode in ("cold", "warm"):
                out.append(one_start(mode, cache, interval))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return out


def summary(runs: list[Start], mode: str) -> dict:
    xs = [r for r in runs if r.mode == mode]
    secs = [r.seconds for r in xs if r.seconds is not None]
    return {"n": len(xs), "failed": len(xs) - len(secs),
            "median": statistics.median(secs) if secs else None, "min": min(secs, default=None),
            "max": max(secs, default=None), "cpu_agent": statistics.median(r.cpu_agent for r in xs),
            "cpu_children": statistics.median(r.cpu_children for r in xs),
            "load": (min(r.load1 for r in xs), max(r.load1 for r in xs))}


def render(runs: list[Start], interval: float) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [BEGIN, "",
           f"`python -m benchmarks.startup --starts {sum(1 for r in runs if r.mode == 'cold')}`, run {when}: "
           f"`kvmscope run` (default collectors, interval {interval:g} s) started again and again, cold (an empty "
           "`ebpf.cache_dir`: the four probes compiled by bcc in their child processes) and warm (the entries the "
           "cold start before wrote: loaded by the agent without a compiler) alternating; start-up to the end of "
           "the first snapshot with every eBPF collector ok; CPU seconds by then.", ""]
    for mode in ("cold", "warm"):
        s = summary(runs, mode)
        if s["median"] is None:
            out.append(f"* {mode}: no full snapshot in {s['n']} starts")
            continue
        out.append(f"* {mode}: median **{s['median']:.2f} s** (min {s['min']:.2f}, max {s['max']:.2f}, {s['n']} starts"
                   + (f", {s['failed']} without a full snapshot" if s["failed"] else "")
                   + f"); CPU median: agent {s['cpu_agent']:.2f} s, compiler children {s['cpu_children']:.2f} s; "
                   f"1-min load average {s['load'][0]:.1f}-{s['load'][1]:.1f}")
    out += ["", "| start | mode | start-up (s) | snapshot | CPU agent (s) | CPU compilers (s) | entries before | load |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(runs, 1):
        secs = f"{r.seconds:.2f}" if r.seconds is not None else "-"
        out.append(f"| {i} | {r.mode} | {secs} | {r.seq if r.seq is not None else '-'} | {r.cpu_agent:.2f} | "
                   f"{r.cpu_children:.2f} | {r.entries} | {r.load1:.1f} |")
    out += ["", END]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=5, help="cold and as many warm starts (default 5 each)")
    ap.add_argument("--interval", type=float, default=5.0, help="agent interval (the footprint benchmark's)")
    ap.add_argument("--results", type=Path, help="write the results as JSON here")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    a = ap.parse_args(argv)
    runs = run(a.starts, a.interval)
    section = render(runs, a.interval)
    print(section)
    if a.results:
        a.results.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    if not a.no_doc:
        write_section(section, BEGIN, END)
    warm = summary(runs, "warm")
    return 0 if warm["median"] is not None and not warm["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
