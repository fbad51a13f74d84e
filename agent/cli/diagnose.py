"""`kvmscope diagnose` and `kvmscope record`."""

from __future__ import annotations

import sys
import time

import typer

from agent.cli import app, examples
from agent.cli.common import attached_snapshots, load_config, msg
from agent.durations import parse_duration
from agent.codec import dump_recording, read_recording
from agent.diagnose.incidents import replay as replay_incidents
from agent.diagnose.report import EXIT_OK, EXIT_PROBLEMS, diagnose as run_diagnose, dumps, report_json, report_text
from agent.diagnose.rules import describe_rules
from agent.engine import build_agent
from agent.errors import KvmscopeError

DIAG_SOURCES = ["libvirt", "qmp", "storage_tcp", "iscsi_kernel", "block_devices", "net_ifaces", "host_tcp", "multipath"]


def _parse_duration(text: str) -> float:
    try:
        v = parse_duration(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected a duration like 30s, 2m, 1h") from None
    if v <= 0 or v > 24 * 3600:
        raise typer.BadParameter(f"{text!r}: must be between 1s and 24h")
    return v


def sample(cfg, seconds: float, every: float, quiet: bool = False):
    """Collect in-process for `seconds`, one snapshot every `every` seconds, with progress on stderr."""
    agent = build_agent(cfg, DIAG_SOURCES)
    snaps = []
    if not quiet and not sys.stderr.isatty():
        msg(f"sampling for {seconds:g}s ...")
    try:
        n = max(2, int(round(seconds / every)) + 1)
        t0 = time.monotonic()
        for i in range(n):
            snaps.append(agent.collect_once())
            if not quiet and sys.stderr.isatty():
                sys.stderr.write(f"\rsampling {i + 1}/{n} ({time.monotonic() - t0:.0f}s of {seconds:.0f}s)")
                sys.stderr.flush()
                if i + 1 == n:
                    sys.stderr.write("\n")
            if i + 1 < n:
                time.sleep(max(0.0, t0 + (i + 1) * every - time.monotonic()))
    finally:
        agent.close()
    return snaps


def _agent_incidents(cfg, seconds: float):
    """The running agent's incidents of the last ``seconds`` (None when it serves none: then they are
    replayed from the snapshots)."""
    from agent.api import NotAttached, fetch_incidents

    try:
        return fetch_incidents(cfg.api.socket, timeout=5.0, seconds=seconds)
    except NotAttached as e:
        msg(f"note: no incidents from the agent ({e}); following them over the snapshots instead")
        return None


@app.command(
    epilog=examples(
        "kvmscope diagnose                      # sample this host for 10 s, then judge",
        "kvmscope diagnose --window 2h          # attached: the agent's incidents of the last 2 hours too",
        "kvmscope diagnose --window 30s --json",
        "kvmscope diagnose --from incident.json # judge a recording (kvmscope record)",
        "kvmscope diagnose --rules              # what each rule looks at",
        "exit codes: 0 no problems, 3 problems found, 1 could not run, 2 bad usage",
    )
)
def diagnose(
    ctx: typer.Context,
    window: str = typer.Option(
        "10s", help="how far back to look (a running agent's history), or how long to sample here; e.g. 10s, 2m"
    ),
    every: float = typer.Option(2.0, min=0.5, max=60, help="seconds between samples"),
    from_file: str = typer.Option(None, "--from", metavar="FILE", help="judge a recording instead of sampling"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    rules: bool = typer.Option(False, "--rules", help="list the rules and exit"),
):
    """Say which VMs are hurting, over which LUN, session, connection and portal, and why."""
    if rules:
        for r in describe_rules():
            print(f"{r['rule']}: {r['title']}\n  {r['doc']}\n")
        return
    cfg, _ = load_config(ctx)
    incidents = None
    seconds = None
    history: list = []
    if from_file:
        snaps = read_recording(from_file, minimum=2)
    else:
        seconds = _parse_duration(window)
        # the window and, before it, the history the baselines are learnt from
        snaps = attached_snapshots(ctx, cfg, seconds=seconds + cfg.diagnose.baseline_seconds)
        if snaps:
            start = snaps[-1].timestamp - seconds
            history = [s for s in snaps if s.timestamp < start]
            snaps = [s for s in snaps if s.timestamp >= start]
        if snaps is not None:
            incidents = _agent_incidents(cfg, seconds)  # kept beyond its snapshot history
        if snaps is not None and len(snaps) < 2:
            msg("the running agent has fewer than 2 snapshots in that window; sampling here instead")
            snaps = None
        if snaps is None:
            snaps = sample(cfg, seconds, every, quiet=json_out and not sys.stderr.isatty())
    w, findings = run_diagnose(snaps, cfg.diagnose, history=history)
    if incidents is None:
        incidents = replay_incidents(snaps, cfg.diagnose)
    if json_out:
        sys.stdout.write(dumps(report_json(w, findings, incidents)))
    else:
        sys.stdout.write(report_text(w, findings, incidents, seconds))
    raise typer.Exit(EXIT_PROBLEMS if any(f.severity in ("critical", "warning") for f in findings) else EXIT_OK)


@app.command(
    epilog=examples(
        "kvmscope record --seconds 60 --out incident.json",
        "kvmscope diagnose --from incident.json",
    )
)
def record(
    ctx: typer.Context,
    seconds: float = typer.Option(30, min=1, max=86400, help="how long to record"),
    every: float = typer.Option(2.0, min=0.5, max=60, help="seconds between snapshots"),
    out: str = typer.Option(..., "--out", "-o", metavar="FILE", help="where to write the recording (JSON)"),
):
    """Record snapshots to a file, to diagnose later or to attach to a ticket."""
    cfg, _ = load_config(ctx)
    snaps = sample(cfg, seconds, every)
    try:
        with open(out, "w", encoding="utf-8") as f:
            dump_recording(snaps, f)
    except OSError as e:
        raise KvmscopeError(f"cannot write {out}: {e.strerror}") from None
    msg(f"wrote {len(snaps)} snapshots to {out}")
