"""Outputs are tied to the snapshot by reference to its accessors (agent/marks.py), not by source-name strings."""

from __future__ import annotations

import pytest

from agent import marks
from agent.exporters.registry import load_renderers, renderer
from agent.records.snapshot import Snapshot, accessor_name
from agent.shipping.ecs import load_builders


@pytest.mark.parametrize("bad", ["host_tcp", Snapshot.get, Snapshot.is_nodata, property(lambda s: 1)])
def test_a_mark_names_a_snapshot_accessor_or_fails_at_import(bad):
    with pytest.raises(TypeError, match="not an accessor of Snapshot"):
        renderer(bad)


def test_accessor_names():
    assert accessor_name(Snapshot.vms) == "vms"  # cached_property
    assert accessor_name(Snapshot.tcp_retrans) == "tcp_retrans"  # property


def test_the_flow_from_records_to_outputs():
    """What each output reads, in the order it runs (module name, then definition order)."""
    assert [n for n, _f in load_renderers().records] == [
        "block_io", "tcp_lifecycle", "tcp_retrans", "libiscsi", "host_tcp", "iscsi", "vms", "vm_disk_latency"]
    assert [f.__name__ for f in load_renderers().snapshot] == ["render_storage_connections", "render_multipath"]
    assert [n for n, _f in load_builders().records] == [
        "tcp_lifecycle", "tcp_retrans", "host_tcp", "iscsi", "storage_log", "storage_tcp"]
    assert [f.__name__ for f in load_builders().snapshot] == ["change_events", "multipath_events", "vm_disk_docs"]


def test_with_records_replaces_in_place_or_adds():
    base = marks.Outputs((("vms", len), ("iscsi", repr)))
    assert base.with_records(Snapshot.vms, str).records == (("vms", str), ("iscsi", repr))
    assert base.with_records(Snapshot.host_tcp, str).records[-1] == ("host_tcp", str)
    assert base.of(Snapshot.iscsi) is repr and base.of(Snapshot.host_tcp) is None


def test_a_renderer_is_skipped_when_its_records_are_absent():
    from agent.exporters.collector import SnapshotCollector

    calls = []
    rs = marks.Outputs().with_records(Snapshot.host_tcp, lambda d: calls.append(d) or [])
    SnapshotCollector(lambda: Snapshot(1, 1.0, "h", 0.0), renderers=rs).exposition()
    assert calls == []
