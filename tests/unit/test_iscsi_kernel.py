"""Kernel iSCSI sessions on sysfs trees built like the kernel's (no initiator here)."""

import shutil

import pytest

from agent.config import Config
from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.sources import SourceContext
from agent.sources.iscsi_kernel import IscsiKernelSource, Unwrapper, parse_iscsiadm_stats
from tests.fixtures.sysfs_iscsi import Sess, build, stats_text

T1 = "iqn.2003-01.org.linux-iscsi.stor1:lun-db"
A = Sess(sid=1, host=7, target=T1, portal="198.18.1.2", local_port=41001, disk="sdb", devno="8:16", lun=1)
B = Sess(sid=2, host=8, target=T1, portal="198.18.2.2", local_port=41002, disk="sdc", devno="8:32", lun=1)


def paths_for(root):
    return HostPaths(procfs=root / "proc", sysfs=root / "sys")


def runner_for(outputs: dict[int, str]):
    def run(argv, timeout):
        assert argv[:4] == ["iscsiadm", "-m", "session", "-r"] and argv[5] == "-s"
        return outputs[int(argv[4])]

    return run


def source(root, runner):
    return IscsiKernelSource(SourceContext(Config(), paths_for(root)), runner=runner)


def test_two_sessions_two_portals_one_multipath(tmp_path):
    build(tmp_path / "sys", [A, B], multipath={"dm-0:mpatha": ["sdb", "sdc"]})
    data = source(tmp_path, runner_for({1: stats_text(A), 2: stats_text(B, digest_err=3)})).collect()
    assert [s.sid for s in data.sessions] == [1, 2]
    s1, s2 = data.sessions
    assert s1.target == T1 and s1.state == "LOGGED_IN" and s1.recovery_tmo == 120
    assert s1.portal == "198.18.1.2:3260" and s2.portal == "198.18.2.2:3260"
    assert s1.host == "host7" and s1.netdev is None and s1.host_ipaddress == "192.0.2.10"
    c = s1.connections[0]
    assert (c.cid, c.address, c.port, c.local_port, c.state) == ("1:0", "198.18.1.2", 3260, 41001, "up")
    d1, d2 = s1.disks[0], s2.disks[0]
    assert (d1.hctl, d1.lun, d1.name, d1.devno, d1.state) == ("7:0:0:1", 1, "sdb", "8:16", "running")
    assert d1.holders == ("dm-0",) and d1.holder_names == ("mpatha",)
    assert d2.name == "sdc" and d2.holders == ("dm-0",)
    assert s1.stats["scsicmd_pdus"] == 25600 and s1.stats["txdata_octets"] == 52428800
    assert s2.stats["digest_err"] == 3
    assert len(s1.stats) == 24  # 21 SNMP + 3 extended
    assert data.vanished == () and data.iscsiadm is None


def test_failed_session_during_recovery(tmp_path):
    failed = Sess(sid=3, host=9, target=T1, portal="198.18.2.2", state="FAILED", conn_state="failed",
                  disk_state="blocked", recovery_tmo="5", disk="sdd", devno="8:48")
    build(tmp_path / "sys", [A, failed])
    # offload drivers answer -ENOTCONN for address/port while unbound: the file reads fail
    (tmp_path / "sys/class/iscsi_connection/connection3:0/address").unlink()
    (tmp_path / "sys/class/iscsi_connection/connection3:0/port").unlink()
    data = source(tmp_path, runner_for({1: stats_text(A), 3: stats_text(failed)})).collect()
    s3 = data.sessions[1]
    assert s3.state == "FAILED" and s3.recovery_tmo == 5
    assert s3.connections[0].state == "failed" and s3.connections[0].address is None
    assert s3.portal == "198.18.2.2:3260"  # persistent address still known
    assert s3.disks[0].state == "blocked"


def test_error_counters_grow_and_u32_wrap(tmp_path):
    build(tmp_path / "sys", [A])
    outputs = {1: stats_text(A, scsicmd_pdus=4294967290, digest_err=1, timeout_err=2)}
    src = source(tmp_path, runner_for(outputs))
    first = src.collect().sessions[0].stats
    outputs[1] = stats_text(A, scsicmd_pdus=10, digest_err=5, timeout_err=9)
    second = src.collect().sessions[0].stats
    assert first["scsicmd_pdus"] == 4294967290
    assert second["scsicmd_pdus"] == 4294967290 + 16  # wrapped past 2**32
    assert (second["digest_err"], second["timeout_err"]) == (5, 9)


