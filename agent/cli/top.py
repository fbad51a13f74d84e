"""`kvmscope top`: VM disks ranked by latency, live, with their path's health."""

from __future__ import annotations

import sys
import time

import typer

from agent.cli import app, examples
from agent.cli.common import attached_snapshots, clean, load_config, print_json
from agent.diagnose.window import Window, build_window
from agent.engine import build_agent
from agent.records.disk_latency import disk_percentiles
from agent.records.snapshot import Snapshot, Status

TOP_SOURCES = ["libvirt", "qmp", "storage_tcp", "iscsi_kernel", "block_devices", "net_ifaces", "host_tcp",
               "ebpf_libiscsi", "ebpf_block_io"]
PROBE_WARMUP_SECONDS = 20.0  # in-process: how long the first sample waits for the probes to compile


def _percentiles(prev, snap) -> dict:
    """(vm, disk) -> DiskPercentiles over the interval between the two snapshots (agent/records/disk_latency.py)."""
    if snap is None:
        return {}
    return disk_percentiles(prev.vm_disk_latency if prev is not None else None, snap.vm_disk_latency)


def top_rows(w: Window, prev=None, snap=None) -> list[dict]:
    """One row per VM disk: latency over the interval, load, and its path's health."""
    pct = _percentiles(prev, snap) if prev is not None else {}
    conns = {(c.vm, c.disk): c for c in w.conns if c.vm}
    paths = {(p.vm, p.disk): p for p in w.paths}
    rows = []
    for d in w.disks:
        c = conns.get((d.vm, d.disk))
        p = paths.get((d.vm, d.disk))
        where = d.portal or (p.host_device if p else None) or d.backend
        q = pct.get((d.vm, d.disk))
        rows.append({
            "vm": d.vm,
            "disk": d.disk,
            "backend": d.backend,
            "path": where,
            "mean_ms": None if d.mean_ms is None else round(d.mean_ms, 3),
            "read_ms": None if d.read_ms is None else round(d.read_ms, 3),
            "write_ms": None if d.write_ms is None else round(d.write_ms, 3),
            "p50_ms": None if q is None else q.p50_ms,
            "p99_ms": None if q is None else q.p99_ms,
            "latency_source": None if q is None else q.source,
            "ops_per_second": round(d.ops_per_second, 1),
            "retransmits_per_second": None if c is None else round(c.retrans_per_second, 2),
            "rtt_ms": None if c is None or c.rtt_ms is None else round(c.rtt_ms, 3),
            "session_state": (p.session_state if p and p.session is not None else (c.state if c else None)),
            "stalled": d.stalled,
        })
    rows.sort(key=lambda r: (-(r["mean_ms"] or 0), r["vm"], r["disk"]))
    return rows


def header(w: Window, snap) -> dict:
    health = {n: h.status.value for n, h in snap.health.items()}
    failed = sorted(n for n, s in health.items() if s == Status.FAILED.value)
    return {
        "host": w.host,
        "interval_seconds": round(w.seconds, 2),
        "host_retransmits_per_second": None if w.host_retrans is None else round(w.host_retrans / w.seconds, 2),
        "host_retransmit_pct": None if not w.host_out_segs else round(100.0 * (w.host_retrans or 0) / w.host_out_segs, 3),
        "collectors_ok": sum(1 for s in health.values() if s != Status.FAILED.value),
        "collectors_failed": failed,
    }


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _q(v: float | None) -> str:
    """A bucket bound in ms, short: 0.52, 4.19, 134, >68719 (the overflow bucket)."""
    if v is None:
        return "-"
    if v == float("inf"):
        return "inf"
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def render(hdr: dict, rows: list[dict], width: int = 80, limit: int | None = None) -> list[str]:
    """The screen as lines, at most `width` columns."""
    lines = [
        f"kvmscope top - {clean(hdr['host'])}  every {hdr['interval_seconds']:.0f}s  "
        f"host retrans {_f(hdr['host_retransmits_per_second'])}/s ({_f(hdr['host_retransmit_pct'], '{:.2f}')}%)",
        f"collectors: {hdr['collectors_ok']} ok"
        + (f", FAILED: {', '.join(hdr['collectors_failed'])}" if hdr["collectors_failed"] else ""),
        "",
        f"{'VM':<16} {'DISK':<5} {'LAT_MS':>7} {'P50/P99_MS':>11} {'OPS/S':>6} {'RETR/S':>6} {'RTT_MS':>6} {'STATE':<7} PATH",
    ]
    for r in rows[:limit]:
        state = "STALLED" if r["stalled"] else (r["session_state"] or "-")
        state = {"ESTABLISHED": "estab", "LOGGED_IN": "logged"}.get(state, state)
        pq = "-" if r["p99_ms"] is None else f"{_q(r['p50_ms'])}/{_q(r['p99_ms'])}"
        line = (f"{clean(r['vm'])[:16]:<16} {r['disk'][:5]:<5} {_f(r['mean_ms']):>7} {pq:>11} "
                f"{_f(r['ops_per_second'], '{:.0f}'):>6} {_f(r['retransmits_per_second'], '{:.1f}'):>6} "
                f"{_f(r['rtt_ms']):>6} {state[:7]:<7} {clean(r['path'])}")
        lines.append(line[:width])
    if not rows:
        lines.append("(no VM disks seen: is libvirt running? see `kvmscope run --once`)")
    return [ln[:width] for ln in lines]


