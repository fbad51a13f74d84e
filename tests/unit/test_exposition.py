"""The exporter's own text writer and its per-snapshot cache (agent/exporters/exposition.py, collector.py).

The writer must produce prometheus_client's generate_latest bytes exactly
(text format 0.0.4: escaping, number formatting, suffixed families), and a
cached scrape must be byte-identical to rendering the whole scrape again.
"""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from agent.exporters.caps import Limits
from agent.exporters.collector import SnapshotCollector, make_registry
from agent.exporters.exposition import go_float, write_exposition
from agent.exporters.registry import load_renderers
from agent.records.snapshot import Snapshot
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from benchmarks.exporter import synthetic_snapshot
from tests.unit.test_prometheus import fixture_snapshot


class _Families:
    def __init__(self, fams):
        self.fams = fams

    def collect(self):
        return self.fams


def _reference(fams) -> bytes:
    return generate_latest(_Families(fams))


ODD = ['plain', '', 'q"uo"te', 'back\\slash', 'new\nline', 'ü ñ 漢字', '100%s %d %%', '{a="b"}', '\\"\n\\n', ' ', 'x' * 300]
NUMBERS = [0, 1, -1, 0.0, -0.0, 1.5, 0.1, 1 / 3, 999999.0, 1e6, 1234567.0, 123456789012.0, 9.999999e15, 1e16,
           1.5e22, -1234567.0, 5e-324, 1e-7, float("inf"), float("-inf"), float("nan"), True, 2**53 + 1, 10**20,
           "42", "1e3"]


def test_go_float_is_prometheus_clients():
    for v in NUMBERS:
        assert go_float(v) == floatToGoString(v), v


def _odd_families():
    fams = []
    g = GaugeMetricFamily("t_gauge", 'help with \\ backslash and\nnewline and "quotes"', labels=["b", "a", "c"])
    for i, v in enumerate(ODD):
        g.add_metric([v, ODD[-1 - i], str(i)], NUMBERS[i % len(NUMBERS)])
    fams.append(g)
    u = GaugeMetricFamily("t_uniform", "numbers", labels=["n"])
    for i, v in enumerate(NUMBERS):
        u.add_metric([str(i)], v)
    fams.append(u)
    fams.append(GaugeMetricFamily("t_nolabels", "no labels", value=7))
    fams.append(GaugeMetricFamily("t_empty", "no samples", labels=["x"]))
    c = CounterMetricFamily("t_counter", "with created", labels=["k"], created=1700000000.5)
    c.add_metric(["b"], 3, created=1700000001)
    c.add_metric(["a"], 2.5, timestamp=1700000002.25)
    fams.append(c)
    h = HistogramMetricFamily("t_hist", "histogram", labels=["dev"])
    h.add_metric(["sda"], [("0.001", 1), ("0.01", 4), ("+Inf", 9)], 0.5)
    h.add_metric(["sd\"b"], [("0.001", 0), ("+Inf", 2)], 1e7)
    fams.append(h)
    gh = GaugeHistogramMetricFamily("t_ghist", "gauge histogram", labels=["x"])
    gh.add_metric(["1"], [("1", 1), ("+Inf", 3)], gsum_value=12)
    fams.append(gh)
    s = SummaryMetricFamily("t_summary", "summary", labels=["x"])
    s.add_metric(["1"], 4, 2.5)
    fams.append(s)
    i = InfoMetricFamily("t_build", "info", labels=["v"])
    i.add_metric(["x"], {"commit": 'ab"c'})
    fams.append(i)
    st = StateSetMetricFamily("t_state", "stateset", labels=["x"])
    st.add_metric(["1"], {"up": True, "down": False})
    fams.append(st)
    m = Metric("t_unknown", "untyped", "unknown")
    m.add_sample("t_unknown", {"z": "1", "a": "2"}, 1)
    m.add_sample("t_unknown", {"a": "3"}, 2)  # label names differ from sample to sample
    m.add_sample("t_unknown", {"b": "4"}, 3)  # same count, other name
    fams.append(m)
    weird = Metric("t.utf8-name", "utf-8 names are escaped to underscores", "gauge")
    weird.add_sample("t.utf8-name", {"label.with-dash": "v", "ok": "w"}, 1)
    fams.append(weird)
    return fams


def test_writer_matches_generate_latest_on_odd_families():
    assert write_exposition(_odd_families()) == _reference(_odd_families())


def test_writer_matches_generate_latest_on_golden_fixture(fixture_host):
    snap = fixture_snapshot(fixture_host)
    fams = SnapshotCollector(lambda: snap, clock=lambda: 1_764_000_003.5).collect()
    assert write_exposition(fams) == _reference(fams)


