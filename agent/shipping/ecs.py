"""Snapshots → ECS documents, through the document builders.

A builder turns records into documents; it lives in
``agent/shipping/docs_<subject>.py`` and is marked against the snapshot
accessor it reads, ``@builder(Snapshot.storage_tcp)`` (collected by
:func:`load_builders`, like the Prometheus renderers: :mod:`agent.marks`).
It receives those records of this cycle and of the previous one (for
rates and state changes) and yields :class:`Doc` values: dataset, subject
(what the document is about: ``vm/disk``, a session id, a 4-tuple) and the
fields specific to it. This module adds the common ECS fields
(``@timestamp``, ``host.*``, ``agent.*``, ``data_stream.*``, ``event.*``
defaults) and the deterministic ``_id``. A builder may write its fields as
dotted names (``"kvmscope.vm.name": "web01"``) or, for documents made by
the hundred every cycle (VM disks, connections), as the nested objects
themselves (``"kvmscope": {"vm": {"name": "web01"}}``, no None values):
nesting ~30 dotted names per document was most of the cost of a cycle's
documents. Both give the same document (tests/golden/es-documents.ndjson).

``@snapshot_builder`` functions see the whole snapshot and the previous one
(joins across sources, e.g. VM disks with their storage paths).

Document ids: ``blake2b(dataset | host | time | subject)``, so a replay of
the same cycle (after a crash between shipping and acknowledging) produces
the same ids and Elasticsearch keeps one copy (``op_type: create`` answers
409 for the second). Log lines use their file identity and offset instead of
the cycle's time, so re-reading a line never makes a second event.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from agent import __version__, marks
from agent.marks import Outputs as Builders
from agent.records.snapshot import Snapshot
from agent.shipping.fields import DATASETS, ECS_VERSION

log = logging.getLogger(__name__)


@dataclass
class Doc:
    dataset: str
    subject: str
    fields: dict[str, Any] = field(default_factory=dict)  # dotted names, or objects the builder nested itself
    timestamp: float | None = None  # default: the snapshot's
    id_time: bool = True  # include the time in the id (False for log lines: subject is unique)


builder = marks.reads  # @builder(Snapshot.x): fn(records, prev records, snap, prev snap) -> Docs
snapshot_builder = marks.over_snapshot  # fn(snap, prev snap) -> Docs


def load_builders() -> Builders:
    """The marked builders of every docs_* module (module name order, then definition order)."""
    return marks.load("agent.shipping", "docs_")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def doc_id(dataset: str, host: str, ts: float | None, subject: str) -> str:
    t = f"{ts:.3f}" if ts is not None else "-"
    return hashlib.blake2b(f"{dataset}|{host}|{t}|{subject}".encode(), digest_size=16).hexdigest()


_ID_BASES: dict[tuple, Any] = {}  # (dataset, host, ts) -> blake2b of "dataset|host|time|", for one cycle's ids


def _doc_id_fast(dataset: str, host: str, ts: float | None, subject: str) -> str:
    """doc_id(), from a hash of the part every document of the dataset shares in a cycle (copied, then the
    subject added): the same bytes hashed, a third less time per document."""
    key = (dataset, host, ts)
    base = _ID_BASES.get(key)
    if base is None:
        if len(_ID_BASES) > 64:
            _ID_BASES.clear()
        t = f"{ts:.3f}" if ts is not None else "-"
        base = _ID_BASES[key] = hashlib.blake2b(f"{dataset}|{host}|{t}|".encode(), digest_size=16)
    h = base.copy()
    h.update(subject.encode())
    return h.hexdigest()


_PATHS: dict[str, tuple[tuple[str, ...], str]] = {}  # dotted key -> (parent keys, last key), split once


def _path(k: str) -> tuple[tuple[str, ...], str]:
    t = _PATHS.get(k)
    if t is None:
        parts = [k] if k[:1] == "@" else k.split(".")  # @timestamp and the like: never nested
        t = (tuple(parts[:-1]), parts[-1])
        if len(_PATHS) < 65536:  # field names are a fixed set; the bound is for a builder gone wrong
            _PATHS[k] = t
    return t


def nest(flat: dict[str, Any]) -> dict:
    """Dotted keys → nested objects; None values are left out."""
    out: dict = {}
    _put(out, flat)
    return out


def _put(out: dict, flat: dict[str, Any]) -> None:
    """Put ``flat``'s dotted keys into the nested ``out`` (None values left out).

    A value that is a dict is an object the builder nested itself (``"kvmscope": {"vm": {...}}``, the
    fast way for documents made by the hundred): it goes in as it is, merged into an object of that
    name already there; it must hold no None value (builders leave them out)."""
    for k, v in flat.items():
        if v is None:
            continue
        parents, last = _PATHS.get(k) or _path(k)
        if not parents:  # a top-level name (@timestamp, message, an object the builder nested)
            if type(v) is dict and type(out.get(k)) is dict:
                _merge(out[k], v)
            else:
                out[k] = v
            continue
        node = out
        for p in parents:
            nxt = node.get(p)
            node = nxt if nxt is not None else node.setdefault(p, {})
        if type(v) is dict and type(node.get(last)) is dict:
            _merge(node[last], v)
        else:
            node[last] = v


def _merge(into: dict, obj: dict) -> None:
    for k, v in obj.items():
        if type(v) is dict and type(into.get(k)) is dict:
            _merge(into[k], v)
        else:
            into[k] = v


# the common fields every document starts with, in this order (finish() writes them without a flat dict)
_COMMON = ("@timestamp", "ecs.version", "agent.name", "agent.type", "agent.version", "host.name", "host.hostname",
           "data_stream.type", "data_stream.dataset", "data_stream.namespace", "event.module", "event.dataset",
           "event.kind")
_COMMON_SET = frozenset(_COMMON)
_ISO: dict[float, str] = {}


def _iso_cached(ts: float) -> str:
    """iso(ts), remembered for the few timestamps of one cycle (every document of a cycle shares one)."""
    v = _ISO.get(ts)
    if v is None:
        if len(_ISO) > 64:
            _ISO.clear()
        v = _ISO[ts] = iso(ts)
    return v


def finish(d: Doc, host: str, namespace: str, snap_ts: float) -> tuple[str, str, dict]:
    """(id, data stream, document) for a builder's Doc."""
    ds = DATASETS[d.dataset]
    ts = d.timestamp if d.timestamp is not None else snap_ts
    dataset = f"kvmscope.{ds.name}"
    fields = d.fields
    _id = _doc_id_fast(d.dataset, host, ts if d.id_time else None, d.subject)
    if not _COMMON_SET.isdisjoint(fields):
        # a builder sets a common field itself: the general path (the flat dict's key order, None removes)
        flat = {
            "@timestamp": _iso_cached(ts),
            "ecs.version": ECS_VERSION,
            "agent.name": "kvmscope",
            "agent.type": "kvmscope",
            "agent.version": __version__,
            "host.name": host,
            "host.hostname": host,
            "data_stream.type": ds.type,
            "data_stream.dataset": dataset,
            "data_stream.namespace": namespace,
            "event.module": "kvmscope",
            "event.dataset": dataset,
            "event.kind": "metric" if ds.type == "metrics" else "event",
        }
        flat.update(fields)
        flat["event.id"] = _id  # the same id in the file output, for Filebeat's document_id
        return _id, ds.stream(namespace), nest(flat)
    # the same document as nest() of the flat dict above, built directly (the common part is nested already)
    out = {
        "@timestamp": _iso_cached(ts),
        "ecs": {"version": ECS_VERSION},
        "agent": {"name": "kvmscope", "type": "kvmscope", "version": __version__},
        "host": {"name": host, "hostname": host},
        "data_stream": {"type": ds.type, "dataset": dataset, "namespace": namespace},
        "event": {"module": "kvmscope", "dataset": dataset, "kind": "metric" if ds.type == "metrics" else "event"},
    }
    if host is None:
        del out["host"]
    _put(out, fields)
    out["event"]["id"] = _id
    return _id, ds.stream(namespace), out


