"""`kvmscope doctor`: checks of the host's storage-path configuration."""

from __future__ import annotations

import sys

import typer

from agent.cli import app, examples
from agent.cli.common import load_config, msg


def build_input(cfg, from_file: str | None):
    """The doctor's input: a snapshot collected now (or the last one of a recording), /etc and the live probes."""
    from functools import partial

    from agent.doctor import SOURCES, DoctorInput
    from agent.doctor.live import sample_socket_timers
    from agent.engine import collect_now
    from agent.hostpaths import HostPaths

    paths = HostPaths.from_config(cfg.paths)
    if from_file:
        from agent.codec import read_recording

        snaps = read_recording(from_file)
        return DoctorInput(cfg, paths, snaps[-1], socket_timers=None)
    snap = collect_now(cfg, SOURCES)[0]
    return DoctorInput(cfg, paths, snap, socket_timers=partial(sample_socket_timers, set(cfg.storage.ports)))


@app.command(
    epilog=examples(
        "kvmscope doctor                        # check this host's iSCSI, multipath, VM disk and eBPF setup",
        "kvmscope doctor --json | jq '.results[] | select(.status != \"ok\")'",
        "kvmscope doctor --check mtu --check nop_out -v",
        "kvmscope doctor --from incident.json   # judge a recording's snapshot (kvmscope record) + this /etc",
        "kvmscope doctor --list                 # what each check looks at",
        "exit codes: 0 all ok/info, 3 warnings or problems found, 1 could not run, 2 bad usage",
    )
)
def doctor(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="print JSON (schema in docs/doctor.md)"),
    only: list[str] = typer.Option(None, "--check", metavar="NAME", help="run only this check (repeatable)"),
    from_file: str = typer.Option(None, "--from", metavar="FILE", help="use the last snapshot of a recording"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="details for every result, not only non-ok ones"),
    list_checks: bool = typer.Option(False, "--list", help="list the checks and exit"),
):
    """Check the storage-path configuration: open-iscsi timeouts vs multipath, NOP-Out, single-path LUNs,
    MTUs, VM disk cache and error policies, libiscsi keepalive, eBPF readiness."""
    from agent.doctor import exit_code, load_checks, run_checks
    from agent.doctor.report import dumps, report_json, report_text

    checks = load_checks()
    if list_checks:
        for c in checks:
            print(f"{c.name}: {c.title}\n  " + "\n  ".join(c.doc.splitlines()) + "\n")
        return
    unknown = [n for n in (only or []) if n not in {c.name for c in checks}]
    if unknown:
        raise typer.BadParameter(f"unknown check {', '.join(unknown)}; known: {', '.join(c.name for c in checks)}",
                                 param_hint="--check")
    cfg, _ = load_config(ctx)
    inp = build_input(cfg, from_file)
    for name, h in sorted(inp.snapshot.health.items()):
        if h.status.value == "failed":
            msg(f"warning: source {name} failed: {h.reason} (checks that need it say so)")
    results = run_checks(inp, only or None)
    for r in results:
        if r.error:
            msg(f"error: check {r.check} failed: {r.error}")
    if json_out:
        sys.stdout.write(dumps(report_json(inp.snapshot.host, results, checks, inp.snapshot.health)))
    else:
        sys.stdout.write(report_text(inp.snapshot.host, results, verbose=verbose))
    raise typer.Exit(exit_code(results))
