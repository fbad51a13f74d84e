"""The agent's HTTP server: /metrics and the API, plain or TLS, on its own thread.

HTTP endpoints (one server):
  /metrics          Prometheus text format (:class:`~agent.exporters.collector.SnapshotCollector`)
  /api/v1/health    per-collector health of the latest cycle, JSON
  /api/v1/snapshots recent snapshots for attached CLI commands (agent/api.py)
  /                 a short index page

Safe by default: the server listens on 127.0.0.1 unless ``metrics.listen``
says otherwise; ``metrics.web_config`` (exporter-toolkit web-config.yml,
see :mod:`agent.exporters.web_config`) adds TLS, client certificates and
basic auth with bcrypt hashes, for every endpoint.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import __version__
from agent.errors import KvmscopeError
from agent.exporters.caps import Limits
from agent.exporters.collector import SnapshotCollector
from agent.records.addr import fmt_endpoint
from agent.records.snapshot import Snapshot

if TYPE_CHECKING:
    from agent.config import MetricsConfig
    from agent.exporters.registry import Renderers
    from agent.exporters.web_config import WebConfig

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server_version = f"kvmscope/{__version__}"
    collector: SnapshotCollector
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
            self._send(200, self.collector.exposition(), CONTENT_TYPE_LATEST)
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
    limits and the renderers of :func:`~agent.exporters.registry.load_renderers`;
    :meth:`from_config` applies ``metrics.*`` (TLS, basic auth, caps).
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
        renderers: "Renderers | None" = None,
    ):
        handler = type(
            "Handler",
            (_Handler,),
            {
                "collector": SnapshotCollector(latest, limits=limits, renderers=renderers),
                "latest": staticmethod(latest),
                "history": staticmethod(history) if history else None,
                "web": web,
            },
        )
        self.collector = handler.collector
        server_cls = _Server
        if ":" in host:  # an IPv6 literal from [V6]:PORT
            import socket

            server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self.httpd = server_cls((host, port), handler)
        except OSError as e:
            raise KvmscopeError(
                f"cannot listen on {fmt_endpoint(host, port)}: {e.strerror or e} "
                "(another kvmscope running? set metrics.listen or KVMSCOPE_METRICS__LISTEN)"
            ) from None
        if web is not None and web.tls is not None:
            self.httpd.tls_context = web.tls.context()
        self.scheme = web.scheme if web else "http"
        self.address = self.httpd.server_address
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @classmethod
    def from_config(
        cls,
        m: "MetricsConfig",
        latest: Callable[[], Snapshot | None],
        history: Callable[[], list] | None = None,
        renderers: "Renderers | None" = None,
    ) -> "MetricsServer":
        from agent.config import split_listen
        from agent.exporters.web_config import load_web_config

        host, port = split_listen(m.listen)
        web = load_web_config(m.web_config) if m.web_config else None
        return cls(host, port, latest, web=web, limits=Limits.from_config(m), history=history, renderers=renderers)

    def prerender(self, _snap=None) -> None:
        """Render the latest snapshot now (call when a cycle ends), so even the
        first scrape after a cycle is served from the cached text."""
        self.collector.exposition()

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits forever for a serve_forever() that never ran
            self.httpd.shutdown()
        self.httpd.server_close()
