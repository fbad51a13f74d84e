"""`kvmscope retrans [--follow]`: retransmits on storage connections, attributed."""

from __future__ import annotations

import sys
import time
from datetime import datetime

import typer

from agent.cli import app, examples
from agent.cli.common import clean, load_config, msg, print_json, table
from agent.diagnose.window import build_window
from agent.engine import build_agent
from agent.errors import KvmscopeError
from agent.records.addr import fmt_conn

RETRANS_SOURCES = ["libvirt", "qmp", "storage_tcp", "iscsi_kernel", "block_devices", "net_ifaces"]


def retrans_rows(w) -> list[dict]:
    paths = {p.connection: p for p in w.paths if p.connection}
    rows = []
    for c in w.conns:
        p = paths.get(c.four_tuple)
        rows.append({
            "connection": c.four_tuple,
            "portal": c.portal,
            "vm": c.vm,
            "disk": c.disk,
            "session": p.session if p else None,
            "tcp_state": c.state,
            "retransmits": c.retrans,
            "retransmits_per_second": round(c.retrans_per_second, 2),
            "retransmit_pct": round(100.0 * c.retrans / c.segs_out, 3) if c.segs_out else None,
            "rtt_ms": None if c.rtt_ms is None else round(c.rtt_ms, 3),
            "rto_backoff": c.max_backoff,
        })
    rows.sort(key=lambda r: (-r["retransmits"], r["portal"], r["connection"]))
    return rows


@app.command(
    epilog=examples(
        "kvmscope retrans                 # per storage connection over the next 5 s",
        "kvmscope retrans --seconds 30 --json",
        "kvmscope retrans --follow        # every retransmit as it happens (eBPF)",
    )
)
def retrans(
    ctx: typer.Context,
    seconds: float = typer.Option(5.0, min=0.5, max=3600, help="measuring interval"),
    follow: bool = typer.Option(False, "--follow", "-f", help="stream retransmit events as they happen (eBPF)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON (with --follow: one JSON object per line)"),
):
    """TCP retransmits on storage connections, per connection, with VM, disk, session and portal."""
    cfg, _ = load_config(ctx)
    if follow:
        return _follow(cfg, json_out)
    agent = build_agent(cfg, RETRANS_SOURCES)
    try:
        a = agent.collect_once()
        time.sleep(seconds)
        b = agent.collect_once()
    finally:
        agent.close()
    rows = retrans_rows(build_window([a, b]))
    if json_out:
        print_json(rows)
        return
    h = b.health.get("storage_tcp")
    if h is not None and h.status.value != "ok":
        msg(f"note: storage_tcp: {h.reason}")
    table(
        ["VM", "DISK", "CONNECTION", "STATE", "RETRANS", "PER_S", "PCT", "RTT_MS", "BACKOFF"],
        [[r["vm"], r["disk"], r["connection"], r["tcp_state"], r["retransmits"], r["retransmits_per_second"],
          r["retransmit_pct"], r["rtt_ms"], r["rto_backoff"]] for r in rows],
    )


def _follow(cfg, json_out: bool) -> None:
    import json
    import signal

    from agent.ebpf.loader import ATTACHED
    from agent.ebpf.source import load_options
    from agent.ebpf.tcp_retrans import TcpRetransProbe
    from agent.hostpaths import HostPaths
    from agent.sources import SourceContext

    probe = TcpRetransProbe(load_options(SourceContext(cfg, HostPaths.from_config(cfg.paths))))
    msg("loading the tcp_retrans probe (bcc compiles it: about a second)...")
    rep = probe.load()
    if rep.state != ATTACHED:
        raise KvmscopeError(f"tcp_retrans probe {rep.state}: {rep.reason}" + (f" (fix: {rep.fix})" if rep.fix else ""))
    inv = build_agent(cfg, RETRANS_SOURCES)
    owners: dict[tuple, tuple] = {}
    last_inv = 0.0
    stop = [False]
    # explicit handlers: a process started in the background by a shell inherits SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    msg("following retransmits on storage connections; Ctrl-C to stop")
    if not json_out:
        print(f"{'TIME':<12} {'KIND':<18} {'STATE':<12} {'CONNECTION':<44} VM/DISK", flush=True)
    try:
        while not stop[0]:
            if time.monotonic() - last_inv > 5:  # refresh who owns which connection
                snap = inv.collect_once()
                owners = {}
                for p in snap.paths:
                    if p.connection:
                        owners[p.connection] = (p.vm, p.disk)
                last_inv = time.monotonic()
            data = probe.read()
            for e in data.events:
                if not e.storage:
                    continue
                conn = fmt_conn(e.saddr, e.sport, e.daddr, e.dport)
                vm, disk = owners.get(conn, (None, None))
                now = datetime.now()
                if json_out:
                    print(json.dumps({"time": now.isoformat(timespec="milliseconds"), "kind": e.kind, "state": e.state,
                                      "connection": conn, "vm": vm, "disk": disk}), flush=True)
                else:
                    print(f"{now:%H:%M:%S.%f}"[:12] + f" {e.kind:<18} {e.state:<12} {conn:<44} "
                          f"{clean(vm) + '/' + disk if vm else '-'}", flush=True)
            if data.stream_dropped:
                msg(f"note: {data.stream_dropped} events dropped by the rate cap so far (ebpf.events_per_second)")
            time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        inv.close()
        probe.close()
        if not sys.stdout.isatty():
            sys.stdout.flush()
