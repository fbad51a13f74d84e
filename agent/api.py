"""The running agent's local JSON API, and the CLI's client for it.

A running ``kvmscope run`` serves (on its unix socket ``api.socket``, and on
the /metrics server behind the same TLS and auth as /metrics):

  GET /api/v1/snapshots?last=N      the last N snapshots (codec JSON, oldest first)
  GET /api/v1/snapshots?seconds=S   snapshots of the last S seconds
  GET /api/v1/snapshots             the latest snapshot only
  GET /api/v1/incidents?seconds=S   the live diagnosis' incidents open at some time in the last S
                                    seconds (all kept ones without ?seconds=), oldest first:
                                    {"incidents": [...]} (agent/diagnose/incidents.py); 404 when
                                    the agent runs no live diagnosis
  GET /api/v1/findings              the live diagnosis' current findings and the cycle they were
                                    judged at: {"seq", "timestamp", "findings": [...]} (each with
                                    the "disks" and "vms" it explains)

What one request may cost is bounded: at most ``api.max_snapshots`` snapshots
and ``api.max_response_bytes`` of JSON (the newest are kept; the header
``X-Kvmscope-Left-Out`` counts the rest), serialised newest first so that the
work stops at the bound.

CLI commands (``top``, ``diagnose``, ``paths``...) attach only through the
unix socket, and only to a listener running as root (or as the CLI's own
user), checked with SO_PEERCRED after connecting: not through a TCP port any
local user could have bound while the agent was down. When no trusted agent
answers they say why on stderr and collect in-process (as ``--standalone``).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from agent.codec import SnapshotError, record_types, snapshot_from_json, snapshot_to_json
from agent.records.snapshot import Snapshot

DEFAULT_SNAPSHOTS = 1  # no ?last= and no ?seconds=: the latest one


@dataclass(frozen=True)
class ApiLimits:
    max_snapshots: int = 120
    max_response_bytes: int = 16 * 1024 * 1024


def handle(path: str, query: str, history: Callable[[], list[Snapshot]],
           limits: ApiLimits = ApiLimits(), incidents: Callable | None = None,
           findings: Callable | None = None) -> tuple[int, bytes, dict[str, str]]:
    """Route an API request. Returns (HTTP status, JSON body, extra headers)."""
    q = urllib.parse.parse_qs(query)
    if path == "/api/v1/incidents" and incidents is not None:
        return _incidents(q, incidents, limits)
    if path == "/api/v1/findings" and findings is not None:
        return 200, json.dumps(findings(), default=str).encode(), {}
    if path != "/api/v1/snapshots":
        return 404, _json({"error": f"no such endpoint {path}; try /api/v1/snapshots?last=2"}), {}
    snaps = history()
    try:
        want = DEFAULT_SNAPSHOTS
        if "seconds" in q:
            horizon = time.time() - float(q["seconds"][0])
            snaps = [s for s in snaps if s.timestamp >= horizon]
            want = len(snaps)
        if "last" in q:
            want = int(q["last"][0])
            if want < 1:
                raise ValueError
    except ValueError:
        return 400, _json({"error": "seconds must be a number, last a positive integer"}), {}
    snaps = snaps[-want:] if want else []
    chosen = snaps[-limits.max_snapshots:]
    parts: list[bytes] = []
    size = 2
    for s in reversed(chosen):  # newest first: the work stops where the size bound is reached
        b = json.dumps(snapshot_to_json(s)).encode()
        if parts and size + len(b) + 2 > limits.max_response_bytes:
            break
        parts.append(b)
        size += len(b) + 2
    left_out = len(snaps) - len(parts)
    body = b"[" + b", ".join(reversed(parts)) + b"]"
    return 200, body, ({"X-Kvmscope-Left-Out": str(left_out)} if left_out else {})


def _incidents(q: dict, incidents: Callable, limits: ApiLimits) -> tuple[int, bytes, dict[str, str]]:
    """The kept incidents (agent/diagnose/incidents.py) open at some time in the last ?seconds=S."""
    try:
        since = time.time() - float(q["seconds"][0]) if "seconds" in q else None
    except ValueError:
        return 400, _json({"error": "seconds must be a number"}), {}
    items = incidents(since)
    total = len(items)
    body = _json({"incidents": items})
    while len(body) > limits.max_response_bytes and items:  # the newest are kept
        items = items[max(1, len(items) // 4):]
        body = _json({"incidents": items})
    left_out = total - len(items)
    return 200, body, ({"X-Kvmscope-Left-Out": str(left_out)} if left_out else {})


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


# -- the CLI's side ------------------------------------------------------------------


class NotAttached(Exception):
    """No trusted agent answered on the socket; the text says why (for the human)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED: pid, uid, gid)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def trusted_uids() -> set[int]:
    """Whose agent the CLI believes: root's, or its own user's (who could do anything to it anyway)."""
    return {0, os.geteuid()}


