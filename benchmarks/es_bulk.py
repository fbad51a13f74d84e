"""Benchmark: sustained documents per second from kvmscope's spool into a local Elasticsearch.

    python -m benchmarks.es_bulk [--cycles 400] [--batch 1000] [--no-write]

Starts its own node with deploy/es/es (state under /var/lib/kvmscope-es/bench,
data wiped first, stopped at the end), builds a large host's snapshot (50 VMs
with 2 libiscsi disks each, 100 storage connections, 20 iSCSI sessions),
and measures:

  1. the snapshot consumer's cost (documents built + appended + fsynced to the
     spool), per cycle: what collection pays for shipping;
  2. the sustained rate the shipper drains a pre-filled spool into the node
     (bulk ``create`` with ids, default batch size), documents/s and MB/s, and
     the shipper process's CPU time per 1000 documents.

Writes a section to docs/performance.md between "elasticsearch benchmark"
markers (other sections are left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from agent.config import Config
from agent.records.iscsi import IscsiConnection, IscsiSession, IscsiSessions
from agent.records.snapshot import Snapshot
from agent.records.tcp import HostTcpCounters
from agent.records.tcp import TcpInfo
from agent.records.tcp import StorageConnection, StorageConnections
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from agent.shipping.shipper import Shipping

ROOT = Path(__file__).resolve().parent.parent
ES = ROOT / "deploy" / "es" / "es"
NODE = Path("/var/lib/kvmscope-es/bench")
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- elasticsearch benchmark: begin -->", "<!-- elasticsearch benchmark: end -->"


def big_snapshot(seq: int, ts: float) -> Snapshot:
    vms, conns, sessions = [], [], []
    for v in range(50):
        disks = tuple(
            VmDisk(f"vd{chr(97 + d)}", "network", "iscsi", f"iqn.2025-01.io.example:vm{v}/{d}", (("198.18.0.2", 3260),),
                   "iqn.2025-01.io.example:vm{v}", d,
                   stats=DiskStats(rd_reqs=1000 * seq + v, rd_bytes=4096 * 1000 * seq, rd_time_ns=500_000 * seq * 1000,
                                   wr_reqs=500 * seq, wr_bytes=4096 * 500 * seq, wr_time_ns=800_000 * 500 * seq))
            for d in range(2))
        vms.append(Vm(f"vm{v:02d}", f"uuid-{v}", "running", 10000 + v, disks))
        for d in range(2):
            conns.append(StorageConnection("ipv4", "ESTABLISHED", "198.18.0.1", 40000 + 2 * v + d, "198.18.0.2", 3260,
                                           900000 + 2 * v + d, 10000 + v, "qemu-system-x86",
                                           TcpInfo(rtt_us=400, rttvar_us=50, total_retrans=seq % 7, snd_cwnd=10,
                                                   bytes_sent=10**6 * seq, bytes_received=10**6 * seq, rto_us=204000)))
    for s in range(20):
        sessions.append(IscsiSession(s + 1, f"iqn.2025-01.io.example:t{s}", 1, "LOGGED_IN", 120, "default", "iqn.x",
                                     f"host{s}", None, None,
                                     (IscsiConnection(f"{s + 1}:0", "198.18.0.2", 3260, None, None, 50000 + s, "up", 5, 5),),
                                     (), {"txdata_octets": seq * 1000, "rxdata_octets": seq * 2000}))
    return Snapshot(seq=seq, timestamp=ts, host="bench-host", duration_seconds=0.01, data={
        "host_tcp": HostTcpCounters(tcp={"RetransSegs": seq, "OutSegs": 1000 * seq}, tcp_ext={}),
        "libvirt": Vms(tuple(vms)),
        "storage_tcp": StorageConnections(tuple(conns)),
        "iscsi_kernel": IscsiSessions(tuple(sessions)),
    })


def es(*args) -> str:
    r = subprocess.run(["/usr/bin/python3", str(ES), *args, "--dir", str(NODE)], capture_output=True, text=True, check=True)
    return r.stdout.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=400)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)

    es("stop")
    shutil.rmtree(NODE / "data", ignore_errors=True)
    t0 = time.monotonic()
    st = json.loads(es("start", "--json"))
    startup = time.monotonic() - t0
    url = f"http://127.0.0.1:{st['port']}"
    tmp = Path(tempfile.mkdtemp(prefix="kvmscope-esbench-"))
    try:
        cfg = Config()
        e = cfg.elasticsearch
        e.enabled, e.hosts, e.spool_dir, e.namespace = True, [url], str(tmp / "spool"), "bench"
        e.batch_max_docs = a.batch
        e.spool_max_bytes = 4 * 1024**3
        sh = Shipping(cfg)
        # 1. the consumer's cost per cycle (no shipper running yet: a pre-filled spool)
        prev_ts = 1_790_000_000.0
        times = []
        for i in range(a.cycles):
            s = big_snapshot(i + 1, prev_ts + 5 * i)
            c0 = time.perf_counter()
            sh.consume(s)
            times.append(time.perf_counter() - c0)
        docs = sh.spool.pending()
        spool_bytes = sh.spool.bytes_on_disk()
        per_cycle = docs / a.cycles
        times.sort()
        # 2. drain into the node
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t1 = time.monotonic()
        sh.start()
        while sh.spool.pending() > 0 or sh.shipper._held is not None:
            time.sleep(0.05)
        drain = time.monotonic() - t1
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        h = sh.health()
        sh.stop()
        from elasticsearch import Elasticsearch

        c = Elasticsearch(url, request_timeout=60)
        c.indices.refresh(index="*-kvmscope.*-bench")
        count = c.count(index="*-kvmscope.*-bench")["count"]
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    finally:
        es("stop")
        shutil.rmtree(tmp, ignore_errors=True)
    rate = docs / drain
    res = {
        "docs": docs, "per_cycle": per_cycle, "drain_s": drain, "rate": rate, "mb_s": spool_bytes / drain / 1e6,
        "count": count, "shipped": h["shipped"], "failed": h["failed"], "bulk": h["bulk_requests"],
        "consume_p50_ms": times[len(times) // 2] * 1000, "consume_p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
        "cpu_ms_per_1000": cpu / docs * 1e6, "startup": startup, "version": st["version"],
    }
    print(json.dumps(res, indent=1))
    assert count == docs, f"{count} documents in the node, {docs} produced"
    if not a.no_write:
        section = f"""{BEGIN}
