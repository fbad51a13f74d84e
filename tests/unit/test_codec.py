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


# -- found by tests/fuzz/test_fuzz_codec.py: snapshot JSON from outside (an agent's API,
# a recording) that does not fit the records is one SnapshotError, never a crash or a
# record holding the wrong type
import json  # noqa: E402

import pytest  # noqa: E402

from agent.codec import SnapshotError, snapshot_from_json  # noqa: E402
from agent.errors import KvmscopeError  # noqa: E402

GOOD = {"seq": 1, "timestamp": 1.5, "host": "h", "duration_seconds": 0.1, "health": {},
        "data": {"libvirt": {"vms": [{"name": "vm1", "uuid": None, "state": "running", "pid": 7, "disks": [
            {"target": "vda", "kind": "file", "stats": {"rd_reqs": 3}}]}], "failed": []}}}


def _with(path, value):
    doc = json.loads(json.dumps(GOOD))
    node = doc
    for k in path[:-1]:
        node = node[k]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.mark.parametrize("doc, words", [
    ([], "not an object"),
    (_with(("seq",), KeyError), "KeyError"),
    (_with(("seq",), "1"), "seq must be an integer"),
    (_with(("timestamp",), None), "not a finite number"),
    (_with(("timestamp",), float("inf")), "not a finite number"),
    (_with(("health",), {"x": None}), "health 'x'"),
    (_with(("health",), {"x": {"name": "x", "status": "bad", "duration_seconds": 0}}), "ValueError"),
    (_with(("data",), []), "data and health must be objects"),
    (_with(("data", "libvirt", "vms"), None), "data 'libvirt'"),
    (_with(("data", "libvirt", "vms"), {"a": 1}), "data 'libvirt'"),
    (_with(("data", "libvirt", "vms", 0, "disks", 0, "stats", "rd_reqs"), None), "data 'libvirt'"),
    (_with(("data", "libvirt", "vms", 0), "vm1"), "data 'libvirt'"),
])
def test_snapshot_json_that_does_not_fit_is_one_clear_error(doc, words):
    with pytest.raises(SnapshotError, match="does not fit") as e:
        snapshot_from_json(doc)
    assert words in str(e.value)
    assert isinstance(e.value, KvmscopeError) and isinstance(e.value, ValueError)


def test_snapshot_json_that_fits_still_decodes():
    snap = snapshot_from_json(GOOD)
    assert snap.data["libvirt"].vms[0].disks[0].stats.rd_reqs == 3 and snap.data["libvirt"].vms[0].pid == 7


def test_pairs_that_are_not_pairs():
    for bad in ({"__pairs__": [[["a", 1]]]}, {"__pairs__": 5}):
        with pytest.raises((TypeError, ValueError)):
            decode(dict[tuple[str, int], int], bad)
        with pytest.raises(SnapshotError):
            snapshot_from_json(_with(("data", "libvirt", "vms", 0, "disks", 0, "stats", "histograms"), bad))


def test_recording_whose_snapshots_do_not_fit(tmp_path):
    for text in ('{"kvmscope_recording": 1}', '{"kvmscope_recording": 1, "snapshots": [[]]}'):
        with pytest.raises(KvmscopeError, match="not a kvmscope recording|does not fit"):
            load_recording(io.StringIO(text))


def test_ebpf_records_survive_the_api_round_trip():
    """The local API and recordings carry the probes' data as records (the decoder used to drop it:
    ProbeSource.collect has no return type), with their ProbeStats a record too."""
    import json

    from agent import codec
    from agent.records.ebpf import BlockHistogram, BlockIoData, ProbeStats, TcpConnection, TcpRetransData
    from agent.records.snapshot import Snapshot, SourceHealth, Status

    stats = ProbeStats(events=12, lost=1, run_time_ns=5000, run_cnt=10, per_program={"tcp:x": {"run_cnt": 10}})
    conn = TcpConnection("ipv4", "10.0.0.1", 40000, "10.0.0.2", 3260, True, 5, 0, 1, 0, "ESTABLISHED",
                         ("ESTABLISHED",), 123)
    retrans = TcpRetransData(connections=(conn,), storage={("10.0.0.2", 3260): {"retransmits": 5}},
                             other={"retransmits": 1}, totals={"retransmits": 6}, events=(), stream_dropped=0,
                             probe=stats)
    block = BlockIoData(histograms=(BlockHistogram("sda", 8, 0, "read", "total", {3: 2, 4: 1}, 3, 90, 12288),),
                        processes=(), totals={"issued": 3}, probe=stats)
    snap = Snapshot(1, 1700000000.0, "h", 0.1, {"ebpf_tcp_retrans": retrans, "ebpf_block_io": block},
                    {"ebpf_tcp_retrans": SourceHealth("ebpf_tcp_retrans", Status.OK, 0.01)})
    back = codec.snapshot_from_json(json.loads(json.dumps(codec.snapshot_to_json(snap))))
    assert back.data["ebpf_tcp_retrans"] == retrans
    assert back.data["ebpf_block_io"] == block
    assert back.data["ebpf_block_io"].probe.ns_per_event == 500.0
