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