## Elasticsearch shipping (`python -m benchmarks.es_bulk`)

Measured {time.strftime('%Y-%m-%d')} on kernel {platform.release()}, {os.cpu_count()} CPUs shared with the node:
Elasticsearch {res['version']} (integ-test zip, 512 MB heap, one node on 127.0.0.1, started in {startup:.1f} s),
a host of 50 VMs x 2 libiscsi disks, 100 storage connections, 20 iSCSI sessions = {per_cycle:.0f} documents per
cycle, {a.cycles} cycles pre-spooled ({res['docs']:,} documents, {spool_bytes / 1e6:.1f} MB of spool).

| measure | value |
|---|---:|
| sustained rate, spool -> node (bulk create, {a.batch} docs/request) | **{rate:,.0f} documents/s** ({res['mb_s']:.1f} MB/s of spool) |
| bulk requests | {res['bulk']:,} |
| shipper CPU (this process) | {res['cpu_ms_per_1000']:.0f} ms per 1000 documents |
| snapshot consumer (build + append + fsync), per cycle of {per_cycle:.0f} documents | p50 {res['consume_p50_ms']:.1f} ms, p99 {res['consume_p99_ms']:.1f} ms |
| documents in the node afterwards | {count:,} of {res['docs']:,} (failed {res['failed']}) |

At a 5 s interval this host makes {per_cycle / 5:.0f} documents/s ({spool_bytes / docs:.0f} bytes each in the spool):
the default 256 MiB spool holds {256 * 1024**2 / (spool_bytes / docs) / (per_cycle / 5) / 60:.0f} minutes of outage,
and the shipper catches up on one hour of outage in about {per_cycle / 5 * 3600 / rate:.0f} s.
{END}"""
        text = DOC.read_text() if DOC.exists() else "# Performance\n\nMeasured numbers; each section says how to reproduce it.\n"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        DOC.write_text(text)
        print(f"written to {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