def test_writer_matches_generate_latest_on_the_benchmark_host():
    snap = synthetic_snapshot(40, 4, 80)
    fams = SnapshotCollector(lambda: snap).collect()
    body = write_exposition(fams)
    assert body == _reference(fams)
    assert body.count(b"\n") > 2000


def _scrape_pair(snap, clock, limits=None, renders=2, renderers=None):
    """(cached exposition, full render through generate_latest) for ``renders`` scrapes, each on its own collector."""
    cached = SnapshotCollector(lambda: snap, clock=clock, limits=limits, renderers=renderers)
    full = SnapshotCollector(lambda: snap, clock=clock, limits=limits, renderers=renderers)
    out = []
    for _ in range(renders):
        now = clock()
        out.append((cached.exposition(), _reference(full._collect_all(snap, now))))
    return out


def test_cached_scrapes_equal_full_renders_under_caps_and_cuts():
    snap = synthetic_snapshot(30, 4, 60)
    odd = Vm('db "prod"\\x\n' + "y" * 300, None, "running", 1, (VmDisk("vda", "file", source="/x", stats=DiskStats(rd_reqs=1)),))
    snap = dataclasses.replace(snap, data={**snap.data, "libvirt": Vms(snap.data["libvirt"].vms + (odd,))})
    t = iter(range(1_764_000_000, 1_764_000_100))
    for limits in (None, Limits(max_vms=10, max_disks=25, max_connections=15, max_label_length=40)):
        for cached, full in _scrape_pair(snap, lambda: float(next(t)), limits, renders=3):
            assert cached == full
    # the dropped counter keeps counting at every scrape of the same snapshot
    col = SnapshotCollector(lambda: snap, limits=Limits(max_vms=10))
    first, third = col.exposition(), (col.exposition(), col.exposition())[1]
    line = next(x for x in first.decode().splitlines() if x.startswith('kvmscope_exporter_series_dropped_total{kind="vm"}'))
    n = float(line.rsplit(" ", 1)[1])
    assert n > 0 and f'kvmscope_exporter_series_dropped_total{{kind="vm"}} {3 * n!r}' in third.decode()


def test_a_snapshot_is_rendered_once_but_its_age_and_live_families_are_not():
    from agent.exporters.render_shipping import shipping_renderer

    calls = []
    shipped = {"shipped": 1}
    renderers = load_renderers()
    real = renderers.of(Snapshot.vms)
    renderers = renderers.with_records(Snapshot.vms, lambda data: calls.append(1) or real(data)).with_snapshot(
        shipping_renderer(lambda: dict(shipped)))
    vms = Vms((Vm("a", None, "running", 1, ()),))
    snaps = [Snapshot(1, 100.0, "h", 0.0, data={"libvirt": vms}), Snapshot(2, 110.0, "h", 0.0, data={"libvirt": vms})]
    now, current = [105.0], [snaps[0]]
    col = SnapshotCollector(lambda: current[0], clock=lambda: now[0], renderers=renderers)
    a = col.exposition().decode()
    now[0], shipped["shipped"] = 107.5, 9
    b = col.exposition().decode()
    assert len(calls) == 1
    assert "kvmscope_snapshot_age_seconds 5.0" in a and "kvmscope_snapshot_age_seconds 7.5" in b
    assert "kvmscope_shipping_shipped_documents_total 1.0" in a and "kvmscope_shipping_shipped_documents_total 9.0" in b
    current[0] = snaps[1]
    c = col.exposition().decode()
    assert len(calls) == 2 and "kvmscope_snapshot_timestamp_seconds 110.0" in c
    assert generate_latest(make_registry(lambda: snaps[1], clock=lambda: 107.5, renderers=renderers)).decode() == c


def test_a_live_family_that_names_vms_falls_back_to_a_full_render():
    """A live renderer adding to the caps or to a cached family's name: the scrape is rendered whole."""

    def live(snap):
        f = GaugeMetricFamily("kvmscope_vm_running", "dup", labels=["vm", "manager"])
        f.add_metric(["zz-live", "libvirt"], 1)
        g = GaugeMetricFamily("kvmscope_test_live", "live", labels=["vm"])
        g.add_metric(["live-vm"], 2)
        return [f, g]

    renderers = load_renderers().with_snapshot(live)
    snap = synthetic_snapshot(6, 2, 8)
    clock = iter(range(1000, 1100))
    for cached, full in _scrape_pair(snap, lambda: float(next(clock)), Limits(max_vms=4), renders=2, renderers=renderers):
        assert cached == full
        assert b'vm="zz-live"' not in cached  # over the cap of 4 VMs, name order
    for cached, full in _scrape_pair(snap, lambda: float(next(clock)), None, renders=1, renderers=renderers):
        assert cached == full and b'kvmscope_vm_running{manager="libvirt",vm="zz-live"} 1.0' in cached


