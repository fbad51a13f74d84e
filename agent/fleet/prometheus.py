"""Read the fleet's storage-path counters from a Prometheus server.

Uses the HTTP API's instant queries (``GET /api/v1/query``, Prometheus 2.x
and 3.x) with the stdlib only; read only. Each host's agent exports, from
inet_diag ``tcp_info`` (per network namespace, so per host):

* ``kvmscope_storage_connection_retransmitted_segments_total`` (tcpi_total_retrans),
* ``kvmscope_storage_connection_bytes_total{direction="sent"|"retransmitted"}``,
* ``kvmscope_storage_connections{state=...}`` (connections per portal and TCP state).

Series are grouped by the host label (``host``, which the example scrape
configuration in deploy/prometheus/prometheus.yml sets on every target) and
``portal``. Counters are taken as ``rate()`` over the window, so restarts and
reconnects (new series per local port) do not count as retransmits.

Basic auth comes from the URL (``https://user:pass@prom:9090``); TLS uses the
system CA store. A redirect keeps the credentials only when it stays on the same
scheme, host and port: a redirect elsewhere is followed without them (urllib
itself would send them on to any host).
"""

from __future__ import annotations

import base64
import json
import math
import re
import socket
import urllib.error
import urllib.parse
import urllib.request

from agent.durations import parse_duration
from agent.errors import ConfigError, KvmscopeError
from agent.fleet.analysis import PathSample
from agent.records.addr import fmt_host

RETRANS = "kvmscope_storage_connection_retransmitted_segments_total"
BYTES = "kvmscope_storage_connection_bytes_total"
CONNS = "kvmscope_storage_connections"
MAX_BODY = 64 * 1024 * 1024
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def parse_window(text: str) -> int:
    """'30s', '5m', '1h' -> seconds (whole seconds, 10 s .. 7 d)."""
    try:
        v = int(parse_duration(text, integer=True))
    except ValueError:
        raise ConfigError(f"--window {text!r}: expected a duration like 30s, 5m, 1h") from None
    if not 10 <= v <= 7 * 86400:
        raise ConfigError(f"--window {text!r}: must be between 10s and 7d (rate() needs at least two scrapes)")
    return v


def check_url(url: str) -> str:
    u = urllib.parse.urlsplit(url or "")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"--prometheus {url!r}: expected an http(s) URL like http://prometheus:9090")
    try:
        u.port
    except ValueError:
        raise ConfigError(f"--prometheus {url!r}: bad port") from None
    return url


def check_label(name: str) -> str:
    if not _LABEL.fullmatch(name or ""):
        raise ConfigError(f"--host-label {name!r}: not a Prometheus label name")
    return name


