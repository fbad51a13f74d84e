"""`kvmscope sessions`, `kvmscope vms`, `kvmscope paths`: what is connected to what."""

from __future__ import annotations

import typer

from agent.cli import app, examples
from agent.cli.common import attached_snapshots, health_notes, load_config, print_json, table
from agent.codec import encode
from agent.engine import collect_now
from agent.records.addr import fmt_endpoint
from agent.records.rates import mean_latency_ms

PATH_SOURCES = ["libvirt", "qmp", "storage_tcp", "iscsi_kernel", "block_devices", "net_ifaces", "multipath"]


@app.command(epilog=examples("kvmscope sessions", "kvmscope sessions --json | jq '.[] | select(.state != \"LOGGED_IN\")'"))
def sessions(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="print JSON")):
    """Kernel (open-iscsi) iSCSI sessions: state, portal, disks, error counters."""
    cfg, _ = load_config(ctx)
    snaps = collect_now(cfg, ["iscsi_kernel"])
    data = snaps[-1].iscsi
    rows = list(data.sessions) if data else []
    if json_out:
        print_json([dict(encode(s), portal=s.portal) for s in rows])
    else:
        health_notes(snaps, ["iscsi_kernel"])
        table(
            ["SID", "STATE", "TARGET", "PORTAL", "CONN", "DISKS", "DIGEST_ERR", "TIMEOUT_ERR", "RECOVERY_TMO"],
            [
                [
                    s.sid,
                    s.state,
                    s.target,
                    s.portal,
                    ",".join(f"{c.state or '?'}:{c.local_port or '?'}" for c in s.connections),
                    ",".join(f"{d.name}{'>' + '/'.join(d.holder_names) if d.holders else ''}({d.state})" for d in s.disks),
                    (s.stats or {}).get("digest_err"),
                    (s.stats or {}).get("timeout_err"),
                    s.recovery_tmo,
                ]
                for s in rows
            ],
        )
        if data and data.vanished:
            typer.echo(f"note: sessions {list(data.vanished)} logged out while being read", err=True)


def _avg_ms(before, now, op: str) -> float | None:
    ms = mean_latency_ms(before, now, op)
    return None if ms is None else round(ms, 3)


@app.command(
    epilog=examples(
        "kvmscope vms                     # totals since each QEMU started",
        "kvmscope vms --sample 5          # rates and latency over the next 5 seconds",
        "kvmscope vms --json",
    )
)
def vms(
    ctx: typer.Context,
    sample: float = typer.Option(0.0, min=0, max=3600, help="measure rates over this many seconds (0: totals)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
):
    """VMs and their disks (libvirt and stand-alone QEMU): backend, requests, average latency."""
    cfg, _ = load_config(ctx)
    snaps = collect_now(cfg, ["libvirt", "qmp"], samples=2 if sample else 1, gap=sample)
    rows, out = [], []
    first_vms = snaps[0].vms if sample else ()
    for vm in snaps[-1].vms:
        before = {}
        for v in first_vms:
            if v.uuid == vm.uuid and v.name == vm.name:
                before = {d.target: d.stats for d in v.disks if d.stats}
        for d in vm.disks:
            s, b = d.stats, before.get(d.target)
            entry = {
                "vm": vm.name,
                "uuid": vm.uuid,
                "manager": vm.manager,
                "state": vm.state,
                "pid": vm.pid,
                "disk": d.target,
                "backend": d.backend,
                "source": d.source,
                "portal": fmt_endpoint(*d.hosts[0]) if d.hosts else None,
                "stats": encode(s),
                "error": vm.error,
            }
            if s and b and sample:
                dt = snaps[-1].timestamp - snaps[0].timestamp
                rd, wr = s.rd_reqs - b.rd_reqs, s.wr_reqs - b.wr_reqs
                entry["interval"] = {
                    "seconds": round(dt, 3),
                    "read_ops_per_second": round(rd / dt, 1),
                    "write_ops_per_second": round(wr / dt, 1),
                    "read_avg_ms": _avg_ms(b, s, "read"),
                    "write_avg_ms": _avg_ms(b, s, "write"),
                    "read_bytes_per_second": round((s.rd_bytes - b.rd_bytes) / dt),
                    "write_bytes_per_second": round((s.wr_bytes - b.wr_bytes) / dt),
                }
            out.append(entry)
            if sample and "interval" in entry:
                i = entry["interval"]
                rows.append([vm.name, vm.state, d.target, d.backend, entry["portal"] or d.source,
                             i["read_ops_per_second"], i["write_ops_per_second"], i["read_avg_ms"], i["write_avg_ms"]])
            else:
                rows.append([vm.name, vm.state, d.target, d.backend, entry["portal"] or d.source,
                             s.rd_reqs if s else None, s.wr_reqs if s else None,
                             _avg_ms(None, s, "read") if s else None,
                             _avg_ms(None, s, "write") if s else None])
    if json_out:
        print_json(out)
        return
    health_notes(snaps, ["libvirt", "qmp"])
    if sample:
        table(["VM", "STATE", "DISK", "BACKEND", "PORTAL/SOURCE", "RD/s", "WR/s", "RD_MS", "WR_MS"], rows)
    else:
        table(["VM", "STATE", "DISK", "BACKEND", "PORTAL/SOURCE", "RD_OPS", "WR_OPS", "RD_AVG_MS", "WR_AVG_MS"], rows)


@app.command(epilog=examples("kvmscope paths", "kvmscope paths --json | jq '.[] | select(.vm == \"db01\")'"))
def paths(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="print JSON")):
    """Storage paths: VM disk -> backend -> iSCSI session -> TCP connection -> portal -> interface."""
    cfg, _ = load_config(ctx)
    snaps = attached_snapshots(ctx, cfg, last=1) or collect_now(cfg, PATH_SOURCES)
    result = list(snaps[-1].paths)
    if json_out:
        print_json([p.as_dict() for p in result])
        return
    health_notes(snaps, PATH_SOURCES)
    print_paths_table(result)
    for p in result:
        for u in p.unknown:
            typer.echo(f"unknown: {p.vm} {p.disk}: {u}", err=True)


PATH_HEADERS = ["VM", "DISK", "BACKEND", "TARGET", "LUN", "PORTAL", "SESSION", "CONNECTION", "RTT_MS", "RETRANS", "IFACE",
                "DEVICE"]


def print_paths_table(result, out=None) -> None:
    table(
        PATH_HEADERS,
        [
            [
                p.vm,
                p.disk,
                p.backend,
                p.target,
                p.lun,
                p.portal,
                f"{p.session}:{p.session_state}" if p.session is not None else None,
                p.connection,
                round(p.rtt_seconds * 1000, 3) if p.rtt_seconds is not None else None,
                p.retransmits_total,
                p.interface,
                "/".join(x for x in (p.multipath, p.host_device, p.scsi_device) if x) or None,
            ]
            for p in result
        ],
        out=out,
    )
