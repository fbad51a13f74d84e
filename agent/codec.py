"""Snapshots to JSON and back (for recordings, golden tests and the local API).

``encode`` turns dataclasses, tuples, dicts and enums into plain JSON data;
``decode`` rebuilds typed records from JSON using the dataclasses' type
hints. A recording is ``{"kvmscope_recording": 1, "snapshots": [...]}``;
each snapshot's ``data`` is keyed by source name and decoded with the return
type of that source's ``collect()``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from functools import lru_cache

from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.sources import load_registry

FORMAT = 1


def encode(obj):
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


PAIRS = "__pairs__"


@lru_cache(maxsize=None)
def _hints(cls):
    return typing.get_type_hints(cls)


def decode(tp, value):
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        for a in non_none:
            try:
                return decode(a, value)
            except (TypeError, ValueError, KeyError):
                continue
        raise ValueError(f"cannot decode {value!r} as {tp}")
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        kwargs = {f.name: decode(hints[f.name], value[f.name]) for f in dataclasses.fields(tp) if f.name in value}
        return tp(**kwargs)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in value)
        if args:
            return tuple(decode(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is list:
        return [decode(args[0], v) for v in value] if args else list(value)
    if origin is dict:
        kt, vt = args if args else (str, typing.Any)
        items = value[PAIRS] if isinstance(value, dict) and PAIRS in value else value.items()
        return {decode(kt, k): decode(vt, v) for k, v in items}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is float and isinstance(value, int):
        return float(value)
    if tp in (int, str, bool, float) and not isinstance(value, tp):
        raise TypeError(f"{value!r} is not {tp.__name__}")
    if tp is typing.Any or tp is object:
        return value
    return value


def record_types() -> dict[str, type]:
    out = {}
    for name, info in load_registry().items():
        try:
            out[name] = typing.get_type_hints(info.factory.collect)["return"]
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


def snapshot_from_json(d: dict, types_: dict[str, type] | None = None) -> Snapshot:
    types_ = types_ or record_types()
    data = {}
    for name, v in d.get("data", {}).items():
        tp = types_.get(name)
        if tp is not None:
            data[name] = decode(tp, v)
    health = {
        k: SourceHealth(h["name"], Status(h["status"]), h["duration_seconds"], h.get("reason", ""),
                        dict(h.get("dropped") or {}))
        for k, h in d.get("health", {}).items()
    }
    return Snapshot(d["seq"], d["timestamp"], d["host"], d["duration_seconds"], data, health)


def dump_recording(snaps: list[Snapshot], fp) -> None:
    json.dump({"kvmscope_recording": FORMAT, "snapshots": [snapshot_to_json(s) for s in snaps]}, fp)


def load_recording(fp) -> list[Snapshot]:
    from agent.errors import KvmscopeError

    try:
        doc = json.load(fp)
    except ValueError as e:
        raise KvmscopeError(f"not a kvmscope recording: {e}") from None
    if not isinstance(doc, dict) or doc.get("kvmscope_recording") != FORMAT:
        raise KvmscopeError("not a kvmscope recording (no kvmscope_recording: 1)")
    types_ = record_types()
    return [snapshot_from_json(s, types_) for s in doc["snapshots"]]


def read_recording(path: str, minimum: int = 1) -> list[Snapshot]:
    """Load a recording file; a clear KvmscopeError when it cannot be used."""
    from agent.errors import KvmscopeError

    try:
        with open(path, encoding="utf-8") as f:
            snaps = load_recording(f)
    except OSError as e:
        raise KvmscopeError(f"cannot read {path}: {e.strerror}") from None
    if len(snaps) < minimum:
        raise KvmscopeError(f"{path}: the recording needs at least {minimum} snapshot(s), it has {len(snaps)}")
    return snaps