@app.command(
    epilog=examples(
        "kvmscope top                  # live, q to quit",
        "kvmscope top --once           # two samples, one screen, exit",
        "kvmscope top --once --json    # for scripts",
    )
)
def top(
    ctx: typer.Context,
    interval: float = typer.Option(2.0, min=0.5, max=60, help="seconds between refreshes"),
    once: bool = typer.Option(False, "--once", help="print one screen (two samples `interval` apart) and exit"),
    json_out: bool = typer.Option(False, "--json", help="print JSON (implies --once)"),
):
    """VM disks ranked by latency over the last interval (mean; p50/p99 from the disk's histogram: libiscsi uprobes,
    block tracepoints or QEMU's own), with ops/s and their path's retransmits, RTT and state."""
    cfg, _ = load_config(ctx)
    remote = attached_snapshots(ctx, cfg, last=1)
    if remote is not None:
        agent = _RemoteAgent(ctx, cfg)
    else:
        agent = build_agent(cfg, TOP_SOURCES)
    try:
        prev = agent.collect_once() if remote is not None else _warm(agent)
        if once or json_out or not sys.stdout.isatty():
            time.sleep(interval)
            snap = agent.collect_once()
            w = build_window([prev, snap])
            hdr, rows = header(w, snap), top_rows(w, prev, snap)
            if json_out:
                print_json({"header": hdr, "disks": rows})
            else:
                print("\n".join(render(hdr, rows)))
            return
        _live(agent, prev, interval)
    finally:
        agent.close()


def _loading(snap: Snapshot) -> bool:
    return any(n.startswith("ebpf_") and h.status is Status.NODATA and "loading" in h.reason for n, h in snap.health.items())


def _warm(agent):
    """The first in-process sample, once the eBPF probes (per-disk histograms) have compiled, or without them
    after PROBE_WARMUP_SECONDS."""
    snap = agent.collect_once()
    deadline = time.monotonic() + PROBE_WARMUP_SECONDS
    while _loading(snap) and time.monotonic() < deadline:
        time.sleep(0.5)
        snap = agent.collect_once()
    return snap


class _RemoteAgent:
    """The running agent's latest snapshot, with the same face as an in-process Agent."""

    def __init__(self, ctx, cfg):
        self.socket = cfg.api.socket
        self.seq = None

    def collect_once(self):
        """The agent's next snapshot (waits for one newer than the last returned)."""
        from agent.api import NotAttached, fetch_snapshots
        from agent.errors import KvmscopeError

        deadline = time.monotonic() + 120
        while True:
            try:
                snaps, _ = fetch_snapshots(self.socket, timeout=5.0, last=1)
            except NotAttached as e:
                raise KvmscopeError(f"the running agent stopped answering: {e}") from None
            if not snaps:
                raise KvmscopeError(f"the running agent on {self.socket} has no snapshot")
            if snaps[-1].seq != self.seq or time.monotonic() > deadline:
                self.seq = snaps[-1].seq
                return snaps[-1]
            time.sleep(0.3)

    def close(self):
        pass


def _live(agent, prev, interval: float) -> None:
    import curses

    def loop(scr):
        nonlocal prev
        curses.curs_set(0)
        scr.timeout(100)
        next_at = time.monotonic() + interval
        lines = ["kvmscope top: first sample, next in a moment..."]
        while True:
            if time.monotonic() >= next_at:
                snap = agent.collect_once()
                w = build_window([prev, snap])
                rows = top_rows(w, prev, snap)
                prev = snap
                h, wd = scr.getmaxyx()
                lines = render(header(w, snap), rows, width=max(wd - 1, 20), limit=max(h - 5, 1))
                next_at = time.monotonic() + interval
            scr.erase()
            h, wd = scr.getmaxyx()
            for i, ln in enumerate(lines[: h - 1]):
                scr.addnstr(i, 0, ln, max(wd - 1, 1), curses.A_BOLD if i == 3 else 0)
            scr.addnstr(h - 1, 0, "q: quit", max(wd - 1, 1), curses.A_DIM)
            scr.refresh()
            ch = scr.getch()
            if ch in (ord("q"), ord("Q"), 27):
                return

    try:
        curses.wrapper(loop)
    except KeyboardInterrupt:
        pass
