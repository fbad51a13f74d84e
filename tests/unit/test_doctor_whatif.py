"""The doctor's what-if per multipath map and portal (agent/doctor/checks_multipath.py)."""

from dataclasses import replace

from agent.config import Config
from agent.doctor import DoctorInput
from agent.doctor.checks_multipath import multipath_whatif
from agent.hostpaths import HostPaths
from agent.records.multipath import Multipath
from tests.unit.test_multipath import STATUS_OK, STATUS_ONE_FAILED
from tests.unit.test_rules_kernel import P1, P2, snap

CONF = "defaults {\n    polling_interval 5\n    no_path_retry 12\n}\n"


def run(tmp_path, s, npr=None):
    (tmp_path / "etc").mkdir(exist_ok=True)
    (tmp_path / "etc" / "multipath.conf").write_text(CONF)
    if npr is not None:
        s = replace(s, data={**s.data, "multipath": Multipath(tuple(replace(m, no_path_retry=npr)
                                                                    for m in s.data["multipath"].maps))})
    paths = HostPaths(procfs=tmp_path / "proc", sysfs=tmp_path / "sys", etcdir=tmp_path / "etc")
    return {r.subject: r for r in multipath_whatif(DoctorInput(Config(), paths, s))}


def test_both_paths_up_each_portal_fails_over_to_the_other(tmp_path):
    # sessions: noop_out_interval (recv_tmo) 5, noop_out_timeout (ping_tmo) 5, replacement_timeout 15
    res = run(tmp_path, snap(1, STATUS_OK, openers=[(777, "loadgen")]), npr="12 chk")
    r1 = res[f"mpatha if {P1} fails"]
    assert r1.status == "ok"
    assert r1.finding == f"if {P1} fails now: db01, loadgen (pid 777) stall 20-25 s and fail over to sdc via {P2}"
    assert r1.values["stall_s"] == 25 and r1.values["stall_range_s"] == [20, 25]
    assert r1.values["detect_s"] == [5, 10] and r1.values["replacement_timeout_s"] == 15
    assert res[f"mpatha if {P2} fails"].values["remaining"] == ["sdb"]


def test_portal_of_the_last_usable_path_bounded_queueing_gives_errors(tmp_path):
    res = run(tmp_path, snap(1, STATUS_ONE_FAILED), npr="12 chk")
    r2 = res[f"mpatha if {P2} fails"]
    assert r2.status == "warning" and r2.values["outcome"] == "errors"
    # 25 s to declare the path dead, then 12 x 5 s of queueing
    assert r2.values["errors_after_s"] == 85 and r2.values["queue_s"] == 60
    assert "get I/O errors after 85 s (queueing 60 s = no_path_retry x polling_interval 5 s)" in r2.finding
    # the already failed portal: the map still has sdc to fail over to
    assert res[f"mpatha if {P1} fails"].values["outcome"] == "failover"


def test_queueing_for_ever_hangs(tmp_path):
    res = run(tmp_path, snap(1, STATUS_ONE_FAILED), npr="on")
    r2 = res[f"mpatha if {P2} fails"]
    assert r2.status == "problem" and r2.values["outcome"] == "hang"
    assert r2.finding.startswith(f"if {P2} fails now: db01 hang (I/O queued with no limit) until {P2} returns")


def test_fail_at_once(tmp_path):
    r2 = run(tmp_path, snap(1, STATUS_ONE_FAILED), npr="off")[f"mpatha if {P2} fails"]
    assert r2.values["errors_after_s"] == 25 and r2.values["queue_s"] == 0


def test_no_multipath_is_skipped(tmp_path):
    s = snap(1, None, multipath=False)
    [r] = multipath_whatif(DoctorInput(Config(), HostPaths(etcdir=tmp_path), s))
    assert r.status == "skipped" and "no dm-multipath maps" in r.finding


def test_standby_path_group_stalls_nothing(tmp_path):
    """path_grouping_policy failover (the lab's kernel host): one path per group, I/O on group 1 only."""
    table = "mpatha: 0 131072 multipath 1 queue_if_no_path 0 2 1 service-time 0 1 2 8:16 1 1 service-time 0 1 2 8:32 1 1\n"
    status = "mpatha: 0 131072 multipath 2 0 0 0 2 1 A 0 1 2 8:16 A 0 4096 1 E 0 1 2 8:32 A 0 0 1\n"
    res = run(tmp_path, snap(1, status, table=table), npr="12 chk")
    r1, r2 = res[f"mpatha if {P1} fails"], res[f"mpatha if {P2} fails"]
    assert r1.values["outcome"] == "failover" and r1.values["stall_range_s"] == [20, 25]
    assert r2.status == "ok" and r2.values["outcome"] == "no_stall" and r2.values["stall_s"] == 0
    assert r2.finding == (f"if {P2} fails now: db01 do not stall: I/O runs on path group 1 via sdb via {P1}; "
                          "the standby path is marked failed after 20-25 s")


def test_whatif_on_the_real_kernel_host_capture(tmp_path):
    """The lab's kernel-initiator host as captured (tests/fixtures/hosts/kernel-initiator-real): its sessions'
    live timeouts (multipathd wrote fast_io_fail_tmo 5 s into recovery_tmo; NOP-Out 5 s / 5 s) and its map
    (path_grouping_policy failover: sda via portal 1 carries the I/O, sdb via portal 2 is the standby)."""
    from agent.records.snapshot import Snapshot
    from agent.sources import SourceContext
    from agent.sources.iscsi_kernel import IscsiKernelSource
    from agent.sources.multipath import (build_maps, parse_dm_status, parse_dm_table, parse_multipathd_json,
                                         read_dm_devices)
    from tests.unit.test_real_captures import REAL

    cmd = REAL / "cmd"
    paths = HostPaths(sysfs=REAL / "sys", procfs=tmp_path / "proc", etcdir=tmp_path / "etc")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "multipath.conf").write_text((cmd / "etc-multipath.conf").read_text())
    sessions = IscsiKernelSource(SourceContext(Config(), paths), runner=lambda argv, t: (
        cmd / f"iscsiadm-m-session-r{argv[argv.index('-r') + 1]}-s.txt").read_text()).collect()
    maps = build_maps(parse_dm_table((cmd / "dmsetup-table.txt").read_text()),
                      parse_dm_status((cmd / "dmsetup-status.txt").read_text()),
                      parse_multipathd_json((cmd / "multipathd-show-maps-json.json").read_text()),
                      read_dm_devices(paths), lambda d: None)
    s = Snapshot(1, 0.0, "kvmslab-kh", 0.1, data={"iscsi_kernel": sessions, "multipath": Multipath(tuple(maps))})
    res = {r.subject: r for r in multipath_whatif(DoctorInput(Config(), paths, s))}
    r1, r2 = res[f"mpatha if {P1} fails"], res[f"mpatha if {P2} fails"]
    assert r1.values["outcome"] == "failover" and r1.values["remaining"] == ["sdb"]
    assert r1.values["detect_s"] == [5, 10] and r1.values["replacement_timeout_s"] == 5
    # predicted 10-15 s; the lab measured the load's stall at 15.4-15.5 s (deploy/lab/README.md, kernel host)
    assert r1.values["stall_range_s"] == [10, 15]
    assert r2.values["outcome"] == "no_stall" and r2.values["polling_interval_from"] == "multipath.conf line 5"
