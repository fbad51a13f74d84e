"""Benchmark of /metrics: render time and size for a big synthetic host.

    python -m benchmarks.exporter [--vms 200] [--disks 4] [--conns 400] [--runs 30] [--no-write]

Builds one snapshot of a host with VMS libvirt VMs x DISKS libiscsi disks,
CONNS storage TCP connections (with tcp_info, joined to the disks as the
lab's are) and the agent's own health, then renders it as the server's
/metrics does (SnapshotCollector.exposition: every renderer, the
storage-path join, the series caps, the text writer):

* fresh snapshot: every scrape sees the next cycle's Snapshot, every disk's
  and connection's counters advanced (a busy host): the first scrape after
  each collection cycle. The storage-path join is in it (as when nothing
  joined the snapshot before); "join done" is the agent's case (the cycle
  joins before its consumers run);
* same snapshot: repeated scrapes of one snapshot (Prometheus HA pairs,
  several scrapers, a scrape interval shorter than the agent's), which
  re-render only the snapshot age, the live renderers and the cap counters;
* prometheus_client's generate_latest over the same collector, fresh
  snapshots (for comparison: its generic text writer);
* HTTP GET /metrics on loopback from a running MetricsServer.

Aim (issue 17): a fresh render <= 20 ms. Results are written to docs/performance.md
between the "exporter benchmark" markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.exposition import generate_latest

from benchmarks._doc import write_section
from agent.exporters.collector import SnapshotCollector, make_registry
from agent.exporters.server import MetricsServer
from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.records.tcp import TcpInfo
from agent.records.tcp import StorageConnection, StorageConnections
from agent.records.vms import DiskStats, Vm, VmDisk, Vms

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- exporter benchmark: begin -->", "<!-- exporter benchmark: end -->"


def synthetic_snapshot(n_vms: int = 200, disks: int = 4, n_conns: int = 400, tick: int = 0) -> Snapshot:
    """The host after ``tick`` cycles: every disk's and connection's counters advanced by ``tick`` (a busy host)."""
    vms, conns, c = [], [], 0
    t = tick
    for i in range(n_vms):
        ds = []
        for k in range(disks):
            portal = (f"10.0.{k % 2}.5", 3260)
            iqn = f"iqn.2025-01.io.example:vm{i:04d}-{k}"
            stats = DiskStats(rd_reqs=1000 * i + k + 40 * t, rd_bytes=4096 * (i + 40 * t), rd_time_ns=10**6 * (i + t),
                              wr_reqs=500 * i + 20 * t, wr_bytes=8192 * (i + 20 * t), wr_time_ns=2 * 10**6 * (i + t),
                              fl_reqs=i + t, fl_time_ns=10**5 * (i + t))
            ds.append(VmDisk(f"vd{chr(97 + k)}", "network", "iscsi", f"{iqn}/1", (portal,), iqn, 1, stats=stats))
        vms.append(Vm(f"vm{i:04d}", None, "running", 10_000 + i, tuple(ds)))
    for j in range(n_conns):
        info = TcpInfo(rtt_us=400 + j, rttvar_us=50, rto_us=204_000, snd_cwnd=10, unacked=0, lost=0, backoff=0,
                       total_retrans=j % 7, bytes_sent=10**6 * j + 4096 * t, bytes_received=10**6 * j + 8192 * t,
                       bytes_retrans=0,
                       last_data_recv_ms=5)
        conns.append(StorageConnection("ipv4", "ESTABLISHED", f"10.0.{j % 2}.10", 40_000 + j, f"10.0.{j % 2}.5", 3260,
                                       100_000 + j, 10_000 + c, "qemu-system-x86", info))
        c += 1
    health = {n: SourceHealth(n, Status.OK, 0.01) for n in ("libvirt", "storage_tcp", "host_tcp")}
    return Snapshot(1, time.time(), "bench", 0.2, data={"libvirt": Vms(tuple(vms)),
                                                          "storage_tcp": StorageConnections(tuple(conns))},
                    health=health)


def _timed(fn, runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this process) seconds of ``runs`` calls: on a busy machine the CPU time is the steadier."""
    wall, cpu = [], []
    for i in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def measure(args) -> dict:
    base = synthetic_snapshot(args.vms, args.disks, args.conns)
    fresh = [dataclasses.replace(synthetic_snapshot(args.vms, args.disks, args.conns, tick=1 + i), seq=base.seq + 1 + i)
             for i in range(args.runs + 1)]
    joined = [dataclasses.replace(synthetic_snapshot(args.vms, args.disks, args.conns, tick=1000 + i),
                                  seq=base.seq + 1000 + i) for i in range(args.runs + 1)]
    for s in joined:
        s.paths  # noqa: B018 (joined before the render, as the agent's cycle does)
    current = {"snap": base}
    col = SnapshotCollector(lambda: current["snap"])
    body = col.exposition()  # warm-up (imports, renderer discovery)

    def scrape_fresh(i):
        current["snap"] = fresh[i]
        col.exposition()

    fresh_times = _timed(scrape_fresh, args.runs)

    def scrape_joined(i):
        current["snap"] = joined[i]
        col.exposition()

    joined_times = _timed(scrape_joined, args.runs)
    current["snap"] = base
    col.exposition()
    same_times = _timed(lambda i: col.exposition(), args.runs)
    reg = make_registry(lambda: current["snap"])

    def generate_fresh(i):
        current["snap"] = fresh[i]
        generate_latest(reg)

    gl_times = _timed(generate_fresh, args.runs)
    samples = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    srv = MetricsServer("127.0.0.1", 0, lambda: base).start()
    try:
        url = f"http://127.0.0.1:{srv.address[1]}/metrics"
        urllib.request.urlopen(url, timeout=10).read()
        http_times = _timed(lambda i: urllib.request.urlopen(url, timeout=10).read(), args.runs)
    finally:
        srv.stop()
    return {"fresh": fresh_times, "joined": joined_times, "same": same_times, "generate_latest": gl_times, "http": http_times,
            "bytes": len(body), "samples": samples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--disks", type=int, default=4)
    ap.add_argument("--conns", type=int, default=400)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    r = measure(args)
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    text = "\n".join([
        BEGIN,
        "## /metrics render (`python -m benchmarks.exporter`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on kernel {platform.release()}, Python {platform.python_version()}: "
        f"a synthetic host of {args.vms} VMs x {args.disks} libiscsi disks and {args.conns} storage connections "
        f"(tcp_info), every renderer, the storage-path join, the series caps and the text writer; {args.runs} scrapes "
        "each. Aim (issue 17): a fresh render <= 20 ms.",
        "",
        "| measure | p50 | max | CPU p50 |",
        "|---|---:|---:|---:|",
        *(f"| {label} | {ms(statistics.median(r[key][0]))} | {ms(max(r[key][0]))} | {ms(statistics.median(r[key][1]))} |"
          for key, label in (
            ("fresh", "render, fresh snapshot (first scrape after a cycle), storage-path join included"),
            ("joined", "render, fresh snapshot, joined before (the agent's prerender)"),
            ("same", "render, same snapshot again (cached text)"),
            ("generate_latest", "prometheus_client generate_latest, fresh snapshot"),
            ("http", "HTTP GET /metrics on loopback, same snapshot"))),
        "",
        f"Machine load during the run (1-min load average, {os.cpu_count()} CPUs): {os.getloadavg()[0]:.2f}.",
        "",
        f"Exposition: {r['bytes'] / 1024:.0f} KiB, {r['samples']} samples.",
        END,
    ]) + "\n"
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
