"""The agent's HTTP server: /metrics and the API, plain or TLS, on its own thread.

HTTP endpoints (one server):
  /metrics          Prometheus text format (:class:`~agent.exporters.collector.SnapshotCollector`)
  /api/v1/health    per-collector health of the latest cycle, JSON
  /api/v1/snapshots recent snapshots for attached CLI commands (agent/api.py)
  /                 a short index page

The same endpoints on the unix socket ``api.socket`` (:class:`ApiSocket`),
for the CLI: no TLS or password there, the socket is root's alone.
Bounded on both: ``metrics.max_requests`` connections at once (503 beyond),
each cut off ``metrics.request_timeout`` seconds after it was accepted.

Safe by default: the server listens on 127.0.0.1 unless ``metrics.listen``
says otherwise; ``metrics.web_config`` (exporter-toolkit web-config.yml,
see :mod:`agent.exporters.web_config`) adds TLS, client certificates and
basic auth with bcrypt hashes, for every endpoint. A ``metrics.listen``
beyond loopback is refused (:func:`check_exposure`, at start and by
``kvmscope config check``) unless the web config has TLS *and*
authentication: the API names every VM, UUID, IQN and portal of the host.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import ssl
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from agent import __version__
from agent.errors import ConfigError, KvmscopeError
from agent.exporters.caps import Limits
from agent.exporters.collector import SnapshotCollector
from agent.records.addr import fmt_endpoint
from agent.records.snapshot import Snapshot

if TYPE_CHECKING:
    from agent.api import ApiLimits
    from agent.config import ApiConfig, MetricsConfig
    from agent.exporters.registry import Renderers
    from agent.exporters.web_config import WebConfig

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or a name, as in ``metrics.listen``) can only be reached from
    this machine: 127.0.0.0/8, ::1, ::ffff:127.x, or a name all of whose addresses are those.
    An empty host (``:9847``, all addresses) is not."""
    import ipaddress
    import socket

    if not host:
        return False

    def loopback_ip(text: str) -> bool:
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback

    try:
        ipaddress.ip_address(host)
    except ValueError:  # a name: every address it stands for must be loopback
        try:
            addrs = {i[4][0] for i in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
        except OSError:
            return False
        return bool(addrs) and all(loopback_ip(a) for a in addrs)
    return loopback_ip(host)


def check_exposure(m: "MetricsConfig") -> "WebConfig | None":
    """The loaded web config; a ConfigError when ``metrics.listen`` is beyond loopback and the web
    config lacks TLS or authentication (basic auth, or client certificates required and verified)."""
    from agent.config import split_listen
    from agent.exporters.web_config import VERIFIED_CLIENT_AUTH, load_web_config

    web = load_web_config(m.web_config) if m.web_config else None
    if not m.enabled:
        return web
    host, _port = split_listen(m.listen)
    if is_loopback(host):
        return web
    missing = []
    if web is None or web.tls is None:
        missing.append("TLS (tls_server_config)")
    if web is None or (web.auth is None and (web.tls is None or web.tls.client_auth_type not in VERIFIED_CLIENT_AUTH)):
        missing.append("authentication (basic_auth_users, or client_auth_type RequireAndVerifyClientCert)")
    if missing:
        where = f"metrics.web_config {m.web_config}" if m.web_config else "metrics.web_config (none given)"
        raise ConfigError(
            f"metrics.listen: got {m.listen!r}, beyond loopback, without {' and '.join(missing)} in {where}: "
            "/metrics and /api/v1/snapshots (every VM name, UUID, IQN, portal) would be open to the network. "
            "Listen on 127.0.0.1, or give a web config with TLS and authentication "
            "(docs/configuration.md, \"Serving /metrics beyond loopback\")")
    return web


class _Handler(BaseHTTPRequestHandler):
    server_version = f"kvmscope/{__version__}"
    collector: SnapshotCollector
    latest: Callable[[], Snapshot | None]
    history: Callable[[], list] | None = None
    incidents: Callable | None = None  # since -> incident dicts (agent.diagnose.incidents)
    findings: Callable | None = None  # -> the live findings (agent.diagnose.live.LiveDiagnosis.served)
    web: "WebConfig | None" = None
    api_limits: "ApiLimits | None" = None
    timeout = 10  # per read or write; the whole connection is bounded by the server's deadline

    def log_message(self, fmt, *args):  # quiet: the access log is noise here
        log.debug("http %s " + fmt, _peer(self.client_address), *args)

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
            from agent.api import ApiLimits, handle

            code, body, headers = handle(path, self.path.partition("?")[2], self.history,
                                         self.api_limits or ApiLimits(), incidents=self.incidents,
                                         findings=self.findings)
            self._send(code, body, "application/json", headers)
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


def _peer(addr) -> str:
    return addr[0] if isinstance(addr, tuple) and addr else "unix"


_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 26\r\nRetry-After: 1\r\nConnection: close\r\n\r\nbusy: too many connections\n")


class _Bounded:
    """What any client may cost (a mix-in for the servers): at most ``max_requests`` connections
    are served at once (more are answered 503 from the accepting thread, no thread of their own),
    and each connection is cut off ``request_timeout`` seconds after it was accepted, however
    slowly it trickles (a reaper thread shuts its socket down, which ends the handler's thread)."""

    max_requests = 8
    request_timeout = 10.0
    busy_refusals = 0

    def _init_bounds(self, max_requests: int, request_timeout: float) -> None:
        self.max_requests, self.request_timeout = max_requests, request_timeout
        self._slots = threading.BoundedSemaphore(max_requests)
        self._deadlines: dict = {}
        self._dl_lock = threading.Lock()
        self._reaper_stop = threading.Event()
        self._reaper_wake = threading.Event()  # set when a connection is accepted (a new deadline) or at close
        threading.Thread(target=self._reap, name="http-reaper", daemon=True).start()

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.busy_refusals += 1
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        with self._dl_lock:
            self._deadlines[request] = time.monotonic() + self.request_timeout
        self._reaper_wake.set()
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._dl_lock:
                self._deadlines.pop(request, None)
            self._slots.release()

    def _refuse(self, request) -> None:
        try:
            if not isinstance(request, ssl.SSLSocket):  # a TLS client gets no plain-text answer: just closed
                request.settimeout(0.2)
                try:
                    request.recv(65536, socket.MSG_DONTWAIT)  # what it sent already: close with FIN, not RST
                except OSError:
                    pass
                request.sendall(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def _reap(self) -> None:
        """Cut off connections past their deadline; asleep until the next deadline (no connection: until one
        is accepted), not polling: an idle agent's threads do not wake up for nothing."""
        wait: float | None = None
        while True:
            self._reaper_wake.wait(wait)
            self._reaper_wake.clear()
            if self._reaper_stop.is_set():
                return
            now = time.monotonic()
            with self._dl_lock:
                late = [r for r, t in self._deadlines.items() if t <= now]
                for r in late:
                    del self._deadlines[r]
                nxt = min(self._deadlines.values(), default=None)
            wait = None if nxt is None else max(nxt - now, 0.0) + 0.01
            for r in late:
                log.debug("http: connection cut off after %gs", self.request_timeout)
                try:  # the plain socket call: never touch the TLS object another thread is using
                    socket.socket.shutdown(r, socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self):
        stop = getattr(self, "_reaper_stop", None)  # absent when the bind itself failed
        if stop is not None:
            stop.set()
            self._reaper_wake.set()
        super().server_close()


class _Server(_Bounded, ThreadingHTTPServer):
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

        log.debug("http %s: %s", _peer(client_address), sys.exc_info()[1])


class _UnixServer(_Bounded, socketserver.ThreadingUnixStreamServer):
    """The API on a unix socket, for the CLI: only root (or the agent's own user) may connect
    (the directory is 0700, the socket 0600, and the peer's uid is checked with SO_PEERCRED)."""

    daemon_threads = True
    allow_reuse_address = False

    def verify_request(self, request, client_address) -> bool:
        from agent.api import peer_uid

        try:
            uid = peer_uid(request)
        except OSError:
            return False
        if uid not in (0, os.geteuid()):
            log.warning("api socket: refused a client of uid %d", uid)
            return False
        return True

    def handle_error(self, request, client_address):
        import sys

        log.debug("api socket: %s", sys.exc_info()[1])


class ApiSocket:
    """The API (and /metrics) on a unix socket, on its own thread.

    Made so that nobody else can ever hold it: the directory is created 0700 (an existing one must be
    ours and not writable by others), the socket is bound under a temporary name, made 0600 and
    renamed over the final path (atomic; a stale socket left by a killed agent is replaced, a live
    one is an error), and removed at stop if it is still ours."""

    def __init__(self, path: str, handler: type, max_requests: int, request_timeout: float):
        self.path = Path(path)
        d = self.path.parent
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
        except OSError as e:
            raise KvmscopeError(f"api.socket: cannot create {d}: {e.strerror or e}") from None
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise KvmscopeError(f"api.socket: {d} must belong to uid {os.geteuid()} and be writable by it "
                                f"alone (it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}); "
                                "remove it or choose another api.socket")
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise KvmscopeError(f"api.socket: {self.path} exists and is not a socket; remove it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(1.0)
                probe.connect(str(self.path))
            except OSError:
                pass  # nothing listens: a stale socket, replaced below
            else:
                raise KvmscopeError(f"api.socket: {self.path} is in use (another kvmscope running?)")
            finally:
                probe.close()
        tmp = d / f".{self.path.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        self.server = _UnixServer(str(tmp), handler, bind_and_activate=False)
        self.server._init_bounds(max_requests, request_timeout)
        try:
            self.server.server_bind()
            os.chmod(tmp, 0o600)
            self.server.server_activate()
            os.rename(tmp, self.path)
        except OSError as e:
            self.server.server_close()
            tmp.unlink(missing_ok=True)
            raise KvmscopeError(f"api.socket: cannot serve on {self.path}: {e.strerror or e}") from None
        self._ino = self.path.lstat().st_ino
        self._thread = threading.Thread(target=self.server.serve_forever, name="api-socket", daemon=True)

    def start(self) -> "ApiSocket":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        try:
            if self.path.lstat().st_ino == self._ino:  # still ours: not replaced by a newer agent
                self.path.unlink()
        except OSError:
            pass


class MetricsServer:
    """The agent's HTTP server, on its own thread (and the API's unix socket, when given).

    ``MetricsServer(host, port, latest)`` serves plain HTTP with default
    limits and the renderers of :func:`~agent.exporters.registry.load_renderers`;
    :meth:`from_config` applies ``metrics.*`` (TLS, basic auth, caps) and ``api.*``.
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
        max_requests: int = 8,
        request_timeout: float = 10.0,
        api_limits: "ApiLimits | None" = None,
        api_socket: str | None = None,
        listen: bool = True,
        incidents: Callable | None = None,
        findings: Callable | None = None,
    ):
        attrs = {
            "collector": SnapshotCollector(latest, limits=limits, renderers=renderers),
            "latest": staticmethod(latest),
            "history": staticmethod(history) if history else None,
            "incidents": staticmethod(incidents) if incidents else None,
            "findings": staticmethod(findings) if findings else None,
            "api_limits": api_limits,
            "timeout": min(request_timeout, _Handler.timeout),
        }
        handler = type("Handler", (_Handler,), {**attrs, "web": web})
        self.collector = handler.collector
        self.httpd = None
        self.scheme = web.scheme if web else "http"
        self.address = None
        if listen:
            server_cls = _Server
            if ":" in host:  # an IPv6 literal from [V6]:PORT
                server_cls = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
            try:
                self.httpd = server_cls((host, port), handler)
            except OSError as e:
                raise KvmscopeError(
                    f"cannot listen on {fmt_endpoint(host, port)}: {e.strerror or e} "
                    "(another kvmscope running? set metrics.listen or KVMSCOPE_METRICS__LISTEN)"
                ) from None
            self.httpd._init_bounds(max_requests, request_timeout)
            if web is not None and web.tls is not None:
                self.httpd.tls_context = web.tls.context()
            self.address = self.httpd.server_address
            self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)
        self.api_socket = None
        self.api_socket_error: str | None = None
        if api_socket:
            # no TLS, no basic auth: the socket's mode and the peer's uid are the protection.
            # Not fatal when it cannot be made: /metrics and shipping go on, the CLI collects in-process.
            unix_handler = type("UnixHandler", (_Handler,), {**attrs, "web": None, "collector": self.collector})
            try:
                self.api_socket = ApiSocket(api_socket, unix_handler, max_requests, request_timeout)
            except KvmscopeError as e:
                self.api_socket_error = str(e)
                log.warning("%s", e)

    @classmethod
    def from_config(
        cls,
        m: "MetricsConfig",
        latest: Callable[[], Snapshot | None],
        history: Callable[[], list] | None = None,
        renderers: "Renderers | None" = None,
        api: "ApiConfig | None" = None,
        incidents: Callable | None = None,
        findings: Callable | None = None,
    ) -> "MetricsServer":
        """The HTTP server of ``metrics.*`` (when ``metrics.enabled``) and the API socket of ``api.*``."""
        from agent.api import ApiLimits
        from agent.config import split_listen

        host, port = split_listen(m.listen)
        web = check_exposure(m)
        api_limits = ApiLimits(api.max_snapshots, api.max_response_bytes) if api else None
        return cls(host, port, latest, web=web, limits=Limits.from_config(m), history=history, renderers=renderers,
                   max_requests=m.max_requests, request_timeout=m.request_timeout, api_limits=api_limits,
                   api_socket=api.socket if api else None, listen=m.enabled, incidents=incidents,
                   findings=findings)

    def prerender(self, _snap=None) -> None:
        """Render the latest snapshot now (call when a cycle ends), so even the
        first scrape after a cycle is served from the cached text."""
        self.collector.exposition()

    def start(self) -> "MetricsServer":
        if self.httpd is not None:
            self._thread.start()
        if self.api_socket is not None:
            self.api_socket.start()
        return self

    def stop(self) -> None:
        if self.api_socket is not None:
            self.api_socket.stop()
        if self.httpd is None:
            return
        if self._thread.is_alive():  # shutdown() waits forever for a serve_forever() that never ran
            self.httpd.shutdown()
        self.httpd.server_close()
