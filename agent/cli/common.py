"""Shared helpers of the CLI commands: configuration loading and output."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from agent import config as config_mod
from agent.config import Config
from agent.text import clean


def load_config(ctx: typer.Context, override: str | None = None) -> tuple[Config, str]:
    path = override or (ctx.obj or {}).get("config") if ctx else override
    return config_mod.load(path)


def check_config(ctx: typer.Context | None, path: str | None = None) -> tuple[Config, str]:
    """Load the configuration and check what loading alone does not: the collector names, and that
    /metrics is not served beyond loopback unprotected. Raises ConfigError (exit 2)."""
    from agent.exporters.server import check_exposure
    from agent.sources import selected

    cfg, origin = load_config(ctx, path) if ctx is not None else config_mod.load(path)
    selected(cfg)
    check_exposure(cfg.metrics)
    return cfg, origin


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def msg(text: str) -> None:
    """A message for the human (stderr), never data."""
    print(text, file=sys.stderr, flush=True)


def table(headers: list[str], rows: list[list], out=None) -> None:
    """A plain aligned table on stdout (no colour, pipe-friendly)."""
    out = out or sys.stdout
    cells = [[clean(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip() + "\n")
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() + "\n")


def health_notes(snaps, names: list[str]) -> None:
    """Tell the human (stderr) about sources that failed or had nothing."""
    if not snaps:
        return
    snap = snaps[-1]
    for n in names:
        h = snap.health.get(n)
        if h is None:
            continue
        if h.status.value == "failed":
            msg(f"warning: {n} failed: {h.reason}")
        elif h.status.value == "nodata":
            msg(f"note: {n}: {h.reason}")


def attached_snapshots(ctx, cfg, **params):
    """Snapshots from the running agent on its unix socket ``api.socket``, or None: ``--standalone``,
    no socket configured, or no trusted agent there (the reason goes to stderr). Never a TCP port:
    while the agent is down any local user could bind it and feed made-up snapshots."""
    if (ctx.obj or {}).get("standalone"):
        return None
    if not cfg.api.socket:
        msg("note: api.socket is null: not attaching to a running agent; collecting in-process")
        return None
    from agent.api import NotAttached, fetch_snapshots

    try:
        snaps, headers = fetch_snapshots(cfg.api.socket, timeout=5.0, **params)
    except NotAttached as e:
        msg(f"{e}: collecting in-process (--standalone to skip looking)")
        return None
    msg(f"attached to the running agent on {cfg.api.socket}")
    left_out = headers.get("X-Kvmscope-Left-Out")
    if left_out:
        msg(f"note: the agent left out the {left_out} oldest snapshot(s) of what was asked "
            "(api.max_snapshots, api.max_response_bytes)")
    return snaps