def fetch_incidents(socket_path: str, timeout: float = 2.0, **params) -> list[dict]:
    """The incidents of the agent serving ``socket_path`` (GET /api/v1/incidents); :class:`NotAttached`
    when it cannot answer them (no agent, untrusted, or one that runs no live diagnosis)."""
    raw = _get(socket_path, f"/api/v1/incidents?{urllib.parse.urlencode(params)}", timeout)[0]
    try:
        data = json.loads(raw)
        return list(data["incidents"])
    except (ValueError, TypeError, KeyError) as e:
        raise NotAttached(f"the agent on {socket_path} answered something that is not a list of incidents ({e})") \
            from None


def _get(socket_path: str, target: str, timeout: float) -> tuple[bytes, dict]:
    """GET ``target`` from the trusted agent on ``socket_path``: (body, headers) of a 200 answer."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        try:
            conn.connect()
        except FileNotFoundError:
            raise NotAttached(f"no agent on {socket_path}") from None
        except ConnectionRefusedError:
            raise NotAttached(f"no agent on {socket_path} (a stale socket: nothing listens)") from None
        except PermissionError:
            raise NotAttached(f"cannot use {socket_path}: permission denied (the agent's socket is root's only)") from None
        except OSError as e:
            raise NotAttached(f"cannot connect to {socket_path}: {e.strerror or e}") from None
        uid = peer_uid(conn.sock)
        if uid not in trusted_uids():
            raise NotAttached(f"not attaching: {socket_path} is served by uid {uid}, not root (nor you): "
                              "its snapshots could be made up")
        try:
            conn.request("GET", target)
            r = conn.getresponse()
            raw = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise NotAttached(f"the agent on {socket_path} did not answer: {e}") from None
        if r.status != 200:
            raise NotAttached(f"the agent on {socket_path} answered HTTP {r.status}: "
                              f"{raw[:200].decode('utf-8', 'replace').strip()}")
        return raw, dict(r.headers)
    finally:
        conn.close()


def fetch_snapshots(socket_path: str, timeout: float = 2.0, **params) -> tuple[list[Snapshot], dict]:
    """Snapshots from the agent serving ``socket_path``, and the response headers.

    Raises :class:`NotAttached` (with the reason) when nothing answers there, the listener is not
    root (or this user), or what it answers is not the API's JSON."""
    raw, headers = _get(socket_path, f"/api/v1/snapshots?{urllib.parse.urlencode(params)}", timeout)
    try:
        data = json.loads(raw)
        if not isinstance(data, list):
            raise SnapshotError(f"expected a list of snapshots, got {type(data).__name__}")
        types_ = record_types()
        return [snapshot_from_json(s, types_) for s in data], headers
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # SnapshotError is a ValueError
        raise NotAttached(f"the agent on {socket_path} answered something that is not kvmscope's "
                          f"snapshot JSON ({e})") from None
