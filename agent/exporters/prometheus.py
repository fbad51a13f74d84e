"""Prometheus exposition of the latest snapshot, and the agent's HTTP server.

A custom collector in a private registry renders the latest
:class:`~agent.model.Snapshot` at scrape time (no shared mutable gauges).
Rendering never touches the host: a scrape only reads memory, so a slow
source can never make a scrape slow.

HTTP endpoints (one server):
  /metrics          Prometheus text format
  /api/v1/health    per-collector health of the latest cycle, JSON
  /                 a short index page
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent import __version__
from agent.errors import KvmscopeError
from agent.exporters import catalog as C
from agent.model import Snapshot, Status
from agent.sources.host_tcp import HostTcpCounters

log = logging.getLogger(__name__)


def render_agent(snap: Snapshot | None, now: float) -> Iterable:
    info = C.BUILD_INFO.family()
    info.add_metric([__version__, platform.python_version()], 1)
    yield info
    if snap is None:
        return
    success, nodata, duration = C.COLLECTOR_SUCCESS.family(), C.COLLECTOR_NODATA.family(), C.COLLECTOR_DURATION.family()
    for name in sorted(snap.health):
        h = snap.health[name]
        success.add_metric([name], 1 if h.success else 0)
        nodata.add_metric([name], 1 if h.status is Status.NODATA else 0)
        duration.add_metric([name], h.duration_seconds)
    yield success
    yield nodata
    yield duration
    ts = C.SNAPSHOT_TIMESTAMP.family()
    ts.add_metric([], snap.timestamp)
    yield ts
    age = C.SNAPSHOT_AGE.family()
    age.add_metric([], max(0.0, now - snap.timestamp))
    yield age
    cyc = C.CYCLE_DURATION.family()
    cyc.add_metric([], snap.duration_seconds)
    yield cyc


# source name -> renderer of that source's records. Renderers live next to
# this module (agent/exporters/render_*.py) and register with @renderer.
RENDERERS: dict[str, Callable[[object], Iterable]] = {}


# renderers of joins across sources (storage paths): fn(snapshot)
SNAPSHOT_RENDERERS: list[Callable[[Snapshot], Iterable]] = []


def renderer(source: str):
    def deco(fn):
        RENDERERS[source] = fn
        return fn

    return deco


def snapshot_renderer(fn):
    SNAPSHOT_RENDERERS.append(fn)
    return fn


def load_renderers() -> None:
    import importlib
    import pkgutil

    import agent.exporters as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("render_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


@renderer("host_tcp")
def render_host_tcp(data: HostTcpCounters) -> Iterable:
    groups = {"Tcp": data.tcp, "TcpExt": data.tcp_ext}
    for (group, field), d in C.HOST_TCP_FIELDS.items():
        value = groups[group].get(field)
        if value is None:
            continue  # older kernel without this field: absent, not zero
        fam = d.family()
        fam.add_metric([], value)
        yield fam


class SnapshotCollector:
    """prometheus_client custom collector over a snapshot provider."""

    def __init__(self, latest: Callable[[], Snapshot | None], clock: Callable[[], float] = time.time):
        load_renderers()
        self._latest = latest
        self._clock = clock

    def collect(self):
        snap = self._latest()
        yield from render_agent(snap, self._clock())
        if snap is None:
            return
        for name, data in snap.data.items():
            render = RENDERERS.get(name)
            if render is None:
                continue
            try:
                yield from [f for f in render(data) if f.samples]
            except Exception:  # a renderer bug must not fail the scrape
                log.exception("rendering %s failed", name)
        for render in SNAPSHOT_RENDERERS:
            try:
                yield from [f for f in render(snap) if f.samples]
            except Exception:
                log.exception("rendering %s failed", render.__name__)


def make_registry(latest: Callable[[], Snapshot | None], clock: Callable[[], float] = time.time) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(latest, clock))
    return reg


class _Handler(BaseHTTPRequestHandler):
    server_version = f"kvmscope/{__version__}"
    registry: CollectorRegistry
    latest: Callable[[], Snapshot | None]

    def log_message(self, fmt, *args):  # quiet: the access log is noise here
        log.debug("http %s " + fmt, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, ctype: str):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        elif path == "/api/v1/health":
            snap = self.latest()
            body = {
                "version": __version__,
                "snapshot": None
                if snap is None
                else {
                    "seq": snap.seq,
                    "timestamp": snap.timestamp,
                    "host": snap.host,
                    "collectors": [h.as_dict() for h in snap.health.values()],
                },
            }
            self._send(200, json.dumps(body).encode(), "application/json")
        elif path == "/":
            page = (
                f"<html><head><title>kvmscope</title></head><body><h1>kvmscope {__version__}</h1>"
                '<p><a href="/metrics">/metrics</a> &middot; <a href="/api/v1/health">/api/v1/health</a></p>'
                "</body></html>"
            )
            self._send(200, page.encode(), "text/html; charset=utf-8")
        else:
            self._send(404, b"not found: try /metrics\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET


class MetricsServer:
    """The agent's HTTP server, on its own thread."""

    def __init__(self, host: str, port: int, latest: Callable[[], Snapshot | None]):
        handler = type("Handler", (_Handler,), {"registry": make_registry(latest), "latest": staticmethod(latest)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise KvmscopeError(
                f"cannot listen on {host}:{port}: {e.strerror or e} "
                "(another kvmscope running? set metrics.listen or KVMSCOPE_METRICS__LISTEN)"
            ) from None
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