def test_unwrapper_resets_when_session_recreated():
    u = Unwrapper()
    u.update((1, "t"), {"txdata_octets": 1000, "scsicmd_pdus": 50})
    out = u.update((1, "t"), {"txdata_octets": 10, "scsicmd_pdus": 2})  # u64 went down: new session
    assert out == {"txdata_octets": 10, "scsicmd_pdus": 2}


class VanishingPaths(HostPaths):
    """Deletes session 2's tree when its targetname is read: a logout racing the read."""

    def read_text(self, path):
        if path.name == "targetname" and "session2" in str(path):
            real = (self.sysfs / "class/iscsi_session/session2").resolve()
            shutil.rmtree(real.parent.parent)  # devices/platform/host8/session2
            (self.sysfs / "class/iscsi_session/session2").unlink()
            raise FileNotFoundError(path)
        return super().read_text(path)


def test_logout_racing_the_read(tmp_path):
    build(tmp_path / "sys", [A, B])
    src = IscsiKernelSource(
        SourceContext(Config(), VanishingPaths(sysfs=tmp_path / "sys")),
        runner=runner_for({1: stats_text(A), 2: stats_text(B)}),
    )
    data = src.collect()
    assert [s.sid for s in data.sessions] == [1]
    assert data.vanished == (2,)


@pytest.mark.parametrize(
    "exc, reason",
    [
        (FileNotFoundError("iscsiadm not installed"), "iscsiadm not installed"),
        (RuntimeError("iscsiadm -m session -r 1 -s exited 21: iscsiadm: No session found."),
         "iscsiadm -m session -r 1 -s exited 21: iscsiadm: No session found."),
    ],
)
def test_iscsiadm_absent_or_failing(tmp_path, exc, reason):
    build(tmp_path / "sys", [A, B])

    def run(argv, timeout):
        raise exc

    data = source(tmp_path, run).collect()
    assert [s.sid for s in data.sessions] == [1, 2]
    assert all(s.stats is None for s in data.sessions)
    assert data.sessions[0].stats_error == reason
    assert data.iscsiadm == reason


def test_no_sessions_is_nodata(tmp_path):
    (tmp_path / "sys").mkdir()
    with pytest.raises(NoData, match="iscsi_session absent"):
        source(tmp_path, runner_for({})).collect()
    (tmp_path / "sys/class/iscsi_session").mkdir(parents=True)
    with pytest.raises(NoData, match="no kernel iSCSI sessions logged in"):
        source(tmp_path, runner_for({})).collect()


def test_parse_old_header_formats():
    text = "[01:000001] 10.1.1.1:3260,1 iqn.x\niSCSI SNMP:\n\ttxdata_octets: 7\n\tdigest_err: 2\n"
    assert parse_iscsiadm_stats(text) == {"txdata_octets": 7, "digest_err": 2}


def test_parse_odd_output_ignored():
    assert parse_iscsiadm_stats("iscsiadm: No active sessions.\n\tgarbage: x\n") == {}


def test_real_iscsiadm_runner_reports_absent_binary():
    from agent.sources.iscsi_kernel import run_command

    with pytest.raises(FileNotFoundError, match="kvmscope-no-such-tool not installed"):
        run_command(["kvmscope-no-such-tool"], 1)
    with pytest.raises(RuntimeError, match="exited 3"):
        run_command(["sh", "-c", "echo boom >&2; exit 3"], 5)
    with pytest.raises(RuntimeError, match="timed out after 0.2s"):
        run_command(["sleep", "5"], 0.2)


# -- one bounded budget for iscsiadm (issue 16 #7) ---------------------------------
# A real executable named iscsiadm on PATH (a shell script): it prints the session's
# counters from a file, or sleeps for the sessions listed in SLOW, like an iscsid
# that stopped answering.

FOUR = [Sess(sid=i, host=6 + i, target=T1, portal=f"198.18.{i}.2", local_port=41000 + i, disk=f"sd{'bcde'[i - 1]}",
             devno=f"8:{16 * i}", lun=1) for i in (1, 2, 3, 4)]


@pytest.fixture
def fake_iscsiadm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "iscsiadm"
    script.write_text(
        "#!/bin/sh\n"
        f"d={tmp_path}\n"
        'for s in $(cat "$d/SLOW" 2>/dev/null); do [ "$s" = "$4" ] && exec sleep 30; done\n'
        'echo "$4" >> "$d/calls"\n'
        'cat "$d/stats.$4"\n'
    )
    script.chmod(0o755)
    for s in FOUR:
        (tmp_path / f"stats.{s.sid}").write_text(stats_text(s))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")

    def slow(*sids):
        (tmp_path / "SLOW").write_text(" ".join(map(str, sids)))

    return slow