@pytest.mark.parametrize("snap", [None, Snapshot(1, 1.0, "h", 0.0)])
def test_empty_agent(snap):
    col = SnapshotCollector(lambda: snap, clock=lambda: 5.0)
    assert col.exposition() == generate_latest(make_registry(lambda: snap, clock=lambda: 5.0)) == col.exposition()


def test_paths_are_joined_once_per_snapshot_object():
    from agent.records.paths import build_paths

    snap = synthetic_snapshot(5, 2, 5)
    first = snap.paths
    assert first and snap.paths is first and list(first) == build_paths(snap)
    other = dataclasses.replace(snap, data={k: v for k, v in snap.data.items() if k != "storage_tcp"})
    assert other.paths is not first and list(other.paths) == build_paths(other) != list(first)
    mapped = build_paths(snap, {p.connection.split("->")[0].rsplit(":", 1)[0]: "eth9" for p in first if p.connection})
    assert {p.interface for p in mapped if p.connection} == {"eth9"}


def _catalog_and_plain_families():
    """The same samples twice: in the catalog's row families and in prometheus_client's own classes."""
    from agent.exporters.catalog import MetricDef

    g = MetricDef("t_rows_gauge", "gauge", 'rows: \\ and\n"', ("vm", "disk", "a"))
    c = MetricDef("t_rows_total", "counter", "rows counter", ("vm", "b"))
    h = MetricDef("t_rows_seconds", "histogram", "rows histogram", ("vm", "op", "source"))
    h0 = MetricDef("t_rows_nolabels_seconds", "histogram", "no labels", ())
    n = MetricDef("t_rows_nolabels", "gauge", "no labels", ())
    plain = [GaugeMetricFamily(g.name, g.help, labels=g.labels), CounterMetricFamily(c.name, c.help, labels=c.labels),
             HistogramMetricFamily(h.name, h.help, labels=h.labels), HistogramMetricFamily(h0.name, h0.help, labels=[]),
             GaugeMetricFamily(n.name, n.help, labels=[])]
    rows = [g.family(), c.family(), h.family(), h0.family(), n.family()]
    for fams in (plain, rows):
        gf, cf, hf, h0f, nf = fams
        for i, v in enumerate(ODD):
            gf.add_metric([v, ODD[-1 - i], str(i)], NUMBERS[i % len(NUMBERS)])
            cf.add_metric([v, "x"], NUMBERS[(i + 3) % len(NUMBERS)])
            buckets = [("1e-06", i), ("0.5", 2 * i), ("1234567.0", 10**7 + i), ("+Inf", 10**7 + i)]
            hf.add_metric([v, "read", 'q"'], buckets, i / 7 if i % 3 else None)
        hf.add_metric(["neg", "read", "x"], [("-1.0", 1), ("+Inf", 2)], 3.0)  # negative bucket: no count and sum
        h0f.add_metric([], [("0.1", 1), ("+Inf", 5)], 0.25)
        nf.add_metric([], 7)
    return rows, plain


def test_row_families_write_generate_latests_bytes_and_give_its_samples():
    rows, plain = _catalog_and_plain_families()
    assert all(f.rows() for f in rows)  # nothing materialized: the writer's row path runs
    assert write_exposition(rows) == _reference(plain)
    for r, p in zip(rows, plain):
        assert r.samples == p.samples and r.rows() is None  # read as samples: prometheus_client's, in its order
    assert write_exposition(rows) == _reference(plain)  # the sample path of the same families


def test_caps_on_rows_equal_caps_on_samples():
    """The caps over row families (drops counted per sample a row stands for) and over materialized samples."""
    from agent.exporters.caps import SeriesCap

    snap = synthetic_snapshot(12, 3, 30)
    odd = Vm('db "prod"\\x\n' + "y" * 300, None, "running", 1, (VmDisk("vda", "file", source="/x", stats=DiskStats(rd_reqs=1)),))
    snap = dataclasses.replace(snap, data={**snap.data, "libvirt": Vms(snap.data["libvirt"].vms + (odd,))})
    renderers = load_renderers()
    for limits in (Limits(), Limits(max_vms=5, max_disks=9, max_connections=7, max_label_length=40)):
        rows = SnapshotCollector(lambda: snap, clock=lambda: 5.0, limits=limits, renderers=renderers)
        fams_r = rows._collect_all(snap, 5.0)
        fams_p = list(render_agent_families(snap)) + _all_families(snap, renderers)
        for f in fams_p:
            f.samples  # materialized: the caps take the sample path
        cap = SeriesCap(limits)
        cap.apply(fams_p)
        fams_p.extend(cap.families())
        assert write_exposition(fams_r) == _reference(fams_p)
        assert rows.cap.dropped_total == cap.dropped_total and rows.cap.capped_now == cap.capped_now
        if limits.max_vms == 5:
            assert all(rows.cap.dropped_total.values()) and b"~" in write_exposition(fams_r)


