"""Prometheus exposition of the latest snapshot, and the agent's HTTP server.

A custom collector in a private registry renders the latest
:class:`~agent.model.Snapshot` at scrape time (no shared mutable gauges).
Rendering never touches the host: a scrape only reads memory, so a slow
source can never make a scrape slow.

HTTP endpoints (one server):
  /metrics          Prometheus text format
  /api/v1/health    per-collector health of the latest cycle, JSON
  /api/v1/snapshots recent snapshots for attached CLI commands (agent/api.py)
  /                 a short index page

Safe by default: the server listens on 127.0.0.1 unless ``metrics.listen``
says otherwise; ``metrics.web_config`` (exporter-toolkit web-config.yml,
see :mod:`agent.exporters.web_config`) adds TLS, client certificates and
basic auth with bcrypt hashes, for every endpoint.

Bounded output (:class:`Limits`): a host with thousands of VMs or a
connection storm must not blow up Prometheus. At most ``max_vms`` VMs,
``max_disks`` VM disks and ``max_connections`` storage connections/remotes
are exported, the first ones in name order (stable between scrapes, so
series do not flap); every series left out is counted in
``kvmscope_exporter_series_dropped_total{kind}`` and the objects left out at
the last scrape in ``kvmscope_exporter_capped_objects{kind}``. Label values
longer than ``max_label_length`` are cut and suffixed with a short hash (two
long names stay distinct). prometheus_client escapes ``\\``, ``"`` and
newlines in label values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent import __version__
from agent.errors import KvmscopeError
from agent.exporters import catalog as C
from agent.model import Snapshot, Status
from agent.sources.host_tcp import HostTcpCounters

if TYPE_CHECKING:
    from agent.config import MetricsConfig
    from agent.exporters.web_config import WebConfig

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


@dataclass(frozen=True)
class Limits:
    """Caps on what one scrape exports (see the module docstring)."""

    max_vms: int = 1000
    max_disks: int = 4000
    max_connections: int = 2000
    max_label_length: int = 256

    @classmethod
    def from_config(cls, m: "MetricsConfig") -> "Limits":
        return cls(m.max_vms, m.max_disks, m.max_connections, m.max_label_length)


CAP_KINDS = ("vm", "disk", "connection")
OTHER = "other"  # the eBPF renderers' aggregate remote: never capped


def _conn_key(labels: dict) -> tuple | None:
    local = labels.get("local")
    if local:
        return ("local", local)
    addr = labels.get("remote_address")
    if addr and addr != OTHER:
        return ("remote", addr, labels.get("remote_port", ""))
    return None


def cut_label(value: str, limit: int) -> str:
    """Cut ``value`` to ``limit`` characters, ending in ~ and 8 hex of its SHA-256 so cut values stay distinct."""
    if len(value) <= limit:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return value[: limit - 9] + "~" + digest


class SeriesCap:
    """Applies :class:`Limits` to the families of one scrape; keeps the dropped counters."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.dropped_total = dict.fromkeys(CAP_KINDS, 0)
        self.capped_now = dict.fromkeys(CAP_KINDS, 0)
        self._lock = threading.Lock()

    def apply(self, families: list) -> None:
        lim = self.limits
        vms, disks, conns = set(), set(), set()
        long_values = False
        for fam in families:
            for smp in fam.samples:
                lab = smp.labels
                if not lab:
                    continue
                vm = lab.get("vm")
                if vm:
                    vms.add(vm)
                    if lab.get("disk"):
                        disks.add((vm, lab["disk"]))
                if "local" in lab or "remote_address" in lab:
                    k = _conn_key(lab)
                    if k is not None:
                        conns.add(k)
                if not long_values:
                    long_values = any(len(v) > lim.max_label_length for v in lab.values())
        over = len(vms) > lim.max_vms or len(disks) > lim.max_disks or len(conns) > lim.max_connections
        dropped = dict.fromkeys(CAP_KINDS, 0)
        capped = dict.fromkeys(CAP_KINDS, 0)
        if over or long_values:
            keep_vms = set(sorted(vms)[: lim.max_vms])
            keep_disks = set(sorted(d for d in disks if d[0] in keep_vms)[: lim.max_disks])
            keep_conns = set(sorted(conns)[: lim.max_connections])
            capped["vm"] = len(vms) - len(keep_vms)
            capped["disk"] = len(disks) - len(keep_disks)
            capped["connection"] = len(conns) - len(keep_conns)
            for fam in families:
                kept = []
                for smp in fam.samples:
                    lab = smp.labels
                    if lab:
                        vm = lab.get("vm")
                        if vm and vm not in keep_vms:
                            dropped["vm"] += 1
                            continue
                        if vm and lab.get("disk") and (vm, lab["disk"]) not in keep_disks:
                            dropped["disk"] += 1
                            continue
                        if "local" in lab or "remote_address" in lab:
                            k = _conn_key(lab)
                            if k is not None and k not in keep_conns:
                                dropped["connection"] += 1
                                continue
                        if long_values and any(len(v) > lim.max_label_length for v in lab.values()):
                            smp = smp._replace(labels={k: cut_label(v, lim.max_label_length) for k, v in lab.items()})
                    kept.append(smp)
                fam.samples = kept
        with self._lock:
            for k in CAP_KINDS:
                self.dropped_total[k] += dropped[k]
            self.capped_now = capped

    def families(self) -> Iterable:
        d, c = C.SERIES_DROPPED.family(), C.CAPPED_OBJECTS.family()
        with self._lock:
            for k in CAP_KINDS:
                d.add_metric([k], self.dropped_total[k])
                c.add_metric([k], self.capped_now[k])
        return [d, c]


