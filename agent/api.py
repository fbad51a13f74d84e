"""The running agent's local JSON API, and the CLI's client for it.

A running ``kvmscope run`` serves (on the /metrics server):

  GET /api/v1/snapshots?seconds=S   snapshots of the last S seconds (codec JSON, oldest first)
  GET /api/v1/snapshots?last=N      the last N snapshots

CLI commands (``top``, ``diagnose``, ``retrans``, ``paths``...) attach to it
when it answers, so they need no second copy of the eBPF probes and can look
back over the agent's history; otherwise they run the same engine in-process.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Callable

from agent.codec import snapshot_from_json, snapshot_to_json, record_types
from agent.records.addr import fmt_endpoint
from agent.records.snapshot import Snapshot

MAX_SNAPSHOTS = 2000


def handle(path: str, query: str, history: Callable[[], list[Snapshot]]) -> tuple[int, dict | list]:
    """Route an API request. Returns (HTTP status, JSON body)."""
    q = urllib.parse.parse_qs(query)
    if path == "/api/v1/snapshots":
        snaps = history()
        try:
            if "seconds" in q:
                horizon = time.time() - float(q["seconds"][0])
                snaps = [s for s in snaps if s.timestamp >= horizon]
            if "last" in q:
                n = int(q["last"][0])
                if n < 1:
                    raise ValueError
                snaps = snaps[-n:]
        except ValueError:
            return 400, {"error": "seconds must be a number, last a positive integer"}
        return 200, [snapshot_to_json(s) for s in snaps[-MAX_SNAPSHOTS:]]
    return 404, {"error": f"no such endpoint {path}; try /api/v1/snapshots?last=2"}


def agent_url(listen: str) -> str:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{fmt_endpoint(host, port)}"


def fetch_snapshots(base: str, timeout: float = 2.0, **params) -> list[Snapshot] | None:
    """Snapshots from a running agent, or None when none answers there."""
    url = f"{base}/api/v1/snapshots?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = json.load(r)
    except (OSError, ValueError):
        return None
    types_ = record_types()
    return [snapshot_from_json(s, types_) for s in data]