def render_agent_families(snap):
    from agent.exporters.collector import render_agent

    return render_agent(snap, 5.0)


def _all_families(snap, renderers):
    from agent.exporters.collector import _records_families, _run_snapshot_renderer, merge_families

    fams = _records_families(snap, renderers.records)
    for render in renderers.snapshot:
        fams.extend(_run_snapshot_renderer(render, snap))
    return merge_families(fams)


def test_caps_count_every_sample_of_a_dropped_histogram_row():
    from agent.exporters.caps import SeriesCap
    from agent.exporters.catalog import MetricDef

    d = MetricDef("t_cap_seconds", "histogram", "h", ("vm", "disk"))
    fams = []
    for materialize in (False, True):
        f = d.family()
        for vm in ("a", "b", "c"):
            f.add_metric([vm, "vda"], [("0.1", 1), ("1.0", 2), ("+Inf", 3)], 0.5)  # 3 buckets + count + sum
            f.add_metric([vm, "vdb"], [("-1.0", 1), ("+Inf", 3)], 0.5)  # 2 buckets, no count and sum
        if materialize:
            f.samples
        cap = SeriesCap(Limits(max_vms=1, max_disks=1))
        cap.apply([f])
        fams.append(f)
        assert cap.dropped_total == {"vm": 14, "disk": 2, "connection": 0}
    assert write_exposition(fams[:1]) == _reference(fams[1:])


def test_a_family_rewritten_only_when_its_rows_changed():
    """The writer reuses a family's last text only for equal rows: a changed value, label or row is written anew."""
    rows, plain = _catalog_and_plain_families()
    first = write_exposition(rows)
    again, again_plain = _catalog_and_plain_families()
    assert write_exposition(again) == first
    changed, changed_plain = _catalog_and_plain_families()
    for fams in (changed, changed_plain):
        fams[0].add_metric(["new", "vda", "1"], 2.5)
        fams[1].add_metric(["b\\", "x"], 3)
        fams[2].add_metric(["z", "write", "libiscsi"], [("0.1", 1), ("+Inf", 4)], 0.75)
    assert write_exposition(changed) == _reference(changed_plain) != first
    rows[1].add_metric(["late", "x"], 1)  # a row added to a family after it was written
    plain[1].add_metric(["late", "x"], 1)
    assert write_exposition(rows) == _reference(plain)


def test_ebpf_histogram_buckets_are_decodes():
    import random

    from agent.ebpf import decode
    from agent.exporters.render_ebpf import histogram_buckets

    rnd = random.Random(3)
    for _ in range(500):
        sm = rnd.choice([0, 1, 5, 26, 36])
        slots = {rnd.randint(0, sm + 3): rnd.randint(0, 10**6) for _ in range(rnd.randint(0, 12))}
        assert histogram_buckets(slots, sm) == decode.cumulative_buckets(slots, sm)


def test_storage_connection_columns_reused_only_for_the_same_records():
    """An idle connection's tcp_info record comes back as the same object: its rows are reused; a changed record, a
    connection gone or added gives the rows a render from scratch gives."""
    from agent.exporters import render_inventory as ri
    from agent.records.tcp import StorageConnections

    snap = synthetic_snapshot(6, 2, 12)
    conns = snap.storage_tcp.connections

    def with_conns(cs):
        return dataclasses.replace(snap, data={**snap.data, "storage_tcp": StorageConnections(tuple(cs))})

    moved = [conns[0], dataclasses.replace(conns[1], info=dataclasses.replace(conns[1].info, rtt_us=999_999))] + list(conns[2:])
    prev = None
    for cs in (conns, conns, moved, moved[1:], list(conns) + [dataclasses.replace(conns[0], sport=1)]):
        s = with_conns(cs)
        ri._last_columns.clear()
        ri._last_labels[0] = []
        ref = write_exposition(ri.render_storage_connections(s))
        if prev is not None:
            before = ri.render_storage_connections(prev)  # what the last render left: the previous snapshot's
        fams = ri.render_storage_connections(s)
        assert write_exposition(fams) == ref
        if prev is not None and cs is conns:  # same records: the same row objects
            assert all(a is b for a, b in zip(before[0]._rows, fams[0]._rows)) and len(fams[0]._rows) == 12
        if prev is not None and cs is moved:  # one record moved: the column is made again, with its new value
            assert fams[0]._rows != before[0]._rows and fams[0]._rows[1][1] == 999_999 / 1e6
        prev = s
