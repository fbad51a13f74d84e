"""Benchmark of /metrics: render time and size for a big synthetic host.

    python -m benchmarks.exporter [--vms 200] [--disks 4] [--conns 400] [--runs 30] [--no-write]

Builds one snapshot of a host with VMS libvirt VMs x DISKS libiscsi disks,
CONNS storage TCP connections (with tcp_info, joined to the disks as the
lab's are) and the agent's own health, then renders it through the real
registry (every renderer, the storage-path join, the series caps) as a
scrape does: ``generate_latest``, and over HTTP from a running
MetricsServer. Aim: under 50 ms per scrape. Results are written to
docs/performance.md between the "exporter benchmark" markers.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.exposition import generate_latest

from agent.exporters.prometheus import MetricsServer, make_registry
from agent.model import Snapshot, SourceHealth, Status
from agent.sources._vm_records import DiskStats, Vm, VmDisk, Vms
from agent.sources.netlink_diag import TcpInfo
from agent.sources.storage_tcp import StorageConnection, StorageConnections

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- exporter benchmark: begin -->", "<!-- exporter benchmark: end -->"


def synthetic_snapshot(n_vms: int = 200, disks: int = 4, n_conns: int = 400) -> Snapshot:
    vms, conns, c = [], [], 0
    for i in range(n_vms):
        ds = []
        for k in range(disks):
            portal = (f"10.0.{k % 2}.5", 3260)
            iqn = f"iqn.2025-01.io.example:vm{i:04d}-{k}"
            stats = DiskStats(rd_reqs=1000 * i + k, rd_bytes=4096 * i, rd_time_ns=10**6 * i, wr_reqs=500 * i,
                              wr_bytes=8192 * i, wr_time_ns=2 * 10**6 * i, fl_reqs=i, fl_time_ns=10**5 * i)
            ds.append(VmDisk(f"vd{chr(97 + k)}", "network", "iscsi", f"{iqn}/1", (portal,), iqn, 1, stats=stats))
        vms.append(Vm(f"vm{i:04d}", None, "running", 10_000 + i, tuple(ds)))
    for j in range(n_conns):
        info = TcpInfo(rtt_us=400 + j, rttvar_us=50, rto_us=204_000, snd_cwnd=10, unacked=0, lost=0, backoff=0,
                       total_retrans=j % 7, bytes_sent=10**6 * j, bytes_received=10**6 * j, bytes_retrans=0,
                       last_data_recv_ms=5)
        conns.append(StorageConnection("ipv4", "ESTABLISHED", f"10.0.{j % 2}.10", 40_000 + j, f"10.0.{j % 2}.5", 3260,
                                       100_000 + j, 10_000 + c, "qemu-system-x86", info))
        c += 1
    health = {n: SourceHealth(n, Status.OK, 0.01) for n in ("libvirt", "storage_tcp", "host_tcp")}
    return Snapshot(1, time.time(), "bench", 0.2, data={"libvirt": Vms(tuple(vms)),
                                                          "storage_tcp": StorageConnections(tuple(conns))},
                    health=health)


def measure(args) -> dict:
    snap = synthetic_snapshot(args.vms, args.disks, args.conns)
    reg = make_registry(lambda: snap)
    generate_latest(reg)  # warm-up (imports, renderer discovery)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        body = generate_latest(reg)
        times.append(time.perf_counter() - t0)
    samples = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    srv = MetricsServer("127.0.0.1", 0, lambda: snap).start()
    http_times = []
    try:
        url = f"http://127.0.0.1:{srv.address[1]}/metrics"
        urllib.request.urlopen(url, timeout=10).read()
        for _ in range(args.runs):
            t0 = time.perf_counter()
            urllib.request.urlopen(url, timeout=10).read()
            http_times.append(time.perf_counter() - t0)
    finally:
        srv.stop()
    return {"render_p50": statistics.median(times), "render_max": max(times), "http_p50": statistics.median(http_times),
            "http_max": max(http_times), "bytes": len(body), "samples": samples}


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
        f"(tcp_info), every renderer, the storage-path join and the series caps; {args.runs} scrapes. Aim: < 50 ms.",
        "",
        "| measure | p50 | max |",
        "|---|---:|---:|",
        f"| render (generate_latest) | {ms(r['render_p50'])} | {ms(r['render_max'])} |",
        f"| HTTP GET /metrics on loopback | {ms(r['http_p50'])} | {ms(r['http_max'])} |",
        "",
        f"Exposition: {r['bytes'] / 1024:.0f} KiB, {r['samples']} samples.",
        END,
    ]) + "\n"
    print(text)
    if not args.no_write:
        old = DOC.read_text() if DOC.exists() else "# Performance\n\n"
        if BEGIN in old and END in old:
            new = old[: old.index(BEGIN)] + text.rstrip("\n") + old[old.index(END) + len(END):]
        else:
            new = old.rstrip("\n") + "\n\n" + text
        DOC.write_text(new)
        print(f"written to {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
