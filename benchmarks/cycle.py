"""Benchmark of one whole collection cycle at scale: 200 VMs x 4 disks, 400 storage connections.

    python -m benchmarks.cycle [--vms 200] [--disks 4] [--cycles 20] [--profile FILE] [--no-ebpf] [--no-write]
                               [--dump RECORDING]

What runs (root; everything inside a network namespace of its own, made
with ``unshare --net``, so the only addresses are its loopback's):

* libvirt's test driver (``test:///<generated XML>``, in-process, no
  libvirtd) with ``--vms`` running domains of ``--disks`` libiscsi disks each
  (``<disk type='network'><source protocol='iscsi'>`` on portals
  127.0.0.2:3260 and 127.0.0.3:3260). The test driver's bulk stats carry only
  the state group (libvirt 9.0), so the benchmark adds each disk's
  ``block.<n>.*`` counters (advancing every cycle) to the records the driver
  returns: the agent parses exactly what libvirtd's qemu driver hands it;
* one real QEMU process per domain (``qemu-system-x86_64 -machine none -S``,
  the domain's ``-uuid`` and ``-name``), root-owned as libvirt's are, each
  holding two real TCP connections (``-chardev socket``) to a listener on
  those two portals: 400 connections with tcp_info from inet_diag, owned by
  the QEMU processes in /proc, joined to the VMs' disks;
* the agent as ``kvmscope run`` wires it (the same helpers of
  :mod:`agent.cli.run`): every default source (eBPF probes included unless
  ``--no-ebpf``), the storage-path join, the Elasticsearch spool append
  (the node is absent: documents stay in the spool, as during an outage),
  the live diagnosis and the /metrics prerender.

Measured: the process CPU time of each cycle (every thread) over
``--cycles`` cycles after two warm-up cycles (the first reads every domain's
XML and scans /proc for socket owners once), and the CPU of each part: each
source's ``collect()`` in its own thread (thread CPU time), the join, each
snapshot consumer. ``--profile`` writes a cProfile of a few cycles with the
sources run in the profiled thread.

Aim (issue 17): <= 60 ms of CPU per cycle; a fresh /metrics render <= 20 ms.
Results go to docs/performance.md between the "cycle benchmark" markers.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from concurrent.futures import Future
from pathlib import Path

from benchmarks._doc import write_section

BEGIN, END = "<!-- cycle benchmark: begin -->", "<!-- cycle benchmark: end -->"
PORTALS = ("127.0.0.2", "127.0.0.3")
QEMU = "/usr/bin/qemu-system-x86_64"
NETNS_ENV = "KVMSCOPE_BENCH_NETNS"


def log(msg: str) -> None:
    print(f"cycle-bench {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


RUN = uuidlib.uuid4().hex  # this run's domains: two runs side by side (the machine is shared) must not claim
# each other's UUIDs, or every VM has two trusted QEMU processes (ambiguous: no pid, no storage path joined)


def domain_uuid(i: int) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"vm{i:04d}.{RUN}.kvmscope-bench"))


def test_driver_xml(n_vms: int, disks: int) -> str:
    """A libvirt test-driver <node> of ``n_vms`` running domains with ``disks`` libiscsi disks each."""
    out = ["<node>"]
    for i in range(n_vms):
        devs = []
        for k in range(disks):
            iqn = f"iqn.2025-01.io.example:vm{i:04d}-{k}"
            devs.append(
                f"<disk type='network' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/>"
                f"<source protocol='iscsi' name='{iqn}/1'><host name='{PORTALS[k % 2]}' port='3260'/></source>"
                f"<target dev='vd{chr(97 + k)}' bus='virtio'/></disk>")
        out.append(f"<domain type='test'><name>vm{i:04d}</name><uuid>{domain_uuid(i)}</uuid>"
                   f"<memory>65536</memory><vcpu>1</vcpu><os><type>hvm</type></os>"
                   f"<devices>{''.join(devs)}</devices></domain>")
    out.append("</node>")
    return "\n".join(out)


class StatsConn:
    """The test driver's connection, with each domain's ``block.<n>.*`` added to its bulk stats
    (counters that advance every call, as a busy host's do)."""

    def __init__(self, conn, disks: int):
        self._conn, self._disks, self._calls = conn, disks, 0

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def getAllDomainStats(self, groups, flags):  # noqa: N802 (libvirt's name)
        self._calls += 1
        t = self._calls
        out = []
        for dom, stats in self._conn.getAllDomainStats(groups, flags):
            stats = dict(stats)
            base = dom.ID() * 1000
            stats["block.count"] = self._disks
            for k in range(self._disks):
                p = f"block.{k}."
                n = base + 7 * k + 40 * t
                stats.update({p + "name": f"vd{chr(97 + k)}", p + "rd.reqs": n, p + "rd.bytes": 4096 * n,
                              p + "rd.times": 400_000 * n, p + "wr.reqs": n // 2, p + "wr.bytes": 8192 * n,
                              p + "wr.times": 900_000 * n, p + "fl.reqs": n // 10, p + "fl.times": 100_000 * n})
            out.append((dom, stats))
        return out


class Portals:
    """Listeners on the portals that accept and hold every connection (the storage side)."""

    def __init__(self):
        self.socks = []
        self.conns: list[socket.socket] = []
        for addr in PORTALS:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, 3260))
            s.listen(1024)
            self.socks.append(s)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s):
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        for s in self.socks + self.conns:
            s.close()


