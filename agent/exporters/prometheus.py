"""Prometheus exposition of the latest snapshot, and the agent's HTTP server.

A custom collector renders the latest :class:`~agent.records.snapshot.Snapshot` at
scrape time (no shared mutable gauges). Rendering never touches the host: a
scrape only reads memory, so a slow source can never make a scrape slow.
Each snapshot is rendered once (families and text kept until the next one);
later scrapes of it re-render only the snapshot age, the live renderers and
the cap counters. The server writes the text format with its own writer,
byte-identical to prometheus_client's generate_latest and about 5x faster
(benchmarks/exporter.py, docs/performance.md).

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
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import UNDERSCORES, escape_label_name, escape_metric_name

from agent import __version__
from agent.errors import KvmscopeError
from agent.exporters import catalog as C
from agent.records.snapshot import Snapshot, Status
from agent.records.tcp import HostTcpCounters

if TYPE_CHECKING:
    from agent.config import MetricsConfig
    from agent.exporters.web_config import WebConfig

log = logging.getLogger(__name__)


_AGE = object()  # where render_agent puts the snapshot age: the one family that changes between scrapes


def render_agent(snap: Snapshot | None, now: float) -> Iterable:
    for f in _render_agent(snap):
        yield _age_family(snap, now) if f is _AGE else f


def _age_family(snap: Snapshot, now: float):
    age = C.SNAPSHOT_AGE.family()
    age.add_metric([], max(0.0, now - snap.timestamp))
    return age


def _render_agent(snap: Snapshot | None) -> Iterable:
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
    dropped = C.COLLECTOR_DROPPED.family()
    for name in sorted(snap.health):
        for reason, n in sorted(snap.health[name].dropped.items()):
            dropped.add_metric([name, reason], n)
    if dropped.samples:
        yield dropped
    ts = C.SNAPSHOT_TIMESTAMP.family()
    ts.add_metric([], snap.timestamp)
    yield ts
    yield _AGE
    cyc = C.CYCLE_DURATION.family()
    cyc.add_metric([], snap.duration_seconds)
    yield cyc


# source name -> renderer of that source's records. Renderers live next to
# this module (agent/exporters/render_*.py) and register with @renderer.
RENDERERS: dict[str, Callable[[object], Iterable]] = {}


# renderers of joins across sources (storage paths): fn(snapshot)
SNAPSHOT_RENDERERS: list[Callable[[Snapshot], Iterable]] = []

# A scrape renders each snapshot once (SnapshotCollector keeps its families
# and text until the next snapshot): @renderer functions must depend on their
# records alone. A @snapshot_renderer runs at every scrape (it may read live
# state, e.g. the shipper's counters) unless declared
# @snapshot_renderer(per_snapshot=True): a function of the snapshot alone.


def renderer(source: str):
    def deco(fn):
        RENDERERS[source] = fn
        return fn

    return deco


def snapshot_renderer(fn=None, *, per_snapshot: bool = False):
    def deco(f):
        f.per_snapshot = per_snapshot
        SNAPSHOT_RENDERERS.append(f)
        return f

    return deco(fn) if fn is not None else deco


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


_get_labels, _get_name, _get_timestamp, _get_value = (
    attrgetter("labels"), attrgetter("name"), attrgetter("timestamp"), attrgetter("value"))


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
        """Cap ``families`` in place (one scrape) and count what was left out."""
        self.record(*self.filter(families, *self.identities(families)))

    def identities(self, families: list) -> tuple[set, set, set, bool]:
        """The VMs, (VM, disk)s and connection keys the samples name, and whether a label value is too long."""
        limit = self.limits.max_label_length
        vms, disks, conn_labels = set(), set(), set()
        long_values = False
        for fam in families:
            labs = list(map(_get_labels, fam.samples))
            keys = set(chain.from_iterable(labs))
            if not keys:
                continue
            if "vm" in keys:
                vm = list(map(dict.get, labs, repeat("vm")))
                vms.update(vm)
                if "disk" in keys:
                    disks.update(zip(vm, map(dict.get, labs, repeat("disk"))))
            if "local" in keys or "remote_address" in keys:
                conn_labels.update(zip(map(dict.get, labs, repeat("local")), map(dict.get, labs, repeat("remote_address")),
                                       map(dict.get, labs, repeat("remote_port"), repeat(""))))
            if not long_values:
                long_values = max(map(len, chain.from_iterable(map(dict.values, labs)))) > limit
        vms.discard(None)
        vms.discard("")
        disks = {d for d in disks if d[0] and d[1]}
        conns = {_conn_key({"local": lo, "remote_address": ra, "remote_port": rp}) for lo, ra, rp in conn_labels}
        conns.discard(None)
        return vms, disks, conns, long_values

    def filter(self, families: list, vms: set, disks: set, conns: set, long_values: bool) -> tuple[dict, dict]:
        """Drop the samples of objects over the caps and cut long label values, in place; returns
        (series dropped, objects capped) by kind."""
        lim = self.limits
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
        return dropped, capped

    def record(self, dropped: dict, capped: dict) -> None:
        """Account one scrape: add its dropped series to the counters, set the capped objects gauge."""
        with self._lock:
            for k in CAP_KINDS:
                self.dropped_total[k] += dropped[k]
            self.capped_now = dict(capped)

    def families(self) -> Iterable:
        d, c = C.SERIES_DROPPED.family(), C.CAPPED_OBJECTS.family()
        with self._lock:
            for k in CAP_KINDS:
                d.add_metric([k], self.dropped_total[k])
                c.add_metric([k], self.capped_now[k])
        return [d, c]


def merge_families(fams: list) -> list:
    """One family per metric name: renderers that each yield the same metric (e.g. every eBPF probe's
    kvmscope_probe_events_total) would otherwise repeat HELP/TYPE, which the text format forbids.
    Callables (producers rendered at scrape time) are kept in place, untouched."""
    seen: dict[str, object] = {}
    out = []
    for f in fams:
        if callable(f):
            out.append(f)
            continue
        first = seen.get(f.name)
        if first is None:
            seen[f.name] = f
            out.append(f)
        else:
            first.samples.extend(f.samples)
    return out


# -- text format writer -------------------------------------------------------
# prometheus_client's generate_latest formats every sample through generic
# per-label escaping and name validation (a regex per label name per sample):
# >60% of a big host's scrape. This writer produces the same bytes (text
# format 0.0.4, UNDERSCORES name escaping, label values escaped \\ \n \"),
# pinned by tests/unit/test_exposition.py against generate_latest.
_INF, _MINUS_INF = float("inf"), float("-inf")
_OM_SUFFIXES = ("_created", "_gsum", "_gcount")
_templates: dict[tuple, tuple] = {}  # (sample name, label names in dict order) -> (line % values, sorted label names)
_headers: dict[tuple, str] = {}


def go_float(v) -> str:
    """prometheus_client.utils.floatToGoString, inlined."""
    d = float(v)
    if d == _INF:
        return "+Inf"
    if d == _MINUS_INF:
        return "-Inf"
    if d != d:
        return "NaN"
    s = repr(d)
    if d > 0:
        dot = s.find(".")
        if dot > 6:  # Go switches to exponents sooner than Python
            mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
            return f"{mantissa}e+{dot - 1:02d}"
    return s


def _template(name: str, keys: tuple) -> tuple:
    t = _templates.get((name, keys))
    if t is None:
        order = tuple(sorted(keys))
        mname = escape_metric_name(name, UNDERSCORES)
        if order:
            labels = ",".join(f'{escape_label_name(k, UNDERSCORES)}="%s"' for k in order)
            line = f"{mname}{{{labels}}} %s\n"
        else:
            line = f"{mname} %s\n"
        t = _templates[(name, keys)] = (line, order)
    return t


def _header(name: str, mtype: str, doc: str) -> str:
    h = _headers.get((name, mtype, doc))
    if h is None:
        mname = escape_metric_name(name, UNDERSCORES)
        help_text = doc.replace("\\", "\\\\").replace("\n", "\\n")
        h = _headers[(name, mtype, doc)] = f"# HELP {mname} {help_text}\n# TYPE {mname} {mtype}\n"
    return h


def _sample_line(s) -> str:
    line, order = _template(s.name, tuple(s.labels))
    lab = s.labels
    vals = tuple(lab[k].replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k in order)
    text = line % (*vals, go_float(s.value))
    if s.timestamp is not None:
        text = f"{text[:-1]} {int(float(s.timestamp) * 1000):d}\n"
    return text


def write_family(metric, out: list) -> None:
    """Append ``metric``'s lines to ``out`` exactly as generate_latest writes them."""
    mname, mtype = metric.name, metric.type
    if mtype == "counter":
        mname += "_total"
    elif mtype == "info":
        mname += "_info"
        mtype = "gauge"
    elif mtype == "stateset":
        mtype = "gauge"
    elif mtype == "gaugehistogram":
        mtype = "histogram"
    elif mtype == "unknown":
        mtype = "untyped"
    out.append(_header(mname, mtype, metric.documentation))
    om_names = {metric.name + sfx: sfx for sfx in _OM_SUFFIXES}
    samples = metric.samples
    if not samples:
        return
    labs = list(map(_get_labels, samples))
    names = set(map(_get_name, samples))
    if (len(names) == 1 and names.isdisjoint(om_names) and set(map(_get_timestamp, samples)) == {None}
            and len(set(map(len, labs))) == 1 and _write_uniform(samples[0].name, labs, samples, out)):
        return
    om: dict[str, list[str]] = {}
    templates = _templates
    cur_key, line, order = None, "", ()
    for s in metric.samples:
        lab = s.labels
        key = (s.name, tuple(lab))
        if s.name in om_names or s.timestamp is not None:
            text = _sample_line(s)
            sfx = om_names.get(s.name)
            if sfx is None:
                out.append(text)
            else:
                om.setdefault(sfx, []).append(text)
            continue
        if key != cur_key:
            t = templates.get(key) or _template(*key)
            cur_key, (line, order) = key, t
        if order:
            out.append(line % (*[lab[k].replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k in order],
                               go_float(s.value)))
        else:
            out.append(line % go_float(s.value))
    for sfx, lines in sorted(om.items()):
        out.append(_header(metric.name + sfx, "gauge", metric.documentation))
        out.extend(lines)


