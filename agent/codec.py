"""Snapshots to JSON and back (for recordings, golden tests, the local API and every ``--json``).

``encode`` turns dataclasses, tuples, dicts and enums into plain JSON data:
the one JSON encoder of the agent (the CLI's ``--json`` output uses it too).
A dict whose keys are not all strings (``(address, port)`` tuples, histogram
slot numbers) is written as ``{"__pairs__": [[key, value], ...]}`` so that
its keys come back with their types. ``decode`` rebuilds typed records with
pydantic's ``TypeAdapter`` over the records' type hints (the frozen
dataclasses of :mod:`agent.records`), after turning the ``__pairs__`` form
back into a dict. A recording is ``{"kvmscope_recording": 1, "snapshots":
[...]}``; each snapshot's ``data`` is keyed by source name and decoded with
the return type of that source's ``collect()``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import typing
from functools import lru_cache

from agent.errors import KvmscopeError
from agent.records.snapshot import Snapshot, SourceHealth, Status

FORMAT = 1
PAIRS = "__pairs__"


def encode(obj):
    """Records to plain JSON data (dataclasses, tuples, dicts, enums; anything else as is)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [encode(x) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {PAIRS: [[encode(k), encode(v)] for k, v in obj.items()]}  # tuple or int keys
    if isinstance(obj, enum.Enum):
        return obj.value
    return obj


class SnapshotError(KvmscopeError, ValueError):
    """Snapshot JSON that does not fit the records (from an agent's API or a recording).

    The only error ``snapshot_from_json`` raises: that JSON comes from outside
    the process (another agent, possibly not ours, or a file).
    """


def _unpairs(value):
    """The ``__pairs__`` form back to a dict (list keys become tuples: they were tuples)."""
    if isinstance(value, dict):
        if PAIRS in value:
            return {(tuple(k) if isinstance(k, list) else k): _unpairs(v) for k, v in value[PAIRS]}
        return {k: _unpairs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpairs(v) for v in value]
    return value


@lru_cache(maxsize=None)
def _adapter(tp):
    from pydantic import TypeAdapter

    return TypeAdapter(tp)


def decode(tp, value):
    """Plain JSON data (as :func:`encode` wrote it) to the typed records ``tp``; None stays None."""
    if value is None:
        return None
    return _adapter(tp).validate_python(_unpairs(value))


def record_types() -> dict[str, type]:
    """Source name -> the record type its ``collect()`` returns."""
    from agent.sources import load_registry

    out = {}
    for name, info in load_registry().items():
        # an eBPF source returns what its probe reads (ProbeSource.collect is generic)
        fn = getattr(getattr(info.factory, "probe_class", None), "read", None) or info.factory.collect
        try:
            out[name] = typing.get_type_hints(fn)["return"]
        except Exception:
            continue
    return out


def snapshot_to_json(s: Snapshot) -> dict:
    return {
        "seq": s.seq,
        "timestamp": s.timestamp,
        "host": s.host,
        "duration_seconds": s.duration_seconds,
        "health": {k: h.as_dict() for k, h in s.health.items()},
        "data": {k: encode(v) for k, v in s.data.items()},
    }


def _number(d: dict, key: str) -> float:
    v = d[key]
    if type(v) not in (int, float) or not math.isfinite(v):
        raise TypeError(f"{key}: {v!r:.60} is not a finite number")
    return float(v)


def _health(k: str, h) -> SourceHealth:
    if not isinstance(h, dict):
        raise TypeError(f"health {k!r}: not an object")
    dropped = h.get("dropped") or {}
    if not isinstance(h["name"], str) or not isinstance(h.get("reason", ""), str) or not isinstance(dropped, dict) \
            or not all(type(n) is int for n in dropped.values()):
        raise TypeError(f"health {k!r}: name, reason or dropped of the wrong type")
    return SourceHealth(h["name"], Status(h["status"]), _number(h, "duration_seconds"), h.get("reason", ""),
                        dict(dropped))


def snapshot_from_json(d: dict, types_: dict[str, type] | None = None) -> Snapshot:
    """A snapshot from its JSON (``snapshot_to_json``); SnapshotError when it does not fit."""
    types_ = types_ or record_types()
    where = "snapshot"
    try:
        if not isinstance(d, dict):
            raise TypeError("not an object")
        seq, host = d["seq"], d["host"]
        if type(seq) is not int or not isinstance(host, str):
            raise TypeError("seq must be an integer, host a string")
        raw_data, raw_health = d.get("data", {}), d.get("health", {})
        if not isinstance(raw_data, dict) or not isinstance(raw_health, dict):
            raise TypeError("data and health must be objects")
        data = {}
        for name, v in raw_data.items():
            tp = types_.get(name)
            if tp is not None:
                where = f"snapshot data {name!r}"
                if v is None:
                    raise TypeError("null")
                data[name] = decode(tp, v)
        where = "snapshot"
        health = {k: _health(k, h) for k, h in raw_health.items()}
        return Snapshot(seq, _number(d, "timestamp"), host, _number(d, "duration_seconds"), data, health)
    except (TypeError, ValueError, KeyError) as e:  # pydantic's ValidationError is a ValueError
        first = str(e).splitlines()[:3]
        raise SnapshotError(f"{where} does not fit kvmscope's records: {type(e).__name__}: {' '.join(first)}") from None


def dump_recording(snaps: list[Snapshot], fp) -> None:
    json.dump({"kvmscope_recording": FORMAT, "snapshots": [snapshot_to_json(s) for s in snaps]}, fp)


def load_recording(fp) -> list[Snapshot]:
    try:
        doc = json.load(fp)
    except ValueError as e:
        raise KvmscopeError(f"not a kvmscope recording: {e}") from None
    if not isinstance(doc, dict) or doc.get("kvmscope_recording") != FORMAT:
        raise KvmscopeError("not a kvmscope recording (no kvmscope_recording: 1)")
    snaps = doc.get("snapshots")
    if not isinstance(snaps, list):
        raise KvmscopeError("not a kvmscope recording (no list of snapshots)")
    types_ = record_types()
    return [snapshot_from_json(s, types_) for s in snaps]


def read_recording(path: str, minimum: int = 1) -> list[Snapshot]:
    """Load a recording file; a clear KvmscopeError when it cannot be used."""
    try:
        with open(path, encoding="utf-8") as f:
            snaps = load_recording(f)
    except OSError as e:
        raise KvmscopeError(f"cannot read {path}: {e.strerror}") from None
    if len(snaps) < minimum:
        raise KvmscopeError(f"{path}: the recording needs at least {minimum} snapshot(s), it has {len(snaps)}")
    return snaps