def start_qemus(n_vms: int, portals: Portals) -> list[subprocess.Popen]:
    procs = []
    for i in range(n_vms):
        argv = [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S",
                "-name", f"guest=vm{i:04d},debug-threads=on", "-uuid", domain_uuid(i)]
        for j, addr in enumerate(PORTALS):
            argv += ["-chardev", f"socket,id=portal{j},host={addr},port=3260"]
        procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    want = n_vms * len(PORTALS)
    end = time.monotonic() + 120
    while len(portals.conns) < want and time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a QEMU process exited at start: "
                               + " ".join(str(p.args) for p in procs if p.poll() is not None)[:400])
        time.sleep(0.2)
    if len(portals.conns) < want:
        raise RuntimeError(f"only {len(portals.conns)} of {want} connections after 120 s")
    return procs


def stop_qemus(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def build(args, work: Path):
    """The agent wired as ``kvmscope run`` wires it; returns (agent, parts, server, shipping)."""
    from agent.cli import run as run_cmd
    from agent.config import Config

    xml = work / "domains.xml"
    xml.write_text(test_driver_xml(args.vms, args.disks))
    cfg = Config()
    cfg.libvirt.uri = f"test://{xml}"
    cfg.metrics.listen = "127.0.0.1:9847"  # our own network namespace: free
    cfg.api.socket = str(work / "api.sock")
    cfg.elasticsearch.enabled = True
    cfg.elasticsearch.hosts = ["http://127.0.0.1:9"]  # nothing listens: an outage, documents stay spooled
    cfg.elasticsearch.spool_dir = str(work / "spool")
    cfg.storage_log.state_dir = str(work / "storage_log")
    cfg.storage_log.qemu_logs = [str(work / "qemu-logs" / "*.log")]
    if args.no_ebpf:
        cfg.agent.collectors.disable = ["ebpf_block_io", "ebpf_tcp_retrans", "ebpf_tcp_lifecycle"]
    agent = run_cmd.build_agent(cfg, owns_state=True)
    agent.freeze_gc = True  # as kvmscope run sets it (agent/loop.py, garbage collection)
    # cycles follow each other every --gap seconds, but their snapshots are stamped as if 5 s apart (the
    # default interval), so the live diagnosis' 60 s window holds the 12 snapshots it holds on a host
    t0, seq = time.time(), iter(range(1 << 30))
    agent._clock = lambda: t0 + cfg.agent.interval * next(seq)
    for src in agent.sources:
        if src.name == "libvirt":
            orig = src._connect
            src._connect = lambda libvirt, orig=orig, src=src: (
                c if isinstance(c := orig(libvirt), StatsConn) else _wrap(src, c, args.disks))
    shipping = run_cmd._start_shipping(cfg, agent)
    live = run_cmd._start_live_diagnosis(cfg, agent, shipping, quiet=True)
    server = run_cmd._start_server(cfg, agent, shipping, live)
    agent.on_snapshot.insert(0, shared_values)
    return agent, shipping, server


def shared_values(snap) -> None:
    """The snapshot's values computed on first use that several consumers read (the storage-path join, the
    VM disks' latency join, the connections' formatted names): computed here first, so their cost is a
    part of its own instead of landing in whichever consumer asks first (shipping, the first one)."""
    snap.paths
    snap.vm_disk_latency
    snap.vm_by_pid
    for c in snap.storage_tcp.connections if snap.storage_tcp else ():
        c.four_tuple
        c.portal


def _wrap(src, conn, disks):
    src._conn = StatsConn(conn, disks)
    return src._conn


class PartTimer:
    """Thread CPU seconds of each source's collect() and each snapshot consumer, per cycle."""

    def __init__(self, agent):
        self.cpu: dict[str, list[float]] = {}
        self._cur: dict[str, float] = {}
        self._gc_start: dict[int, float] = {}
        self.kept = 0
        gc.callbacks.append(self._gc)
        for src in agent.sources:
            src.collect = self._wrap(f"source {src.name}", src.collect)
        agent.on_snapshot[:] = [self._wrap(f"consumer {_consumer_name(cb)}", cb) for cb in agent.on_snapshot]

    def _wrap(self, label, fn):
        def timed(*a, **kw):
            c0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self._cur[label] = self._cur.get(label, 0.0) + time.thread_time() - c0
        return timed

    def _gc(self, phase, info):
        """The cyclic garbage collector's pauses (thread CPU), wherever they fall (they are also inside
        the part that triggered them)."""
        tid = threading.get_ident()
        if phase == "start":
            self._gc_start[tid] = time.thread_time()
        elif tid in self._gc_start:
            label = f"(within the above) garbage collector, generation {info['generation']}"
            self._cur[label] = self._cur.get(label, 0.0) + time.thread_time() - self._gc_start.pop(tid)

    def close(self):
        gc.callbacks.remove(self._gc)

    def end_cycle(self, keep: bool):
        if keep:
            for k in self.cpu.keys() | self._cur.keys():
                self.cpu.setdefault(k, [0.0] * self.kept).append(self._cur.get(k, 0.0))
            self.kept += 1
        self._cur = {}


def _consumer_name(cb) -> str:
    if cb is shared_values:
        return "the snapshot's shared values (storage-path join, disk latency join, connection names)"
    owner = getattr(cb, "__self__", None)
    if owner is not None:
        return {"Shipping": "shipping (ES documents + spool append)", "LiveDiagnosis": "live diagnosis",
                "MetricsServer": "/metrics prerender"}.get(type(owner).__name__, type(owner).__name__)
    return getattr(cb, "__qualname__", repr(cb))


def run_inline(agent):
    """Run the sources in the calling thread (for the profiler, which sees one thread)."""
    def _start(src):
        fut = Future()
        fut.set_running_or_notify_cancel()
        fut.set_result(agent._run_source(src))
        return fut
    agent._start = _start


def cycle(agent) -> None:
    """One cycle as Agent.run does it (Agent.cycle: collect, the sources, join, consumers, with the garbage
    collector's step)."""
    agent.cycle()


def full_gc(agent) -> tuple[float, int]:
    """CPU seconds of the full collection kvmscope run does every GC_FULL_EVERY cycles, and its cycles."""
    from agent import loop

    c0 = time.thread_time()
    gc.unfreeze()
    gc.collect()
    t = time.thread_time() - c0
    gc.freeze()
    agent._since_full_gc = 0
    return t, loop.GC_FULL_EVERY


def measure(args, work: Path) -> dict:
    from agent.records.paths import build_paths

    agent, shipping, server = build(args, work)
    timer = PartTimer(agent)
    try:
        warm = max(2, args.fill if args.fill is not None else agent._history.maxlen)
        log(f"{warm} warm-up cycles (XML parse, socket owner scan, probe compile; the history filled as on a "
            "host that runs for 10 minutes)")
        for _ in range(warm):
            cycle(agent)
            timer.end_cycle(False)
        snap = agent.latest
        vms, disks = len(snap.vms), sum(len(v.disks) for v in snap.vms)
        conns = len(snap.storage_tcp.connections) if snap.storage_tcp else 0
        joined = sum(1 for p in snap.paths if getattr(p, "connection", None) is not None)
        health = {n: (h.status.value, h.reason) for n, h in snap.health.items()}
        cpu, wall = [], []
        log(f"{vms} VMs, {disks} disks, {conns} storage connections, {joined} paths with a connection; "
            f"{args.cycles} measured cycles")
        for _ in range(args.cycles):
            c0, w0 = time.process_time(), time.perf_counter()
            cycle(agent)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            timer.end_cycle(True)
            time.sleep(args.gap)
        gc_full = full_gc(agent) if agent.freeze_gc else None
        if args.dump:  # the history as a recording: benchmarks/diagnosis.py replays it through the live diagnosis
            from agent.codec import dump_recording

            with open(args.dump, "w") as fp:
                dump_recording(list(agent.history()), fp)
            log(f"history ({len(agent.history())} snapshots) written to {args.dump}")
        # the join alone, on the last snapshot (a fresh join each time)
        snap = agent.latest
        jt = []
        for _ in range(args.cycles):
            c0 = time.thread_time()
            build_paths(snap)
            jt.append(time.thread_time() - c0)
        # a fresh render alone (the prerender of a new snapshot: the last two cycles' snapshots in turn, each
        # rendered after the other, as the prerender sees them: counters advanced, joined in their cycle), and a
        # scrape of the cached text
        col = server.collector
        rt, st = [], []
        pair = agent.history()[-2:]
        current = {"s": pair[0]}
        orig_latest = col._latest
        col._latest = lambda: current["s"]
        col.exposition()
        render_prof = cProfile.Profile(time.thread_time) if args.profile else None
        for i in range(args.cycles):
            current["s"] = pair[(i + 1) % 2]
            c0 = time.thread_time()
            if render_prof is not None and i >= args.cycles // 2:
                render_prof.enable()
            body = col.exposition()
            if render_prof is not None:
                render_prof.disable()
            rt.append(time.thread_time() - c0)
            c0 = time.thread_time()
            col.exposition()
            st.append(time.thread_time() - c0)
        if render_prof is not None:
            rt = rt[: args.cycles // 2]  # the profiled renders are slower: not in the numbers
            st = st[: args.cycles // 2]
        col._latest = orig_latest
        samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        prof = None
        if args.profile:
            log(f"profiling {args.profile_cycles} cycles with the sources inline")
            run_inline(agent)
            pr = cProfile.Profile(time.thread_time)  # CPU, not wall (the spool fsync waits)
            pr.enable()
            for _ in range(args.profile_cycles):
                agent.collect_once()
            pr.disable()
            timer.end_cycle(False)
            pr.dump_stats(args.profile)
            prof = pstats.Stats(args.profile)
        return {"cpu": cpu, "wall": wall, "parts": timer.cpu, "join": jt, "render": rt, "scrape": st,
                "vms": vms, "disks": disks, "conns": conns, "joined": joined, "health": health,
                "samples": samples, "bytes": len(body), "prof": prof, "warm": warm, "gc_full": gc_full,
                "render_prof": (pstats.Stats(render_prof), args.cycles - args.cycles // 2) if render_prof else None}
    finally:
        timer.close()
        if shipping is not None:
            shipping.stop(0.5)
        if server is not None:
            server.stop()
        agent.close()


def ms(s: float) -> str:
    return f"{s * 1000:.1f} ms"


def top_functions(prof: pstats.Stats, cycles: int, n: int = 15) -> list[str]:
    """The functions with the most own time (tottime) per cycle."""
    rows = []
    for (path, line, func), (_cc, ncalls, tt, ct, _callers) in prof.stats.items():
        short = path.split("/agent/", 1)[-1] if "/agent/" in path else os.path.basename(path)
        if "/agent/" in path:
            short = "agent/" + short
        rows.append((tt, ct, ncalls, f"{short}:{line} {func}"))
    rows.sort(reverse=True)
    return [f"| `{name}` | {tt / cycles * 1000:.2f} | {ct / cycles * 1000:.2f} | {nc // cycles} |"
            for tt, ct, nc, name in rows[:n]]


def report(args, r: dict) -> str:
    parts = sorted(r["parts"].items(), key=lambda kv: ("(within" in kv[0], -statistics.fmean(kv[1])))

    def row(label, v, bold=False):
        b = "**" if bold else ""
        return f"| {label} | {b}{ms(statistics.fmean(v))}{b} | {ms(statistics.median(v))} | {ms(max(v))} |"

    lines = [
        BEGIN,
        "## One collection cycle at scale (`python -m benchmarks.cycle`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on kernel {platform.release()}, "
        f"{os.cpu_count()} CPUs (1-min load average {os.getloadavg()[0]:.1f} at the end), Python "
        f"{platform.python_version()}: {r['vms']} libvirt domains (test driver, block counters added) x "
        f"{args.disks} libiscsi disks = {r['disks']} disks, {r['vms']} real QEMU processes (`-machine none`) "
        f"holding {r['conns']} real TCP connections to two portals on loopback ({r['joined']} storage paths "
        f"joined to a connection), eBPF probes {'off' if args.no_ebpf else 'loaded'}, ES spool append, live "
        f"diagnosis, /metrics prerender; {args.cycles} cycles after {r['warm']} warm-up cycles (a full history). Aim: <= 60 ms CPU per "
        "cycle; fresh render <= 20 ms.",
        "",
        "| measure | mean | p50 | max |",
        "|---|---:|---:|---:|",
        row("**CPU per cycle (whole process)**", r["cpu"], bold=True),
        row("wall time per cycle", r["wall"]),
        *(row(label, v) for label, v in parts),
        row("storage-path join (`snap.paths`, in the cycle)", r["join"]),
        row("**fresh /metrics render** (the next cycle's snapshot, joined in its cycle)", r["render"], bold=True),
        row("scrape of the rendered snapshot", r["scrape"]),
        "",
        f"Exposition: {r['bytes'] / 1024:.0f} KiB, {r['samples']} samples. Sources' CPU is thread CPU time "
        "inside `collect()`; the parts run in parallel threads, the cycle CPU counts every thread of the "
        "process (the sources' thread start-up and the loop itself included).",
    ]
    if r["gc_full"]:
        t, every = r["gc_full"]
        lines += ["", f"The full garbage collection `kvmscope run` does every {every} cycles (agent/loop.py; the "
                  f"cycles above freeze what they leave alive, the collector off while they run): {ms(t)} once, "
                  f"{ms(t / every)} per cycle on average."]
    bad = {n: h for n, h in r["health"].items() if h[0] == "failed"}
    if bad:
        lines += ["", "Failed sources in the run: " + "; ".join(f"{n} ({h[1]})" for n, h in sorted(bad.items()))]
    if r["prof"] is not None:
        lines += ["", f"Profile (cProfile, {args.profile_cycles} cycles with the sources run inline), the functions "
                  "with the most own time, per cycle:", "",
                  "| function | own ms | cumulative ms | calls |", "|---|---:|---:|---:|",
                  *top_functions(r["prof"], args.profile_cycles)]
    if r.get("render_prof") is not None:
        rp, n = r["render_prof"]
        lines += ["", f"Profile of the fresh render alone (cProfile, {n} renders), the functions with the most own "
                  "time, per render:", "",
                  "| function | own ms | cumulative ms | calls |", "|---|---:|---:|---:|", *top_functions(rp, n, 10)]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--disks", type=int, default=4)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between measured cycles")
    ap.add_argument("--profile", default=None, help="write a cProfile of --profile-cycles cycles here")
    ap.add_argument("--profile-cycles", type=int, default=5)
    ap.add_argument("--fill", type=int, default=None,
                    help="warm-up cycles before measuring (default: agent.history, 120: a full history)")
    ap.add_argument("--no-ebpf", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the main numbers here as JSON (tests/integration)")
    ap.add_argument("--dump", type=Path, help="write the agent's history here as a recording (benchmarks/diagnosis.py)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.cycle needs root (a network namespace, QEMU processes owned by root)", file=sys.stderr)
        return 2
    if os.environ.get(NETNS_ENV) != "1":
        env = dict(os.environ, **{NETNS_ENV: "1"})
        return subprocess.call(["unshare", "--net", "--", sys.executable, "-m", "benchmarks.cycle", *sys.argv[1:]]
                               if argv is None else
                               ["unshare", "--net", "--", sys.executable, "-m", "benchmarks.cycle", *argv], env=env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = Path(tempfile.mkdtemp(prefix="kvmscope-cycle-"))
    portals = Portals()
    procs: list = []
    try:
        log(f"starting {args.vms} QEMU processes")
        procs = start_qemus(args.vms, portals)
        r = measure(args, work)
    finally:
        stop_qemus(procs)
        portals.close()
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, r)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({
            "cpu_ms": [round(c * 1000, 3) for c in r["cpu"]], "render_ms": [round(c * 1000, 3) for c in r["render"]],
            "parts_ms": {k: round(statistics.fmean(v) * 1000, 3) for k, v in r["parts"].items()},
            "vms": r["vms"], "disks": r["disks"], "conns": r["conns"], "joined": r["joined"],
            "samples": r["samples"], "health": r["health"]}))
    if not args.no_write:
        write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
