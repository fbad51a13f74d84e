"""Diagnosis of the kernel path (agent/diagnose/rules_kernel.py) on windows of snapshots built from the
multipath source's parsers (dmsetup/multipathd formats) and the iSCSI, block and VM records."""

from dataclasses import replace

from agent.config import DiagnoseConfig
from agent.diagnose.report import diagnose
from agent.records.block import BlockDevice, BlockDevices
from agent.records.iscsi import IscsiConnection, IscsiSession, IscsiSessions, ScsiDisk
from agent.records.multipath import Multipath
from agent.records.snapshot import Snapshot
from agent.records.storage_log import StorageLogEvent, StorageLogEvents
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from agent.sources.multipath import build_maps, parse_dm_status, parse_dm_table
from tests.unit.test_multipath import STATUS_ALL_FAILED, STATUS_OK, STATUS_ONE_FAILED, TABLE

P1, P2 = "198.18.1.2:3260", "198.18.2.2:3260"


def snap(seq, status, states=("LOGGED_IN", "LOGGED_IN"), reqs=None, openers=(), multipath=True, events=(),
         table=TABLE):
    def sess(sid, addr, disk, devno, state):
        c = IscsiConnection(f"{sid}:0", addr, 3260, addr, 3260, 41000 + sid, "up" if state == "LOGGED_IN" else "failed",
                            5, 5)
        holders = (("dm-0",), ("mpatha",)) if multipath else ((), ())
        return IscsiSession(sid, "iqn.t", 1, state, 15, "default", None, f"host{sid}", None, None, (c,),
                            (ScsiDisk(f"{sid}:0:0:1", 1, disk, devno, "running", *holders),))

    n = seq * 100 if reqs is None else reqs
    stats = DiskStats(rd_reqs=n, rd_bytes=n * 4096, rd_time_ns=n * 2_000_000, wr_reqs=0, wr_bytes=0, wr_time_ns=0)
    vms = Vms((Vm("db01", "u1", "running", 4242, (VmDisk("vda", "block", source="/dev/mapper/mpatha",
                                                            host_devno="253:0" if multipath else "8:16",
                                                            stats=stats),)),))
    data = {"libvirt": vms,
            "iscsi_kernel": IscsiSessions((sess(1, "198.18.1.2", "sdb", "8:16", states[0]),
                                           sess(2, "198.18.2.2", "sdc", "8:32", states[1])))}
    if multipath:
        maps = build_maps(parse_dm_table(table), parse_dm_status(status), None, {"mpatha": ("dm-0", "253:0")},
                          {"8:16": "sdb", "8:32": "sdc"}.get)
        data["multipath"] = Multipath(tuple(replace(m, openers=tuple(openers)) for m in maps))
        data["block_devices"] = BlockDevices((BlockDevice("dm-0", "253:0", "mpatha", ("sdb", "sdc"), (), {}),
                                              BlockDevice("sdb", "8:16", None, (), ("dm-0",), {}),
                                              BlockDevice("sdc", "8:32", None, (), ("dm-0",), {})))
    else:
        data["block_devices"] = BlockDevices((BlockDevice("sdb", "8:16", None, (), (), {}),))
    if events:
        data["storage_log"] = StorageLogEvents(tuple(events), 1, len(events))
    return Snapshot(seq, 1000.0 + 5 * seq, "kvm1", 0.1, data=data)


def run(snaps):
    _w, findings = diagnose(snaps, DiagnoseConfig(), if_addrs={})
    return findings


def test_failover_names_the_vm_the_failed_and_the_remaining_path():
    findings = run([snap(1, STATUS_OK), snap(2, STATUS_ONE_FAILED, states=("FAILED", "LOGGED_IN")),
                    snap(3, STATUS_ONE_FAILED, states=("FAILED", "LOGGED_IN"))])
    [f] = [f for f in findings if f.rule == "multipath_failover"]
    assert f.severity == "warning" and f.cause_key == "multipath_failover:multipath:mpatha:failed"
    assert f.title.startswith("mpatha: path sdb via 198.18.1.2:3260 failed; db01 kept running on sdc via "
                              "198.18.2.2:3260 (db01/vda 2.0 ms)")
    assert f"{P2} carries the load" in f.cause and "session 1 FAILED" in f.cause
    assert f.evidence["remaining_paths"] == [{"path": "sdc", "devno": "8:32", "portal": P2, "session": 2}]
    # the generic "session 1 is FAILED" finding of the same outage is folded into this one
    assert not [x for x in findings if x.rule == "path_down"]
    assert "path_down:session:1" in f.evidence["explains_also"]
    # nothing about portal 2 but that it carries the load
    assert all(P2 not in x.title for x in findings if x is not f)
    assert not [x for x in findings if x.severity == "critical"]


def test_all_paths_down_with_queueing_is_critical_and_names_the_hung_workloads():
    findings = run([snap(1, STATUS_OK), snap(2, STATUS_ONE_FAILED, states=("FAILED", "LOGGED_IN")),
                    snap(3, STATUS_ALL_FAILED, states=("FAILED", "FAILED"), reqs=200,
                         openers=[(4242, "qemu-system-x86"), (777, "loadgen")])])
    [f] = [f for f in findings if f.rule == "multipath_all_paths_down"]
    assert f.severity == "critical" and f.scope == "all VMs on the map"
    assert f.title == f"mpatha: every path down ({P1}, {P2}); I/O is queued: db01, loadgen (pid 777) hang"
    assert f.evidence["workloads"] == [{"pid": 4242, "comm": "qemu-system-x86"}, {"pid": 777, "comm": "loadgen"}]
    assert {"path_down:session:1", "path_down:session:2"} <= set(f.evidence["explains_also"])
    assert not [x for x in findings if x.rule in ("path_down", "multipath_failover")]


def test_path_back_within_the_window_is_information_only():
    findings = run([snap(1, STATUS_OK), snap(2, STATUS_ONE_FAILED), snap(3, STATUS_OK)])
    [f] = [f for f in findings if f.rule == "multipath_failover"]
    assert f.severity == "info" and f.evidence["paths_failed_in_window"] == ["sdb"]


def test_healthy_map_says_nothing():
    assert [f for f in run([snap(1, STATUS_OK), snap(2, STATUS_OK)]) if f.rule.startswith(("multipath", "kernel"))] == []


def test_session_in_recovery_without_multipath_names_its_vm():
    findings = run([snap(1, None, multipath=False), snap(2, None, states=("FAILED", "LOGGED_IN"), multipath=False)])
    [f] = [f for f in findings if f.rule == "kernel_session_recovery"]
    assert f.severity == "critical" and f.title == f"iSCSI session 1 to {P1} is FAILED (no multipath): db01 stall"
    assert "recovery_tmo 15 s" in f.cause
    assert not [x for x in findings if x.rule == "path_down" and x.subject == {"kind": "session", "id": "1"}]


def test_scsi_timeouts_joined_to_portal_map_and_vm():
    ev = StorageLogEvent(time=1010.0, kind="scsi_timeout", message="sd 2:0:0:1: [sdb] tag#3 timing out command, waited 30s",
                         origin="kernel", path="/dev/kmsg", offset=5, file_id="kmsg:x", device="sdb")
    findings = run([snap(1, STATUS_OK), snap(2, STATUS_OK, events=[ev])])
    [f] = [f for f in findings if f.rule == "scsi_timeouts"]
    assert f.title == f"sdb: 1 SCSI command timeout(s)/abort(s) via {P1}; db01 waited"
    assert f.evidence["multipath"] == ["mpatha"]
