"""Each doctor check on fixture hosts (tests/fixtures/etc/hosts.py): /etc trees, kernel iSCSI
sysfs trees built like the kernel's, VM disks from domain XML, storage sockets."""

from dataclasses import replace

import pytest

from agent.config import Config
from agent.doctor import DoctorInput, Result, exit_code, load_checks, run_checks
from agent.hostpaths import HostPaths
from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.records.tcp import StorageConnections
from agent.records.vms import Vms
from tests.fixtures.etc.hosts import ETC, make_host


def inp_for(name, tmp_path, timers=None, bcc=(True, "bcc at fixture"), **cfg_over):
    h = make_host(name, tmp_path)
    cfg = Config.model_validate({
        "ebpf": {"kernel_build": str(tmp_path / "build")},
        "storage_log": {"qemu_logs": [str(tmp_path / "qemu" / "*.log")]},
        **cfg_over,
    })
    return DoctorInput(cfg, h["paths"], h["snapshot"], socket_timers=timers, bcc_status=lambda: bcc)


def by(results, check):
    return [r for r in results if r.check == check]


def flagged(results):
    return sorted((r.check, r.status, r.subject) for r in results if r.status in ("warning", "problem"))


def test_good_host_has_nothing_to_flag(tmp_path):
    res = run_checks(inp_for("good", tmp_path))
    assert flagged(res) == []
    assert exit_code(res) == 0
    assert {r.check for r in res} == {c.name for c in load_checks()}  # every check said something


BAD_FINDINGS = [
    ("disk_cache", "problem", "app01/vda"),
    ("disk_cache", "warning", "web01/vda"),
    ("disk_error_policy", "problem", "app01/vda"),
    ("disk_error_policy", "warning", "web01/vda"),
    ("ebpf_readiness", "warning", "host"),
    ("iscsi_timeouts", "problem", "session(s) 1, 2"),
    ("iscsi_timeouts", "warning", "configuration"),
    ("iscsi_timeouts", "warning", "session(s) 3"),
    ("iscsi_timeouts", "warning", "/etc/iscsi/iscsid.conf"),
    ("libiscsi_keepalive", "warning", "app01/vda"),
    ("mtu", "warning", "eth1"),
    ("mtu", "warning", "eth1, eth2"),
    ("nop_out", "warning", "connection 3:0"),
    ("nop_out", "warning", "connection 4:0, connection 5:0"),
    ("nop_out", "warning", "/etc/iscsi/iscsid.conf"),
    ("single_path", "warning", "iqn.2003-01.org.example.stor:lun-b LUN 0"),
    ("single_path", "warning", "iqn.2003-01.org.example.stor:lun-c LUN 0"),
]


def test_bad_host_flags_each_misconfiguration_and_only_those(tmp_path):
    res = run_checks(inp_for("bad", tmp_path))
    assert flagged(res) == sorted(BAD_FINDINGS)
    assert exit_code(res) == 3
    # what is fine on the bad host stays ok
    ok = sorted((r.check, r.subject) for r in res if r.status == "ok")
    assert ok == [("disk_cache", "ci01/vda"), ("iscsi_timeouts", "session(s) 4, 5"),
                  ("libiscsi_keepalive", "ci01/vda"), ("nop_out", "connection 1:0, connection 2:0"),
                  ("single_path", "iqn.2003-01.org.example.stor:lun-a LUN 0")]


def test_iscsi_timeouts_values_come_from_sysfs_and_multipath(tmp_path):
    res = by(run_checks(inp_for("bad", tmp_path), ["iscsi_timeouts"]), "iscsi_timeouts")
    (p,) = [r for r in res if r.status == "problem"]
    assert p.values["replacement_timeout"] == 120 and p.values["multipath"] is True
    assert p.values["all_paths_down"] == "queue forever"
    assert p.values["devices_queue_forever"] == ["ACME/Block.*"]
    assert "features \"1 queue_if_no_path\" (multipath.conf line 5)" in p.finding
    (info,) = [r for r in res if r.status == "info"]
    assert info.values == {"iscsid_conf": 90, "sessions": [5, 120]}  # last assignment in iscsid.conf wins
    good = by(run_checks(inp_for("good", tmp_path / "g"), ["iscsi_timeouts"]), "iscsi_timeouts")
    (ok,) = good
    assert ok.status == "ok" and ok.values["all_paths_down"] == "queue 12 x polling_interval 5 s = 60 s, then fail"


