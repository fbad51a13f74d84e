"""Snapshots survive JSON and back, record types included."""

import io

from agent.codec import decode, dump_recording, encode, load_recording
from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.records.tcp import TcpInfo
from agent.records.tcp import StorageConnection, StorageConnections
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from tests.unit.test_topology import kernel_sessions


def test_roundtrip_all_inventory_records(tmp_path):
    sessions = kernel_sessions(tmp_path)
    vms = Vms((Vm("vm 'ü'\n", "u", "running", 7, (VmDisk("vda", "network", "iscsi", "iqn.x/1", (("198.18.1.2", 3260),),
                                                       "iqn.x", 1, stats=DiskStats(rd_reqs=3, histograms={"rd": {"boundaries_ns": [1], "bins": [1, 2]}})),)),),
              failed=(("sock", "no answer"),))
    conns = StorageConnections((StorageConnection("ipv4", "ESTABLISHED", "198.18.1.1", 1, "198.18.1.2", 3260, 9, 7, "qemu",
                                                  TcpInfo(rtt_us=5, bytes_acked=10)),))
    snap = Snapshot(3, 1.5, "h", 0.1, data={"iscsi_kernel": sessions, "libvirt": vms, "storage_tcp": conns},
                    health={"libvirt": SourceHealth("libvirt", Status.FAILED, 0.2, "boom")})
    buf = io.StringIO()
    dump_recording([snap], buf)
    (back,) = load_recording(io.StringIO(buf.getvalue()))
    assert back == snap


def test_tuple_keyed_dicts():
    tp = dict[tuple[str, int], dict[str, int]]
    v = {("198.18.1.2", 3260): {"retransmit": 4}}
    assert decode(tp, encode(v)) == v


def test_not_a_recording():
    import pytest

    from agent.errors import KvmscopeError

    with pytest.raises(KvmscopeError, match="not a kvmscope recording"):
        load_recording(io.StringIO('{"x": 1}'))
    with pytest.raises(KvmscopeError, match="not a kvmscope recording"):
        load_recording(io.StringIO("garbage"))
