"""Exposition of a fixture snapshot: golden file and catalog consistency."""

from prometheus_client.exposition import generate_latest

from agent.config import Config
from agent.exporters import catalog
from agent.exporters.collector import make_registry
from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.sources import SourceContext
from agent.sources.host_tcp import HostTcpSource


def fixture_snapshot(fixture_host):
    data = HostTcpSource(SourceContext(Config(), fixture_host("basic"))).collect()
    return Snapshot(
        seq=7,
        timestamp=1_764_000_000.0,
        host="kvm01",
        duration_seconds=0.0125,
        data={"host_tcp": data},
        health={
            "host_tcp": SourceHealth("host_tcp", Status.OK, 0.0005),
            "iscsi": SourceHealth("iscsi", Status.NODATA, 0.001, "no sessions"),
            "libvirt": SourceHealth("libvirt", Status.FAILED, 4.0, "timed out after 4s"),
        },
    )


def test_exposition_golden(fixture_host, golden, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "python_version", lambda: "3.11.2")
    snap = fixture_snapshot(fixture_host)
    reg = make_registry(lambda: snap, clock=lambda: 1_764_000_003.5)
    golden("host-basic.prom", generate_latest(reg).decode())


def test_collector_success_semantics(fixture_host):
    snap = fixture_snapshot(fixture_host)
    text = generate_latest(make_registry(lambda: snap)).decode()
    assert 'kvmscope_collector_success{collector="host_tcp"} 1.0' in text
    assert 'kvmscope_collector_success{collector="iscsi"} 1.0' in text
    assert 'kvmscope_collector_nodata{collector="iscsi"} 1.0' in text
    assert 'kvmscope_collector_success{collector="libvirt"} 0.0' in text
    assert "kvmscope_host_tcp_retransmitted_segments_total 1234.0" in text


def test_empty_agent_still_serves_build_info():
    text = generate_latest(make_registry(lambda: None)).decode()
    assert "kvmscope_build_info{" in text
    assert "kvmscope_collector_success" not in text


def test_catalog_names_follow_conventions():
    for name, d in catalog.CATALOG.items():
        assert name.startswith("kvmscope_"), name
        assert (d.type == "counter") == name.endswith("_total"), name
        assert d.help.endswith("."), name


def test_odd_vm_names_escaped_and_promtool_accepts():
    import shutil
    import subprocess

    import pytest

    from agent.records.vms import DiskStats, Vm, VmDisk, Vms

    name = 'web "q" \'s\' ü\nnewline\\back'
    vms = Vms((Vm(name, "u", "running", 1, (VmDisk("vda", "file", source="/x", stats=DiskStats(rd_reqs=5)),)),))
    snap = Snapshot(1, 1.0, "h", 0.0, data={"libvirt": vms}, health={})
    text = generate_latest(make_registry(lambda: snap)).decode()
    assert 'kvmscope_vm_disk_requests_total{disk="vda",op="read",vm="web \\"q\\" \'s\' ü\\nnewline\\\\back"} 5.0' in text
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (make test installs Debian prometheus)")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_storage_connection_receive_side_series():
    """Both directions of a storage connection's tcp_info reach /metrics; fields an older kernel does
    not have (None) give no series rather than a false zero."""
    from agent.exporters.render_inventory import render_storage_connections
    from agent.records.snapshot import Snapshot, SourceHealth, Status
    from agent.records.tcp import StorageConnection, StorageConnections, TcpInfo

    info = TcpInfo(rtt_us=14700, min_rtt_us=600, rcv_rtt_us=9000, segs_in=50, data_segs_in=40, segs_out=60,
                   data_segs_out=45, rcv_ooopack=7, dsack_dups=2, reord_seen=1, delivered=44, busy_time_us=2_500_000,
                   rwnd_limited_us=500_000, sndbuf_limited_us=0)
    old = TcpInfo(rtt_us=500, segs_in=5, segs_out=6)  # e.g. Linux 4.2
    conns = StorageConnections((
        StorageConnection("ipv4", "ESTABLISHED", "198.18.1.1", 40000, "198.18.1.2", 3260, 1, None, None, info),
        StorageConnection("ipv4", "ESTABLISHED", "198.18.2.1", 40001, "198.18.2.2", 3260, 2, None, None, old)))
    snap = Snapshot(1, 0.0, "h", 0.0, data={"storage_tcp": conns},
                    health={"storage_tcp": SourceHealth("storage_tcp", Status.OK, 0)})
    fams = {f.name: f for f in render_storage_connections(snap)}

    def val(name, portal, **labels):
        got = [s.value for s in fams[name].samples if s.labels["portal"] == portal
               and all(s.labels[k] == v for k, v in labels.items()) and not s.name.endswith("_created")]
        return got[0] if got else None

    p1, p2 = "198.18.1.2:3260", "198.18.2.2:3260"
    assert val("kvmscope_storage_connection_min_rtt_seconds", p1) == 0.0006
    assert val("kvmscope_storage_connection_receive_rtt_seconds", p1) == 0.009
    assert val("kvmscope_storage_connection_out_of_order_segments", p1) == 7
    assert val("kvmscope_storage_connection_dsacks", p1) == 2
    assert val("kvmscope_storage_connection_segments", p1, direction="received", kind="data") == 40
    assert val("kvmscope_storage_connection_send_limited_seconds", p1, limit="receive_window") == 0.5
    assert val("kvmscope_storage_connection_send_busy_seconds", p1) == 2.5
    assert val("kvmscope_storage_connection_segments", p2, direction="received", kind="all") == 5
    assert val("kvmscope_storage_connection_out_of_order_segments", p2) is None
    assert val("kvmscope_storage_connection_min_rtt_seconds", p2) is None