def test_iscsi_timeouts_without_sessions_judges_the_config(tmp_path):
    inp = inp_for("good", tmp_path)
    inp.snapshot = replace(inp.snapshot, data={k: v for k, v in inp.snapshot.data.items() if k != "iscsi_kernel"})
    (r,) = by(run_checks(inp, ["iscsi_timeouts"]), "iscsi_timeouts")
    assert r.status == "ok" and r.values["replacement_timeout_from"] == "iscsid.conf line 17"
    assert r.subject.endswith("iscsid.conf (no session logged in)")


def test_multipath_long_replacement_timeout_is_a_warning(tmp_path):
    root = tmp_path / "etc"
    (root / "iscsi").mkdir(parents=True)
    (root / "iscsi" / "iscsid.conf").write_text("node.session.timeo.replacement_timeout = 120\n")
    (root / "multipath.conf").write_text("defaults {\n no_path_retry 6\n}\n")
    inp = inp_for("good", tmp_path / "h")
    inp.paths = replace(inp.paths, etcdir=root)
    inp.snapshot = replace(inp.snapshot, data={k: v for k, v in inp.snapshot.data.items() if k != "iscsi_kernel"})
    (r,) = by(run_checks(inp, ["iscsi_timeouts"]), "iscsi_timeouts")
    assert r.status == "warning" and "waits up to 120 s" in r.why and "queue 6 x polling_interval 5 s = 30 s" in r.finding


def test_no_open_iscsi_at_all_is_skipped_with_the_reason(tmp_path):
    cfg = Config()
    snap = Snapshot(1, 0.0, "h", 0.0, {}, {"iscsi_kernel": SourceHealth("iscsi_kernel", Status.NODATA, 0, "no sessions")})
    inp = DoctorInput(cfg, HostPaths(etcdir=tmp_path), snap, bcc_status=lambda: (True, "x"))
    res = run_checks(inp, ["iscsi_timeouts", "nop_out", "single_path", "mtu", "disk_cache", "libiscsi_keepalive"])
    assert [r.status for r in res] == ["skipped"] * 6
    assert "iscsi_kernel had no data: no sessions" in res[0].finding
    assert exit_code(res) == 0


@pytest.mark.parametrize("timers,expect", [
    ([2, 1, 2], "on"),
    ([0, 1], "off"),
    ([1, 1, 1], "unknown"),
    (None, "unknown"),
])
def test_libiscsi_keepalive_reads_socket_timers(tmp_path, timers, expect):
    conn = "192.0.2.20:46003->192.0.2.2:3260"  # ci01's socket in the bad fixture
    inp = inp_for("bad", tmp_path, timers=(lambda: {conn: timers}) if timers is not None else None)
    (r,) = [r for r in by(run_checks(inp, ["libiscsi_keepalive"]), "libiscsi_keepalive") if r.subject == "ci01/vda"]
    assert r.status == "ok" and r.values["tcp_keepalive"] == expect and r.values["connections"] == [conn]
    assert r.values["nop_reconnects_in_log"] is None  # ci01 has no log file


def test_mtu_without_connections_is_skipped(tmp_path):
    inp = inp_for("good", tmp_path)
    inp.snapshot = replace(inp.snapshot, data={**inp.snapshot.data, "storage_tcp": StorageConnections(())})
    (r,) = run_checks(inp, ["mtu"])
    assert r.status == "skipped"


