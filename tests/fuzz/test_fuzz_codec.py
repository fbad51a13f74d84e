"""Fuzz the CLI side of the agent's API: snapshot JSON -> typed records
(agent/codec.py ``snapshot_from_json``, what ``agent.api.fetch_snapshots`` and
recordings use), on real snapshots (tests/fixtures/recordings) with nodes
replaced, deleted or added, and on random JSON.

Property: raises nothing but ``codec.SnapshotError`` (a KvmscopeError and ValueError, its documented
error), and every record it returns fits the type of its source's ``collect()``."""

from __future__ import annotations

import json
import math

from hypothesis import given

from agent.codec import SnapshotError, record_types, snapshot_from_json
from agent.records.snapshot import Snapshot, SourceHealth
from tests.conftest import FIXTURES
from tests.fuzz.mutate import JSON, mutated_json
from tests.fuzz.typecheck import check

TYPES = record_types()
# every recording (NAME.json); NAME.lab.json beside one is the lab's own record of its faults, not snapshots
SNAPS = [s for p in sorted((FIXTURES / "recordings").glob("*.json")) if not p.name.endswith(".lab.json")
         for s in json.loads(p.read_text())["snapshots"][:2]]


def decode_ok(doc):
    try:
        snap = snapshot_from_json(doc, TYPES)
    except ValueError as e:
        assert isinstance(e, SnapshotError), repr(e)
        return
    assert isinstance(snap, Snapshot)
    check(snap.seq, int, "seq")
    check(snap.timestamp, float, "timestamp")
    assert math.isfinite(snap.timestamp) and math.isfinite(snap.duration_seconds)
    check(snap.host, str, "host")
    check(snap.duration_seconds, float, "duration_seconds")
    for name, rec in snap.data.items():
        check(rec, TYPES[name], name)
    for name, h in snap.health.items():
        check(h, SourceHealth, f"health[{name}]")


@given(mutated_json(SNAPS))
def test_mutated_real_snapshots(doc):
    decode_ok(doc)


@given(JSON)
def test_random_json(doc):
    decode_ok(doc)


def test_seeds_decode():
    for s in SNAPS:
        snap = snapshot_from_json(s, TYPES)
        assert snap.data and all(check(v, TYPES[k], k) is None for k, v in snap.data.items())
