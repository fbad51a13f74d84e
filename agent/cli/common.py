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
    """Snapshots from a running agent on metrics.listen, or None (standalone, or none answers)."""
    if (ctx.obj or {}).get("standalone") or not cfg.metrics.enabled:
        return None
    from agent.api import agent_url, fetch_snapshots

    base = agent_url(cfg.metrics.listen)
    snaps = fetch_snapshots(base, timeout=1.0, **params)
    if snaps is not None:
        msg(f"attached to the running agent at {base}")
    return snaps