def test_vm_checks_skip_when_libvirt_failed(tmp_path):
    inp = inp_for("good", tmp_path)
    data = {k: v for k, v in inp.snapshot.data.items() if k != "libvirt"}
    health = {**inp.snapshot.health, "libvirt": SourceHealth("libvirt", Status.FAILED, 0, "cannot connect")}
    inp.snapshot = replace(inp.snapshot, data=data, health=health)
    res = run_checks(inp, ["disk_cache", "disk_error_policy", "libiscsi_keepalive"])
    assert [r.status for r in res] == ["skipped"] * 3
    assert all("libvirt failed: cannot connect" in r.finding for r in res)


def test_writeback_on_libiscsi_explains_migration_not_page_cache(tmp_path):
    inp = inp_for("good", tmp_path)
    vms = inp.snapshot.data["libvirt"].vms
    vms = tuple(replace(v, disks=tuple(replace(d, cache="writeback") for d in v.disks)) for v in vms)
    inp.snapshot = replace(inp.snapshot, data={**inp.snapshot.data, "libvirt": Vms(vms)})
    res = {r.subject: r for r in run_checks(inp, ["disk_cache"])}
    assert res["web01/vda"].status == "warning" and "no host page cache" in res["web01/vda"].why
    assert res["db01/vda"].status == "warning" and "host page cache" in res["db01/vda"].why


def test_ebpf_readiness_tracefs_missing_is_info_when_privileged(tmp_path):
    inp = inp_for("good", tmp_path)
    inp.paths = replace(inp.paths, tracefs=tmp_path / "no-tracefs")
    (r,) = run_checks(inp, ["ebpf_readiness"])
    assert r.status == "info" and "tracefs not mounted" in r.finding
    assert not (tmp_path / "no-tracefs").exists()  # doctor never mounts anything


def test_ebpf_readiness_without_bcc(tmp_path):
    inp = inp_for("good", tmp_path, bcc=(False, "python module bcc not found"))
    (r,) = run_checks(inp, ["ebpf_readiness"])
    assert r.status == "warning" and "bcc: python module bcc not found" in r.finding and "python3-bpfcc" in r.fix


def test_a_crashing_check_never_hides_the_others(tmp_path, monkeypatch):
    from agent import doctor

    load_checks()
    info = doctor.CHECKS["mtu"]

    def boom(_inp):
        raise KeyError("surprise")

    monkeypatch.setitem(doctor.CHECKS, "mtu", replace(info, func=boom))
    res = run_checks(inp_for("good", tmp_path))
    (m,) = by(res, "mtu")
    assert m.status == "skipped" and m.error == "KeyError: 'surprise'"
    assert len({r.check for r in res}) == len(load_checks())
    assert exit_code(res) == 1  # nothing flagged, but a check could not run


def test_result_rejects_unknown_status():
    with pytest.raises(ValueError):
        Result("x", "bad", "host", "f")


def test_etc_reading_merges_conf_d_and_reports_unreadable_files(tmp_path):
    from agent.doctor.etc import read_iscsid, read_multipath

    mp = read_multipath(HostPaths(etcdir=ETC / "bad"))
    assert [f.path.name for f in mp.files] == ["multipath.conf", "local.conf"]
    assert mp.conf.section("blacklist").get("wwid") == "3600508b1001c0123456789abcdef0123"
    assert mp.effective()["features"].value == "1 queue_if_no_path"
    (tmp_path / "multipath.conf").mkdir()  # a directory where a file should be
    (tmp_path / "iscsi").mkdir()
    (tmp_path / "iscsi" / "iscsid.conf").write_bytes(b"node.session.timeo.replacement_timeout = 10\xff\n")
    mp = read_multipath(HostPaths(etcdir=tmp_path))
    assert mp.conf is None and mp.errors and "cannot read" in mp.errors[0]
    isc = read_iscsid(HostPaths(etcdir=tmp_path))
    assert isc.conf.get("node.session.timeo.replacement_timeout").value == "10\ufffd"
    inp = DoctorInput(Config(), HostPaths(etcdir=tmp_path), Snapshot(1, 0.0, "h", 0.0, {}, {}))
    res = run_checks(inp, ["iscsi_timeouts"])
    assert ("warning", "configuration") in [(r.status, r.subject) for r in res]
    assert any(r.status == "info" and "unknown" in r.finding for r in res)  # '10\ufffd' is not a number