def _escape_column(col: list) -> list:
    if "\\" in (joined := "".join(col)) or "\n" in joined or '"' in joined:
        return [v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in col]
    return col


def _write_uniform(name: str, labs: list, samples: list, out: list) -> bool:
    """Lines of samples that share name and label count, no timestamp, one column per label; False (and
    nothing written) if their label names differ."""
    line, order = _template(name, tuple(labs[0]))
    try:  # same size and every one of the first sample's label names: the same label names
        cols = [list(map(itemgetter(k), labs)) for k in order]
    except KeyError:
        return False
    floats = list(map(float, map(_get_value, samples)))
    values = list(map(repr, floats))
    # repr(float) is go_float's answer except for inf, nan and 1e6 <= x < 1e16 (Go's exponent form)
    for i in [i for i, d in enumerate(floats) if not _MINUS_INF < d < 1e6]:
        values[i] = go_float(floats[i])
    out.append("".join(map(line.__mod__, zip(*map(_escape_column, cols), values))))
    return True


def write_exposition(families: Iterable) -> bytes:
    """The text exposition of ``families``: generate_latest's bytes, faster."""
    out: list[str] = []
    for f in families:
        write_family(f, out)
    return "".join(out).encode("utf-8")


class _Rendered:
    """One snapshot, rendered once: the families that depend on the snapshot alone (merged, capped) and their
    text, in scrape order, with a producer in the place of each family that changes between scrapes."""

    def __init__(self, snap: Snapshot | None, items: list, dropped: dict, capped: dict):
        self.snap = snap
        self.items = items  # family, or producer: fn(now) -> families
        self.names = {f.name for f in items if not callable(f)}
        self.dropped, self.capped = dropped, capped
        self._chunks: list | None = None
        self._lock = threading.Lock()

    def chunks(self) -> list:
        """``items`` with each run of families written as one bytes chunk (written at the first scrape)."""
        if self._chunks is None:
            with self._lock:
                if self._chunks is None:
                    out, run = [], []
                    for it in self.items + [None]:
                        if it is not None and not callable(it):
                            run.append(it)
                            continue
                        if run:
                            out.append(write_exposition(run))
                            run = []
                        if it is not None:
                            out.append(it)
                    self._chunks = out
        return self._chunks