def check_selector(sel: str) -> str:
    sel = (sel or "").strip()
    if "{" in sel or "}" in sel:
        raise ConfigError(f"--selector {sel!r}: give the matchers without braces, e.g. job=\"kvmscope\",site=\"a\"")
    return sel


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    scheme = u.scheme.lower()
    try:
        port = u.port
    except ValueError:
        port = None
    return scheme, (u.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


class _CredentialsStayHome(urllib.request.HTTPRedirectHandler):
    """Follows redirects, dropping Authorization when one leads to another scheme, host or port."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


class Prometheus:
    """A Prometheus HTTP API endpoint (instant queries only)."""

    def __init__(self, url: str, timeout: float = 10.0):
        check_url(url)
        u = urllib.parse.urlsplit(url)
        self.auth = None
        if u.username is not None:
            cred = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
            self.auth = "Basic " + base64.b64encode(cred.encode()).decode()
            netloc = fmt_host(u.hostname)
            netloc += f":{u.port}" if u.port else ""
            u = u._replace(netloc=netloc)
        self.base = urllib.parse.urlunsplit(u._replace(query="", fragment="")).rstrip("/")
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_CredentialsStayHome())

    def query(self, expr: str, at: str | None = None) -> list[dict]:
        params = {"query": expr}
        if at:
            params["time"] = at
        req = urllib.request.Request(f"{self.base}/api/v1/query?" + urllib.parse.urlencode(params))
        if self.auth:
            req.add_header("Authorization", self.auth)
        where = f"Prometheus at {self.base}"
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                raw = r.read(MAX_BODY + 1)
        except urllib.error.HTTPError as e:
            body = _json_or_none(e.read(MAX_BODY))
            if isinstance(body, dict) and body.get("error"):
                raise KvmscopeError(f"{where} refused the query ({e.code} {body.get('errorType', '')}): "
                                    f"{body['error']}; query: {expr}") from None
            raise KvmscopeError(f"{where} answered HTTP {e.code} {e.reason} "
                                f"(is this the Prometheus base URL?)") from None
        except urllib.error.URLError as e:
            raise KvmscopeError(f"cannot reach {where}: {e.reason}") from None
        except (socket.timeout, TimeoutError):
            raise KvmscopeError(f"{where} did not answer within {self.timeout:g}s") from None
        except (OSError, ValueError) as e:
            raise KvmscopeError(f"cannot read from {where}: {e}") from None
        if len(raw) > MAX_BODY:
            raise KvmscopeError(f"{where}: answer larger than {MAX_BODY // 2**20} MiB; narrow --selector")
        body = _json_or_none(raw)
        if not isinstance(body, dict) or "status" not in body:
            raise KvmscopeError(f"{where} did not answer like the Prometheus HTTP API (not its JSON); "
                                f"is this the Prometheus base URL?")
        if body["status"] != "success":
            raise KvmscopeError(f"{where} refused the query: {body.get('error', body)}; query: {expr}")
        data = body.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
            raise KvmscopeError(f"{where}: unexpected answer to an instant query (expected a vector)")
        return data["result"]


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


def _value(r: dict) -> float | None:
    try:
        v = float(r["value"][1])
    except (KeyError, IndexError, TypeError, ValueError):
        raise KvmscopeError(f"unexpected sample in the Prometheus answer: {str(r)[:200]}") from None
    return None if math.isnan(v) or math.isinf(v) else v


def _sel(selector: str, *extra: str) -> str:
    return "{" + ",".join(x for x in (*extra, selector) if x) + "}"


def queries(window_s: int, host_label: str, selector: str) -> dict[str, str]:
    """The PromQL the fleet view runs (also printed by `kvmscope fleet --show-queries`)."""
    w, h = f"{window_s}s", host_label
    bytes_sel = _sel(selector, 'direction=~"sent|retransmitted"')
    q = {
        "retrans": f"sum by ({h}, portal) (rate({RETRANS}{_sel(selector)}[{w}]))",
        "bytes": f"sum by ({h}, portal, direction) (rate({BYTES}{bytes_sel}[{w}]))",
        "connections": f"sum by ({h}, portal, state) ({CONNS}{_sel(selector)})",
        "agents": f"max by ({h}) (last_over_time(kvmscope_build_info{_sel(selector)}[{w}]))",
    }
    if selector:
        q["up"] = f"min by ({h}) (up{_sel(selector)})"
    return q


def collect(prom: Prometheus, window_s: int, host_label: str = "host", selector: str = 'job="kvmscope"',
            at: str | None = None) -> tuple[list[PathSample], dict[str, float | None]]:
    """(one PathSample per host and portal, {host: up (1/0, None when unknown)})."""
    q = queries(window_s, host_label, selector)
    res = {k: prom.query(v, at) for k, v in q.items()}
    acc: dict[tuple[str, str], dict] = {}

    def host_of(r: dict, what: str) -> str:
        h = r.get("metric", {}).get(host_label)
        if not h:
            raise KvmscopeError(
                f"{what} series in Prometheus carry no {host_label!r} label: label every target with it "
                f"(deploy/prometheus/prometheus.yml derives it from the target address) or pass "
                f"--host-label instance")
        return h

    def slot(r: dict, what: str) -> dict:
        key = (host_of(r, what), r["metric"].get("portal", ""))
        return acc.setdefault(key, {"other_states": {}})

    for r in res["retrans"]:
        slot(r, RETRANS)["retrans_per_s"] = _value(r)
    for r in res["bytes"]:
        d = r["metric"].get("direction")
        slot(r, BYTES)["sent_bytes_per_s" if d == "sent" else "retrans_bytes_per_s"] = _value(r)
    for r in res["connections"]:
        s = slot(r, CONNS)
        n = int(_value(r) or 0)
        state = r["metric"].get("state", "")
        if state.upper() == "ESTABLISHED":
            s["established"] = n
        elif n:
            s["other_states"][state] = n
    for s in acc.values():
        if s["other_states"] and "established" not in s:
            s["established"] = 0
    agents: dict[str, float | None] = {host_of(r, "kvmscope_build_info"): None for r in res["agents"]}
    for r in res.get("up", []):
        agents[host_of(r, "up")] = _value(r)
    for host, _portal in acc:
        agents.setdefault(host, None)
    samples = [PathSample(host=h, portal=p, **v) for (h, p), v in sorted(acc.items()) if p]
    return samples, agents