def documents(snap: Snapshot, prev: Snapshot | None, namespace: str,
              builders: Builders | None = None) -> list[tuple[str, str, dict]]:
    """Every document of one cycle (by ``builders``, default :func:`load_builders`).
    A broken builder is logged and skipped, never fatal."""
    builders = builders if builders is not None else load_builders()
    out: list[tuple[str, str, dict]] = []
    for name, fn in builders.records:
        data = getattr(snap, name)
        if data is None:
            continue
        pdata = getattr(prev, name) if prev is not None else None
        try:
            out.extend(finish(d, snap.host, namespace, snap.timestamp) for d in fn(data, pdata, snap, prev))
        except Exception:
            log.exception("building documents of snapshot.%s failed", name)
    for fn in builders.snapshot:
        try:
            out.extend(finish(d, snap.host, namespace, snap.timestamp) for d in fn(snap, prev))
        except Exception:
            log.exception("building documents in %s failed", fn.__name__)
    return out


def finding_doc(finding: dict, host: str, namespace: str, ts: float) -> tuple[str, str, dict]:
    """A diagnosis finding as a ``logs-kvmscope.findings`` event.

    ``finding`` keys: rule, severity (info|warning|critical), summary,
    evidence (text), and optionally cause_key (the finding's stable cause:
    rule:scope kind:scope id), vm, disk, portal, session, connection.
    """
    sev = {"info": 1, "warning": 3, "critical": 5}.get(str(finding.get("severity")), 2)
    d = Doc(
        "findings",
        "|".join(str(finding.get(k, "")) for k in ("rule", "vm", "disk", "portal", "session", "connection")),
        {
            "event.kind": "alert",
            "event.category": ["host"],
            "event.type": ["info"],
            "event.action": "diagnosis-finding",
            "event.severity": sev,
            "message": finding.get("summary"),
            "kvmscope.finding.rule": finding.get("rule"),
            "kvmscope.finding.cause_key": finding.get("cause_key"),
            "kvmscope.finding.severity": finding.get("severity"),
            "kvmscope.finding.summary": finding.get("summary"),
            "kvmscope.finding.evidence": finding.get("evidence"),
            "kvmscope.vm.name": finding.get("vm"),
            "kvmscope.disk.target": finding.get("disk"),
            "kvmscope.portal": finding.get("portal"),
            "kvmscope.iscsi.session.sid": finding.get("session"),
            "kvmscope.connection": finding.get("connection"),
        },
    )
    return finish(d, host, namespace, ts)