def _source_families(snap: Snapshot) -> list:
    """The non-empty families of every per-source renderer; a renderer bug is logged, never fails the scrape."""
    out = []
    for name, data in snap.data.items():
        render = RENDERERS.get(name)
        if render is None:
            continue
        try:
            out.extend(f for f in render(data) if f.samples)
        except Exception:
            log.exception("rendering %s failed", name)
    return out


class SnapshotCollector:
    """prometheus_client custom collector over a snapshot provider.

    A snapshot is rendered once (every renderer, the merge, the caps) and its
    families and text are kept until the provider returns another snapshot; a
    scrape re-renders only what changes between scrapes (the snapshot age,
    @snapshot_renderer functions not declared per_snapshot) and the cap
    counters. :meth:`exposition` writes the text format directly (the
    server's path); :meth:`collect` gives prometheus_client the same families.
    """

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
        self._rendered: _Rendered | None = None
        self._render_lock = threading.Lock()

    def collect(self):
        return list(chain.from_iterable(self._scrape(False)))

    def exposition(self) -> bytes:
        """The text exposition (format 0.0.4) of one scrape: generate_latest(registry)'s bytes."""
        parts = self._scrape(True)
        return b"".join(it if isinstance(it, bytes) else write_exposition(it) for it in parts)

    def _scrape(self, text: bool) -> list:
        """One scrape as a list of bytes chunks (if ``text``) and lists of families."""
        snap = self._latest()
        now = self._clock()
        r = self._rendered
        if r is None or r.snap is not snap:
            with self._render_lock:
                r = self._rendered
                if r is None or r.snap is not snap:
                    r = self._rendered = self._render(snap)
        items = r.chunks() if text else r.items
        parts, live = [], []
        for it in items:
            if callable(it):
                fams = it(now)
                live.extend(fams)
                parts.append(fams)
            else:
                parts.append(it if text else [it])
        if live:
            names = [f.name for f in live]
            vms, disks, conns, long_values = self.cap.identities(live)
            if vms or disks or conns or len(set(names)) < len(names) or not r.names.isdisjoint(names):
                # a live family adds to a per-snapshot one or to the caps: render the whole scrape again
                fams = self._collect_all(snap, now)
                return [write_exposition(fams)] if text else [fams]
            if long_values:
                self.cap.filter(live, vms, disks, conns, True)  # cuts long values; drops nothing
        self.cap.record(r.dropped, r.capped)
        parts.append(self.cap.families())
        return parts

    def _render(self, snap: Snapshot | None) -> _Rendered:
        items: list = []
        if snap is None:
            items.extend(_render_agent(snap))
        else:
            for f in _render_agent(snap):
                items.append((lambda now, snap=snap: [_age_family(snap, now)]) if f is _AGE else f)
            items.extend(_source_families(snap))
            for render in SNAPSHOT_RENDERERS:
                if not getattr(render, "per_snapshot", False):
                    items.append(lambda now, render=render, snap=snap: _run_snapshot_renderer(render, snap))
                    continue
                items.extend(_run_snapshot_renderer(render, snap))
        merged = merge_families(items)
        fams = [it for it in merged if not callable(it)]
        dropped, capped = self.cap.filter(fams, *self.cap.identities(fams))
        return _Rendered(snap, merged, dropped, capped)

    def _collect_all(self, snap: Snapshot | None, now: float) -> list:
        """Every family of one scrape, rendered from scratch."""
        fams = list(render_agent(snap, now))
        if snap is not None:
            fams.extend(_source_families(snap))
            for render in SNAPSHOT_RENDERERS:
                fams.extend(_run_snapshot_renderer(render, snap))
        fams = merge_families(fams)
        self.cap.apply(fams)
        fams.extend(self.cap.families())
        return fams


def _run_snapshot_renderer(render, snap: Snapshot) -> list:
    try:
        return [f for f in render(snap) if f.samples]
    except Exception:  # a renderer bug must not fail the scrape
        log.exception("rendering %s failed", render.__name__)
        return []


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
                "collector": SnapshotCollector(latest, limits=limits),
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