def merge_families(fams: list) -> list:
    """One family per metric name: renderers that each yield the same metric (e.g. every eBPF probe's
    kvmscope_probe_events_total) would otherwise repeat HELP/TYPE, which the text format forbids."""
    seen: dict[str, object] = {}
    out = []
    for f in fams:
        first = seen.get(f.name)
        if first is None:
            seen[f.name] = f
            out.append(f)
        else:
            first.samples.extend(f.samples)
    return out


class SnapshotCollector:
    """prometheus_client custom collector over a snapshot provider."""

    def __init__(
        self,
        latest: Callable[[], Snapshot | None],
        clock: Callable[[], float] = time.time,
        limits: Limits | None = None,
    ):
        load_renderers()
        self._latest = latest
        self._clock = clock
        self.cap = SeriesCap(limits or Limits())

    def collect(self):
        snap = self._latest()
        fams = list(render_agent(snap, self._clock()))
        if snap is not None:
            for name, data in snap.data.items():
                render = RENDERERS.get(name)
                if render is None:
                    continue
                try:
                    fams.extend(f for f in render(data) if f.samples)
                except Exception:  # a renderer bug must not fail the scrape
                    log.exception("rendering %s failed", name)
            for render in SNAPSHOT_RENDERERS:
                try:
                    fams.extend(f for f in render(snap) if f.samples)
                except Exception:
                    log.exception("rendering %s failed", render.__name__)
        fams = merge_families(fams)
        self.cap.apply(fams)
        fams.extend(self.cap.families())
        return fams


def make_registry(
    latest: Callable[[], Snapshot | None],
    clock: Callable[[], float] = time.time,
    limits: Limits | None = None,
) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(latest, clock, limits))
    return reg


class _Handler(BaseHTTPRequestHandler):
    server_version = f"kvmscope/{__version__}"
    registry: CollectorRegistry
    latest: Callable[[], Snapshot | None]
    history: Callable[[], list] | None = None
    web: "WebConfig | None" = None
    timeout = 30  # seconds a client may stall (TLS handshake, request line) before its thread gives up

    def log_message(self, fmt, *args):  # quiet: the access log is noise here
        log.debug("http %s " + fmt, self.client_address[0], *args)

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        auth = self.web.auth if self.web else None
        if auth is None or auth.check_header(self.headers.get("Authorization")) is not None:
            return True
        self._send(401, b"401 unauthorized\n", "text/plain; charset=utf-8",
                   {"WWW-Authenticate": 'Basic realm="kvmscope", charset="UTF-8"'})
        return False

    def do_GET(self):
        if not self._authorized():
            return
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
        elif path.startswith("/api/v1/") and self.history is not None:
            from agent.api import handle

            code, body = handle(path, self.path.partition("?")[2], self.history)
            self._send(code, json.dumps(body).encode(), "application/json")
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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    tls_context: ssl.SSLContext | None = None

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls_context is not None:
            # handshake later, in the handler's thread (with its timeout), so
            # a client that never finishes it cannot block accept()
            sock = self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request, client_address):
        # failed handshakes, wrong client certificates, resets: the client's problem, not a crash
        import sys

        log.debug("http %s: %s", client_address[0], sys.exc_info()[1])


class MetricsServer:
    """The agent's HTTP server, on its own thread.

    ``MetricsServer(host, port, latest)`` serves plain HTTP with default
    limits; :meth:`from_config` applies ``metrics.*`` (TLS, basic auth, caps).
    """

    def __init__(
        self,
        host: str,
        port: int,
        latest: Callable[[], Snapshot | None],
        *,
        web: "WebConfig | None" = None,
        limits: Limits | None = None,
        history: Callable[[], list] | None = None,
    ):
        handler = type(
            "Handler",
            (_Handler,),
            {
                "registry": make_registry(latest, limits=limits),
                "latest": staticmethod(latest),
                "history": staticmethod(history) if history else None,
                "web": web,
            },
        )
        server_cls = _Server
        if ":" in host:  # an IPv6 literal from [V6]:PORT
            import socket

            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self.httpd = server_cls((host, port), handler)
        except OSError as e:
            raise KvmscopeError(
                f"cannot listen on {host}:{port}: {e.strerror or e} "
                "(another kvmscope running? set metrics.listen or KVMSCOPE_METRICS__LISTEN)"
            ) from None
        if web is not None and web.tls is not None:
            self.httpd.tls_context = web.tls.context()
        self.scheme = web.scheme if web else "http"
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @classmethod
    def from_config(
        cls, m: "MetricsConfig", latest: Callable[[], Snapshot | None], history: Callable[[], list] | None = None
    ) -> "MetricsServer":
        from agent.config import split_listen
        from agent.exporters.web_config import load_web_config

        host, port = split_listen(m.listen)
        web = load_web_config(m.web_config) if m.web_config else None
        return cls(host, port, latest, web=web, limits=Limits.from_config(m), history=history)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits forever for a serve_forever() that never ran
            self.httpd.shutdown()
        self.httpd.server_close()
