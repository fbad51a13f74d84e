"""`kvmscope fleet`: is a storage problem portal-wide or local to one host?"""

from __future__ import annotations

import sys

import typer

from agent.cli import app, examples
from agent.cli.common import msg, print_json, table
from agent.codec import encode
from agent.errors import ConfigError, KvmscopeError
from agent.fleet.analysis import FleetReport, Thresholds, analyse
from agent.fleet.prometheus import Prometheus, check_label, check_selector, collect, parse_window, queries

EXIT_OK, EXIT_PROBLEMS = 0, 3


def _pct(v):
    return None if v is None else f"{v * 100:.2f}%"


def _num(v):
    return None if v is None else f"{v:.2f}"


def report_text(rep: FleetReport, agents: dict, base: str, window_s: int) -> str:
    import io

    out = io.StringIO()
    portals = sorted(rep.portals)
    out.write(f"fleet: {len(agents)} hosts, {len(portals)} portals, last {window_s}s, from {base}\n\n")
    rows = []
    for p in rep.paths:
        conns = "-" if p.established is None else str(p.established)
        if p.other_states:
            conns += " (+" + ",".join(f"{n} {s}" for s, n in sorted(p.other_states.items())) + ")"
        rows.append([p.host, p.portal, _num(p.retrans_per_s), _pct(p.ratio), conns,
                     ("BAD " if p.bad else "") + p.why])
    table(["HOST", "PORTAL", "RETRANS/S", "RETRANS BYTES", "ESTABLISHED", "PATH"], rows, out)
    out.write("\n")
    prow = []
    for portal in portals:
        ps = [p for p in rep.paths if p.portal == portal]
        prow.append([portal, rep.portals[portal], f"{sum(p.bad for p in ps)}/{len(ps)}",
                     ", ".join(p.host for p in ps if p.bad) or "-"])
    table(["PORTAL", "VERDICT", "BAD HOSTS", "BAD FROM"], prow, out)
    quiet = sorted(h for h in agents if h not in rep.hosts)
    if quiet:
        out.write(f"\nhosts with no storage connections in the window: {', '.join(quiet)}\n")
    if not rep.findings:
        out.write("\nno storage path problems across the fleet\n")
    for f in rep.findings:
        out.write(f"\n{f.verdict.upper()}: {f.summary}\n  look at: {f.look_at}\n")
        if f.clean:
            out.write(f"  clean: {', '.join(f.clean)}\n")
    return out.getvalue()


def report_json(rep: FleetReport, agents: dict, base: str, window_s: int, at: str | None, t: Thresholds) -> dict:
    return {
        "prometheus": base,
        "window_seconds": window_s,
        "at": at,
        "thresholds": encode(t),
        "agents": [{"host": h, "up": agents[h]} for h in sorted(agents)],
        "paths": encode(list(rep.paths)),
        "portals": [{"portal": p, "verdict": v} for p, v in sorted(rep.portals.items())],
        "hosts": [{"host": h, "verdict": v} for h, v in sorted(rep.hosts.items())],
        "findings": encode(list(rep.findings)),
        "problems": rep.problems,
    }


@app.command(
    epilog=examples(
        "kvmscope fleet --prometheus http://prometheus:9090             # last 5 minutes, table",
        "kvmscope fleet --prometheus http://prom:9090 --window 15m --json",
        "kvmscope fleet --prometheus http://prom:9090 --at 2026-11-25T23:00:00Z   # an incident",
        "kvmscope fleet --prometheus http://prom:9090 --selector 'job=\"kvmscope\",site=\"dc1\"'",
        "exit codes: 0 no problems, 3 problems found, 1 could not run, 2 bad usage",
    )
)
def fleet(
    prometheus: str = typer.Option(None, "--prometheus", "-p", envvar="KVMSCOPE_PROMETHEUS", metavar="URL",
                                   help="base URL of the Prometheus that scrapes the agents"),
    window: str = typer.Option("5m", help="how far back to judge, e.g. 30s, 5m, 1h"),
    at: str = typer.Option(None, metavar="TIME", help="judge the window ending at this time (RFC 3339 or Unix "
                                                       "seconds) instead of now"),
    selector: str = typer.Option('job="kvmscope"', help="label matchers for the agents' series, without braces"),
    host_label: str = typer.Option("host", help="the label that names a host"),
    min_retrans_rate: float = typer.Option(Thresholds.min_retrans_per_s, min=0,
                                           help="retransmitted segments/s for a path to count as bad"),
    min_ratio: float = typer.Option(Thresholds.min_ratio, min=0, max=1,
                                    help="share of sent bytes retransmitted for a path to count as bad"),
    portal_share: float = typer.Option(Thresholds.portal_share, min=0.01, max=1,
                                       help="share of a portal's hosts (and at least 2) that must see it bad "
                                            "for portal-wide"),
    timeout: float = typer.Option(10.0, min=0.1, max=300, help="seconds to wait for each Prometheus answer"),
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    show_queries: bool = typer.Option(False, "--show-queries", help="print the PromQL used and exit"),
):
    """Across hosts, from Prometheus: is a storage problem portal-wide (the target or its network) or
    host-local (one host's NIC, cable or switch port)?"""
    window_s = parse_window(window)
    check_label(host_label)
    sel = check_selector(selector)
    if show_queries:
        for name, q in queries(window_s, host_label, sel).items():
            print(f"{name}: {q}")
        return
    if not prometheus:
        raise ConfigError("--prometheus URL is required (or set KVMSCOPE_PROMETHEUS)")
    t = Thresholds(min_retrans_rate, min_ratio, portal_share)
    prom = Prometheus(prometheus, timeout=timeout)
    samples, agents = collect(prom, window_s, host_label, sel, at)
    if not agents:
        raise KvmscopeError(f"Prometheus at {prom.base} has no kvmscope series matching {{{sel}}} in the "
                            f"{window_s}s window{' ending ' + at if at else ''}: are the agents scraped, and is "
                            f"--selector right? (kvmscope fleet --show-queries prints the queries)")
    for h, up in sorted(agents.items()):
        if up == 0:
            msg(f"warning: Prometheus cannot scrape the agent on {h} (up == 0); its paths may be missing")
    rep = analyse(samples, t)
    if json_out:
        print_json(report_json(rep, agents, prom.base, window_s, at, t))
    else:
        sys.stdout.write(report_text(rep, agents, prom.base, window_s))
    raise typer.Exit(EXIT_PROBLEMS if rep.problems else EXIT_OK)
