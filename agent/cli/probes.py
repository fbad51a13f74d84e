"""`kvmscope probes [check]`: the eBPF probes, their state and their cost.

Runs the probes in this process (compile, attach, sample, detach): the same
loader the agent uses, so what it reports is what the agent would get.
"""

from __future__ import annotations

import time

import typer

from agent.cli import app, examples
from agent.cli.common import load_config, msg, print_json
from agent.ebpf import probe_classes
from agent.ebpf.loader import ATTACHED, Probe
from agent.hostpaths import HostPaths
from agent.sources import SourceContext

probes_app = typer.Typer(
    help="eBPF probes: state, tracepoints, events, lost events, ns per event.",
    invoke_without_command=True,
    epilog=examples(
        "kvmscope probes                 # load, sample 1 s, show each probe",
        "kvmscope probes --seconds 10 --json",
        "kvmscope probes check           # attach everything; exit 1 if any probe failed",
    ),
)
app.add_typer(probes_app, name="probes")


def _load_all(ctx: typer.Context) -> list[Probe]:
    from agent.ebpf.source import load_options

    cfg, _origin = load_config(ctx)
    opts = load_options(SourceContext(cfg, HostPaths.from_config(cfg.paths)))
    probes = [cls(opts) for cls in probe_classes().values()]
    for p in probes:
        p.load()  # one at a time; each outcome independent of the others
    return probes


def _row(p: Probe) -> dict:
    d = p.report.as_dict()
    if p.report.state == ATTACHED:
        d["stats"] = p.stats().as_dict()
    return d


def _print_table(rows: list[dict]) -> None:
    print(f"{'PROBE':<14} {'STATE':<12} {'EVENTS':>9} {'LOST':>7} {'NS/EVENT':>9}  TRACEPOINTS")
    for r in rows:
        st = r.get("stats") or {}
        nspe = st.get("ns_per_event")
        print(f"{r['name']:<14} {r['state']:<12} {st.get('events', '-')!s:>9} {st.get('lost', '-')!s:>7} "
              f"{'-' if nspe is None else f'{nspe:.0f}':>9}  {', '.join(r['tracepoints']) or '-'}")
        if r["skipped_tracepoints"]:
            print(f"{'':<14} not on this kernel: {', '.join(r['skipped_tracepoints'])}")
        if r["reason"]:
            print(f"{'':<14} reason: {r['reason']}")
        if r["fix"]:
            print(f"{'':<14} fix: {r['fix']}")


@probes_app.callback()
def probes(
    ctx: typer.Context,
    seconds: float = typer.Option(1.0, min=0, max=3600, help="how long to count events before reporting"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Load every probe, count for --seconds, and show state, tracepoints, events, lost and ns per event."""
    if ctx.invoked_subcommand is not None:
        return
    probes = _load_all(ctx)
    try:
        if any(p.report.state == ATTACHED for p in probes):
            time.sleep(seconds)
        rows = [_row(p) for p in probes]
    finally:
        for p in probes:
            p.close()
    if json_out:
        print_json({"seconds": seconds, "probes": rows})
    else:
        _print_table(rows)


@probes_app.command("check", epilog=examples("kvmscope probes check && echo all attached", "kvmscope probes check --json"))
def check(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="print JSON")):
    """Attach every probe and report each requirement; exit 1 if any probe is not attached."""
    probes = _load_all(ctx.parent if ctx.parent is not None else ctx)
    rows = []
    try:
        for p in probes:
            rows.append(p.report.as_dict())
    finally:
        for p in probes:
            p.close()
    if json_out:
        print_json({"probes": rows})
    else:
        for r in rows:
            print(f"{r['name']}: {r['state']}" + (f" on {', '.join(r['tracepoints'])}" if r["tracepoints"] else "")
                  + f" ({r['load_seconds']:.2f}s" + (f", {r['origin']}" if r.get("origin") else "") + ")")
            for c in r["checks"]:
                print(f"  {'ok ' if c['ok'] else 'BAD'} {c['name']}: {c['detail']}" + (f"\n      fix: {c['fix']}" if not c["ok"] and c["fix"] else ""))
            if r["skipped_tracepoints"]:
                print(f"  --  optional tracepoints not on this kernel: {', '.join(r['skipped_tracepoints'])}")
            if r["reason"] and r["state"] != ATTACHED:
                print(f"  reason: {r['reason']}")
                if r["fix"]:
                    print(f"  fix: {r['fix']}")
    bad = [r["name"] for r in rows if r["state"] != ATTACHED]
    if bad:
        msg(f"probes not attached: {', '.join(bad)}")
        raise typer.Exit(1)
    msg(f"all {len(rows)} probes attached")
