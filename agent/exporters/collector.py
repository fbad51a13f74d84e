"""The exporter's collector: one snapshot rendered once, scraped many times.

A custom collector renders the latest :class:`~agent.records.snapshot.Snapshot` at
scrape time (no shared mutable gauges). Rendering never touches the host: a
scrape only reads memory, so a slow source can never make a scrape slow.
Each snapshot is rendered once (every renderer, the merge, the series caps
of :mod:`agent.exporters.caps`; families and text kept until the next
snapshot); later scrapes of it re-render only the snapshot age, the live
renderers and the cap counters. The text is written by
:mod:`agent.exporters.exposition`; the renderers come from
:mod:`agent.exporters.registry`.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from itertools import chain
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry

from agent import __version__
from agent.exporters import catalog as C
from agent.exporters.caps import Limits, SeriesCap
from agent.exporters.catalog import has_samples
from agent.exporters.exposition import family_bytes, write_exposition
from agent.exporters.registry import Renderers, load_renderers
from agent.records.snapshot import Snapshot, Status

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
            a, b = (first.rows(), f.rows()) if hasattr(first, "rows") and type(first) is type(f) else (None, None)
            if a is not None and b is not None and first._labelnames == f._labelnames:
                a.extend(b)
            else:
                first.samples.extend(f.samples)
    return out


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
        """``items`` with each family written as its bytes (written at the first scrape; a family unchanged since
        the last snapshot's render gives back the same bytes, not a copy)."""
        if self._chunks is None:
            with self._lock:
                if self._chunks is None:
                    self._chunks = [it if callable(it) else family_bytes(it) for it in self.items]
        return self._chunks


def _records_families(snap: Snapshot, of_records) -> list:
    """The non-empty families of every renderer of records (skipped when its accessor gives None);
    a renderer bug is logged, never fails the scrape."""
    out = []
    for name, render in of_records:
        data = getattr(snap, name)
        if data is None:
            continue
        try:
            out.extend(f for f in render(data) if has_samples(f))
        except Exception:
            log.exception("rendering snapshot.%s failed", name)
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
        renderers: Renderers | None = None,
    ):
        self.renderers = renderers if renderers is not None else load_renderers()
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
            items.extend(_records_families(snap, self.renderers.records))
            for render in self.renderers.snapshot:
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
            fams.extend(_records_families(snap, self.renderers.records))
            for render in self.renderers.snapshot:
                fams.extend(_run_snapshot_renderer(render, snap))
        fams = merge_families(fams)
        self.cap.apply(fams)
        fams.extend(self.cap.families())
        return fams


def _run_snapshot_renderer(render, snap: Snapshot) -> list:
    try:
        return [f for f in render(snap) if has_samples(f)]
    except Exception:  # a renderer bug must not fail the scrape
        log.exception("rendering %s failed", render.__name__)
        return []


def make_registry(
    latest: Callable[[], Snapshot | None],
    clock: Callable[[], float] = time.time,
    limits: Limits | None = None,
    renderers: Renderers | None = None,
) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(latest, clock, limits, renderers))
    return reg


