"""Bounded output: caps on the series one scrape exports.

A host with thousands of VMs or a connection storm must not blow up
Prometheus. At most ``max_vms`` VMs, ``max_disks`` VM disks and
``max_connections`` storage connections/remotes are exported, the first ones
in name order (stable between scrapes, so series do not flap); every series
left out is counted in ``kvmscope_exporter_series_dropped_total{kind}`` and
the objects left out at the last scrape in
``kvmscope_exporter_capped_objects{kind}``. Label values longer than
``max_label_length`` are cut and suffixed with a short hash (two long names
stay distinct). The text writer escapes ``\\``, ``"`` and newlines in label
values.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Iterable

from agent.exporters import catalog as C

if TYPE_CHECKING:
    from agent.config import MetricsConfig


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


_get_labels = attrgetter("labels")


def _label_values(labs: list):
    """Every label value of these samples' labels but a histogram bucket's bound (le: never cut)."""
    for lab in labs:
        if "le" in lab:
            yield from (v for k, v in lab.items() if k != "le")
        else:
            yield from lab.values()


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
        # (family name, label names) -> (its rows at the last render, what they named): a family whose rows did
        # not change (an idle connection's, a disk's info) is not looked through again
        self._last: dict[tuple, tuple[list, tuple]] = {}

    def apply(self, families: list) -> None:
        """Cap ``families`` in place (one scrape) and count what was left out."""
        self.record(*self.filter(families, *self.identities(families)))

    def identities(self, families: list) -> tuple[set, set, set, bool]:
        """The VMs, (VM, disk)s and connection keys the samples name, and whether a label value is too long."""
        limit = self.limits.max_label_length
        vms, disks, conn_labels = set(), set(), set()
        long_values = False
        for fam in families:
            rows = fam.rows() if hasattr(fam, "rows") else None
            if rows is not None:
                key = (fam.name, fam._labelnames)
                last = self._last.get(key)
                if last is not None and last[0] == rows:  # the same rows as the last render (fast when the same objects)
                    fv, fd, fc, fl = last[1]
                else:
                    fv, fd, fc = set(), set(), set()
                    fl = self._row_identities(fam._labelnames, rows, fv, fd, fc)
                    self._last[key] = (list(rows), (fv, fd, fc, fl))
                vms |= fv
                disks |= fd
                conn_labels |= fc
                long_values = long_values or fl
                continue
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
                long_values = max(map(len, _label_values(labs)), default=0) > limit
        vms.discard(None)
        vms.discard("")
        disks = {d for d in disks if d[0] and d[1]}
        conns = {_conn_key({"local": lo, "remote_address": ra, "remote_port": rp}) for lo, ra, rp in conn_labels}
        conns.discard(None)
        return vms, disks, conns, long_values

    def _row_identities(self, names: tuple, rows: list, vms: set, disks: set, conn_labels: set) -> bool:
        """identities() of a catalog family's rows (label values in ``names`` order); whether a value is too long."""
        if not names or not rows:
            return False
        labels = list(map(itemgetter(0), rows))
        if set(map(len, labels)) != {len(names)}:
            labels = [dict(zip(names, lv)) for lv in labels]  # as prometheus_client would label them
            col = lambda k: list(map(dict.get, labels, repeat(k)))  # noqa: E731
            values = chain.from_iterable(map(dict.values, labels))
        else:
            col = lambda k: list(map(itemgetter(names.index(k)), labels)) if k in names else [None] * len(labels)  # noqa: E731
            values = chain.from_iterable(labels)
        if "vm" in names:
            vm = col("vm")
            vms.update(vm)
            if "disk" in names:
                disks.update(zip(vm, col("disk")))
        if "local" in names or "remote_address" in names:
            port = col("remote_port") if "remote_port" in names else [""] * len(labels)
            conn_labels.update(zip(col("local"), col("remote_address"), port))
        return max(map(len, values), default=0) > self.limits.max_label_length

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
                rows = fam.rows() if hasattr(fam, "rows") else None
                if rows is not None:
                    self._filter_rows(fam, rows, keep_vms, keep_disks, keep_conns, long_values, dropped)
                    continue
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
                        if long_values and any(len(v) > lim.max_label_length for k, v in lab.items() if k != "le"):
                            smp = smp._replace(labels={k: v if k == "le" else cut_label(v, lim.max_label_length)
                                                       for k, v in lab.items()})
                    kept.append(smp)
                fam.samples = kept
        return dropped, capped

    def _filter_rows(self, fam, rows: list, keep_vms: set, keep_disks: set, keep_conns: set, long_values: bool,
                     dropped: dict) -> None:
        """filter() of a catalog family's rows, counting every sample a dropped row stands for."""
        names = fam._labelnames
        if not names:
            return
        limit = self.limits.max_label_length
        get = lambda lv, k: lv[names.index(k)] if k in names and names.index(k) < len(lv) else None  # noqa: E731
        conn = "local" in names or "remote_address" in names
        kept = []
        for row in rows:
            lv = row[0]
            if lv:
                vm = get(lv, "vm")
                if vm and vm not in keep_vms:
                    dropped["vm"] += fam.row_samples(row)
                    continue
                disk = get(lv, "disk")
                if vm and disk and (vm, disk) not in keep_disks:
                    dropped["disk"] += fam.row_samples(row)
                    continue
                if conn:
                    port = get(lv, "remote_port")
                    k = _conn_key({"local": get(lv, "local"), "remote_address": get(lv, "remote_address"),
                                   "remote_port": "" if port is None else port})
                    if k is not None and k not in keep_conns:
                        dropped["connection"] += fam.row_samples(row)
                        continue
                if long_values and any(len(v) > limit for v in lv):
                    row = (tuple(cut_label(v, limit) for v in lv),) + row[1:]
            kept.append(row)
        fam.set_rows(kept)

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