def _pgrep_sleep30() -> list[str]:
    import subprocess

    return subprocess.run(["pgrep", "-f", "^sleep 30$"], capture_output=True, text=True).stdout.split()


def test_hung_iscsiadm_bounded_by_one_budget(tmp_path, fake_iscsiadm):
    """Four sessions and an iscsiadm that hangs: once 2 s each, serially (8 s against the 4 s deadline,
    and the sysfs data lost with the timeout). Now one budget for all calls; every session still reports
    its sysfs state, with the reason its counters are missing."""
    import time

    from agent.loop import Agent
    from agent.records.snapshot import Status

    build(tmp_path / "sys", FOUR)
    fake_iscsiadm(1, 2, 3, 4)
    before = set(_pgrep_sleep30())
    cfg = Config()
    cfg.agent.collector_timeout = 4.0
    src = IscsiKernelSource(SourceContext(cfg, paths_for(tmp_path)))
    agent = Agent([src], interval=5.0, timeout=cfg.agent.collector_timeout, hostname="h")
    t0 = time.monotonic()
    snap = agent.collect_once()
    elapsed = time.monotonic() - t0
    assert snap.health["iscsi_kernel"].status is Status.OK, snap.health["iscsi_kernel"]
    # the promise is the collector deadline (4 s), against 8 s for four serial 2 s timeouts; the 2 s
    # budget plus killing and reaping the hung child can pass 3 s on a loaded 2-CPU machine
    assert elapsed < cfg.agent.collector_timeout, f"collect took {elapsed:.1f}s"
    data = snap.data["iscsi_kernel"]
    assert [(s.sid, s.state) for s in data.sessions] == [(1, "LOGGED_IN"), (2, "LOGGED_IN"), (3, "LOGGED_IN"), (4, "LOGGED_IN")]
    assert all(s.stats is None and s.stats_error for s in data.sessions)
    assert "timed out" in data.sessions[0].stats_error
    assert all("skipped" in s.stats_error for s in data.sessions[1:]), [s.stats_error for s in data.sessions]
    assert data.iscsiadm and "timed out" in data.iscsiadm
    assert set(_pgrep_sleep30()) <= before, "the hung iscsiadm's children must be killed with it"


def test_one_slow_session_others_keep_counters_and_rotate(tmp_path, fake_iscsiadm):
    import time

    build(tmp_path / "sys", FOUR)
    fake_iscsiadm(2)
    cfg = Config()
    cfg.agent.collector_timeout = 4.0
    src = IscsiKernelSource(SourceContext(cfg, paths_for(tmp_path)))
    t0 = time.monotonic()
    data = src.collect()
    assert time.monotonic() - t0 < cfg.agent.collector_timeout
    by = {s.sid: s for s in data.sessions}
    assert by[1].stats is not None and by[1].stats["scsicmd_pdus"] == 25600
    assert by[2].stats is None and "timed out" in by[2].stats_error
    assert by[3].stats is None and "skipped" in by[3].stats_error and by[4].stats is None
    # next cycle: the sessions not asked last time go first, the one that timed out last: none starves
    fake_iscsiadm()
    (tmp_path / "calls").unlink()
    data = src.collect()
    assert all(s.stats is not None for s in data.sessions), [s.stats_error for s in data.sessions]
    assert (tmp_path / "calls").read_text().split() == ["3", "4", "1", "2"]
    assert data.iscsiadm is None


def test_ipv6_session_in_the_kernels_full_form_is_canonical(tmp_path):
    # libiscsi.c writes connection addresses with %pI6: all eight groups, zero-padded
    full_target, full_host = "fd00:6b76:6d73:0006:0000:0000:0000:0002", "fd00:6b76:6d73:0006:0000:0000:0000:0001"
    v6 = Sess(sid=3, host=9, target=T1, portal=full_target, ipaddress=full_host, local_port=41003, disk="sdd",
              devno="8:48", lun=1)
    build(tmp_path / "sys", [v6])
    (s,) = source(tmp_path, runner_for({3: stats_text(v6)})).collect().sessions
    import socket

    inet_diag_dst = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, full_target))
    assert s.connections[0].address == s.connections[0].persistent_address == inet_diag_dst == "fd00:6b76:6d73:6::2"
    assert s.portal == "[fd00:6b76:6d73:6::2]:3260" and s.host_ipaddress == "fd00:6b76:6d73:6::1"