def incident_doc(incident: dict, event: str, namespace: str) -> tuple[str, str, dict]:
    """An incident (agent.diagnose.incidents.Incident.as_dict) as a ``logs-kvmscope.incidents`` event:
    ``event`` "opened" (at its start) or "resolved" (at its end, with the duration and each disk's stall).
    Both documents carry the incident id; the resolved one is the complete record."""
    import json

    sev = {"info": 1, "warning": 3, "critical": 5}.get(str(incident.get("severity")), 2)
    resolved = event == "resolved" and incident.get("end") is not None
    disks = incident.get("disks") or {}
    stalls = [d.get("stalled_s") or 0.0 for d in disks.values()]
    worst = [d["worst_ms"] for d in disks.values() if d.get("worst_ms") is not None]
    outage = incident.get("outage") or {}
    d = Doc(
        "incidents",
        f"{incident['id']}|{event}",
        {
            "event.kind": "event",
            "event.category": ["host"],
            "event.type": ["end"] if resolved else ["start"],
            "event.action": f"incident-{event}",
            "event.severity": sev,
            "event.start": iso(incident["start"]),
            "event.end": iso(incident["end"]) if resolved else None,
            "event.duration": int(round(incident["duration_seconds"] * 1e9)) if resolved else None,
            "message": incident.get("summary") or incident.get("title"),
            "kvmscope.vm.name": incident.get("vms") or None,
            "kvmscope.portal": incident.get("portal"),
            "kvmscope.incident.id": incident["id"],
            "kvmscope.incident.key": incident["key"],
            "kvmscope.incident.rule": incident.get("rule"),
            "kvmscope.incident.severity": incident.get("severity"),
            "kvmscope.incident.state": "resolved" if resolved else "open",
            "kvmscope.incident.title": incident.get("title"),
            "kvmscope.incident.scope": incident.get("scope"),
            "kvmscope.incident.duration_seconds": incident.get("duration_seconds") if resolved else None,
            "kvmscope.incident.cycles": incident.get("cycles"),
            "kvmscope.incident.stalled_vms": incident.get("stalled_vms") or None,
            "kvmscope.incident.max_stall_seconds": max(stalls) if stalls else None,
            "kvmscope.incident.worst_latency_ms": max(worst) if worst else None,
            "kvmscope.incident.disks": json.dumps(disks, sort_keys=True) if disks else None,
            "kvmscope.incident.outage.start": iso(outage["start"]) if outage.get("start") else None,
            "kvmscope.incident.outage.end": iso(outage["end"]) if outage.get("end") else None,
            "kvmscope.incident.outage.max_backoff": outage.get("max_backoff"),
            "kvmscope.incident.outage.retransmits": outage.get("retransmits"),
        },
        timestamp=incident["end"] if resolved else incident["start"],
        id_time=False,
    )
    return finish(d, incident.get("host") or "", namespace, d.timestamp)
