"""The multipath source: dmsetup table/status and multipathd's JSON, parsed and joined."""

import json

import pytest

from agent.config import Config
from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.sources import SourceContext
from agent.sources.iscsi_kernel import CommandTimeout
from agent.sources.multipath import (
    MultipathSource,
    build_maps,
    parse_dm_status,
    parse_dm_table,
    parse_multipathd_json,
    parse_no_path_retry,
)

# drivers/md/dm-mpath.c formats: service-time selector (2 table args, 2 info args per path), alua handler
TABLE = "mpatha: 0 2097152 multipath 1 queue_if_no_path 1 alua 1 1 service-time 0 2 2 8:16 1 1 8:32 1 1\n"
STATUS_OK = "mpatha: 0 2097152 multipath 2 0 0 0 1 1 A 0 2 2 8:16 A 0 0 1 8:32 A 0 0 1\n"
STATUS_ONE_FAILED = "mpatha: 0 2097152 multipath 2 0 0 0 1 1 A 0 2 2 8:16 F 1 0 1 8:32 A 0 0 1\n"
STATUS_ALL_FAILED = "mpatha: 0 2097152 multipath 2 1 0 0 1 1 A 0 2 2 8:16 F 2 0 1 8:32 F 1 0 1\n"
# two groups (failover policy), round-robin (1 arg each)
TABLE_2PG = ("mpathb: 0 409600 multipath 0 0 2 1 round-robin 0 1 1 8:48 1000 round-robin 0 1 1 8:64 1000\n"
             "vg-root: 0 100 linear 8:1 2048\n")
STATUS_2PG = "mpathb: 0 409600 multipath 2 0 0 0 2 2 E 0 1 1 8:48 F 3 0 A 0 1 1 8:64 A 0 0\n"


def daemon_json(states=(("sdb", "8:16", "active", "ready", "running"), ("sdc", "8:32", "active", "ready", "running")),
                queueing="5 chk"):
    return json.dumps({
        "major_version": 0, "minor_version": 1,
        "maps": [{
            "name": "mpatha", "uuid": "360014051234", "sysfs": "dm-0", "failback": "immediate",
            "queueing": queueing, "paths": len(states), "write_prot": "rw", "dm_st": "active",
            "features": "1 queue_if_no_path", "hwhandler": "1 alua", "action": "", "path_faults": 1,
            "vend": "IET", "prod": "VIRTUAL-DISK", "rev": "0001", "switch_grp": 0, "map_loads": 1,
            "total_q_time": 0, "q_timeouts": 0,
            "path_groups": [{
                "selector": "service-time 0", "pri": 1, "dm_st": "active", "marginal_st": "normal", "group": 1,
                "paths": [{"dev": d, "dev_t": t, "dm_st": dm, "dev_st": dev, "chk_st": chk, "checker": "tur",
                           "pri": 1, "host_wwnn": "[undef]", "target_wwnn": "iqn.x", "host_wwpn": "[undef]",
                           "target_wwpn": "[undef]", "host_adapter": "192.0.2.10", "marginal_st": "normal"}
                          for d, t, dm, chk, dev in states],
            }],
        }],
    }, indent=3)


def test_table_features_groups_paths():
    t = parse_dm_table(TABLE + TABLE_2PG)
    assert set(t) == {"mpatha", "mpathb"}  # the linear target is not a map
    a = t["mpatha"]
    assert a["feature_words"] == ["queue_if_no_path"] and a["features"] == "1 queue_if_no_path"
    assert a["hwhandler"] == "alua"
    assert a["groups"] == [{"selector": "service-time 0", "paths": ["8:16", "8:32"]}]
    b = t["mpathb"]
    assert b["feature_words"] == [] and b["hwhandler"] is None
    assert [g["paths"] for g in b["groups"]] == [["8:48"], ["8:64"]]


def test_status_path_states_and_queue_io():
    s = parse_dm_status(STATUS_ONE_FAILED)["mpatha"]
    assert s["queue_io"] is False and s["current_group"] == 1
    assert s["groups"][0]["state"] == "active"
    assert [(p["devno"], p["dm_state"], p["fail_count"]) for p in s["groups"][0]["paths"]] == [
        ("8:16", "failed", 1), ("8:32", "active", 0)]
    assert parse_dm_status(STATUS_ALL_FAILED)["mpatha"]["queue_io"] is True
    b = parse_dm_status(STATUS_2PG)["mpathb"]
    assert [g["state"] for g in b["groups"]] == ["enabled", "active"] and b["current_group"] == 2


@pytest.mark.parametrize("bad", [
    "mpatha: 0 2097152 multipath 2 0 0 0 1 1 A 0 2 2 8:16 A 0 0 1",  # ends early
    "mpatha: 0 2097152 multipath 2 0 0 0 1 1 X 0 1 2 8:16 A 0 0 1",  # unknown group state
    "mpatha: 0 2097152 multipath 2 0 0 0 1 1 A 0 1 2 8:16 Q 0 0 1",  # unknown path state
    "mpatha: 0 2097152 multipath two 0 0",
    "No devices found",
    "",
])
def test_odd_status_lines_are_left_out(bad):
    assert parse_dm_status(bad + "\n" + STATUS_2PG).keys() == {"mpathb"}


def test_multipathd_json():
    d = parse_multipathd_json(daemon_json())["mpatha"]
    assert d["uuid"] == "360014051234" and d["dm"] == "dm-0" and d["queueing"] == "5 chk"
    assert d["path_faults"] == 1 and d["vendor"] == "IET"
    assert d["paths"]["8:16"] == {"name": "sdb", "checker_state": "ready", "dev_state": "running",
                                  "dm_state": "active", "checker": "tur", "priority": 1, "group": 1}
    with pytest.raises(ValueError):
        parse_multipathd_json("fail\n")
    with pytest.raises(ValueError):
        parse_multipathd_json('{"major_version": 0}')
    # odd types degrade to None, a path without a MAJ:MIN is left out
    odd = json.loads(daemon_json())
    odd["maps"][0]["path_faults"] = "many"
    odd["maps"][0]["path_groups"][0]["paths"][0]["dev_t"] = None
    d = parse_multipathd_json(json.dumps(odd))["mpatha"]
    assert d["path_faults"] is None and list(d["paths"]) == ["8:32"]


@pytest.mark.parametrize("q,want", [("off", ("fail", None)), ("on", ("queue", None)), ("5 chk", ("retry", 5)),
                                    ("25 sec", ("counting", 25)), ("-", ("unknown", None)), (None, ("unknown", None))])
def test_no_path_retry(q, want):
    assert parse_no_path_retry(q) == want


def test_join_kernel_and_daemon():
    daemon = parse_multipathd_json(daemon_json(states=(("sdb", "8:16", "failed", "faulty", "running"),
                                                       ("sdc", "8:32", "active", "ready", "running"))))
    [m] = build_maps(parse_dm_table(TABLE), parse_dm_status(STATUS_ONE_FAILED), daemon,
                     {"mpatha": ("dm-0", "253:0")}, lambda devno: None)
    assert (m.name, m.dm, m.devno, m.uuid) == ("mpatha", "dm-0", "253:0", "360014051234")
    assert m.queue_if_no_path and not m.queueing_io and m.no_path_retry == "5 chk" and m.hwhandler == "alua"
    assert m.active_paths == 1 and not m.stalled
    p = m.path("sdb")
    assert (p.devno, p.dm_state, p.fail_count, p.checker_state, p.dev_state) == ("8:16", "failed", 1, "faulty", "running")
    assert m.path("8:32").active and m.groups[0].selector == "service-time 0"


def test_all_paths_failed_with_queueing_is_stalled():
    [m] = build_maps(parse_dm_table(TABLE), parse_dm_status(STATUS_ALL_FAILED), None, {}, {"8:16": "sdb"}.get)
    assert m.active_paths == 0 and m.queueing_io and m.stalled
    assert m.path("8:16").name == "sdb" and m.path("8:32").name is None
    assert m.path("8:16").checker_state is None  # no multipathd: the kernel's part only


def test_daemon_only():
    [m] = build_maps(None, None, parse_multipathd_json(daemon_json()), {}, lambda d: None)
    assert m.queue_if_no_path and m.hwhandler == "alua" and m.active_paths == 2
    assert [p.name for p in m.paths] == ["sdb", "sdc"] and m.groups[0].state == "active"


def _ctx(tmp_path, with_module=True):
    if with_module:
        (tmp_path / "sys/module/dm_multipath").mkdir(parents=True)
    blk = tmp_path / "sys/block/dm-0"
    (blk / "dm").mkdir(parents=True)
    (blk / "dm/name").write_text("mpatha\n")
    (blk / "dev").write_text("253:0\n")
    return SourceContext(Config(), HostPaths(procfs=tmp_path / "proc", sysfs=tmp_path / "sys"))


def runner(outputs):
    calls = []

    def run(argv, timeout):
        calls.append(argv)
        v = outputs[argv[0] + " " + argv[1]]
        if isinstance(v, Exception):
            raise v
        return v

    run.calls = calls
    return run


def test_source_collects_both_views(tmp_path):
    r = runner({"dmsetup table": TABLE, "dmsetup status": STATUS_OK, "multipathd show": daemon_json()})
    data = MultipathSource(_ctx(tmp_path), runner=r).collect()
    [m] = data.maps
    assert m.dm == "dm-0" and m.devno == "253:0" and m.active_paths == 2 and data.multipathd is None
    assert r.calls == [["dmsetup", "table", "--target", "multipath"], ["dmsetup", "status", "--target", "multipath"],
                       ["multipathd", "show", "maps", "json"]]


def test_source_without_module_is_nodata(tmp_path):
    with pytest.raises(NoData, match="dm_multipath"):
        MultipathSource(_ctx(tmp_path, with_module=False), runner=runner({})).collect()


def test_multipathd_down_keeps_the_kernel_view(tmp_path):
    r = runner({"dmsetup table": TABLE, "dmsetup status": STATUS_ONE_FAILED,
                "multipathd show": RuntimeError("multipathd show maps json exited 1: error -104 receiving packet")})
    data = MultipathSource(_ctx(tmp_path), runner=r).collect()
    assert data.maps[0].active_paths == 1 and "error -104" in data.multipathd


def test_hung_dmsetup_still_gives_multipathd(tmp_path):
    r = runner({"dmsetup table": CommandTimeout("dmsetup table timed out after 2s"), "dmsetup status": STATUS_OK,
                "multipathd show": daemon_json()})
    data = MultipathSource(_ctx(tmp_path), runner=r).collect()
    assert data.kernel == "dmsetup table timed out after 2s" and data.maps[0].active_paths == 2


def test_budget_spent_stops_calls(tmp_path):
    clock = iter([0.0, 0.0, 0.5] + [5.0] * 5)
    r = runner({"dmsetup table": TABLE, "dmsetup status": STATUS_OK, "multipathd show": daemon_json()})
    data = MultipathSource(_ctx(tmp_path), runner=r, budget=1.0, monotonic=lambda: next(clock)).collect()
    assert len(r.calls) == 2 and "budget" in data.multipathd and data.maps[0].active_paths == 2


class SlowHost:
    """A fake clock and runner: each command takes ``took[cmd]`` seconds (None: hangs until its timeout),
    and times out (CommandTimeout) when that is more than the timeout it is given."""

    def __init__(self, took, outputs):
        self.now, self.took, self.outputs, self.calls = 0.0, took, outputs, []

    def mono(self):
        return self.now

    def run(self, argv, timeout):
        key = argv[0] + " " + argv[1]
        self.calls.append((key, timeout))
        took = self.took[key]
        if took is None or took > timeout:
            self.now += timeout
            raise CommandTimeout(f"{' '.join(argv)} timed out after {timeout:g}s")
        self.now += took
        return self.outputs[key]


def _cfg_ctx(tmp_path, collector_timeout):
    """The lab kernel host's agent settings: interval 15 s, collector_timeout 12 s."""
    ctx = _ctx(tmp_path)
    return SourceContext(Config.model_validate({"agent": {"interval": 15, "collector_timeout": collector_timeout}}),
                         ctx.paths)


def test_slow_host_seconds_per_command_within_the_collector_deadline(tmp_path):
    """The lab's TCG kernel host: dmsetup 2.4 s and 3.0 s, multipathd 2.8 s (a fixed 2 s per call failed
    every view there). With collector_timeout 12 all three answer, within the budget (9 s)."""
    h = SlowHost({"dmsetup table": 2.4, "dmsetup status": 3.0, "multipathd show": 2.8},
                 {"dmsetup table": TABLE, "dmsetup status": STATUS_ONE_FAILED, "multipathd show": daemon_json()})
    src = MultipathSource(_cfg_ctx(tmp_path, 12.0), runner=h.run, monotonic=h.mono)
    data = src.collect()
    assert src.budget == 9.0 and data.kernel is None and data.multipathd is None, (data.kernel, data.multipathd)
    assert data.maps[0].active_paths == 1 and data.maps[0].paths[0].checker_state is not None
    # dmsetup may use the kernel's share (6 s) in all, multipathd the rest of the budget
    assert [(k, round(t, 3)) for k, t in h.calls] == [("dmsetup table", 6.0), ("dmsetup status", 3.6),
                                                        ("multipathd show", 3.6)]
    assert h.now <= src.budget


def test_hung_dmsetup_leaves_multipathd_its_share(tmp_path):
    """dmsetup hangs: it is killed at the kernel's share of the budget, multipathd still answers, and the
    source returns within the budget (before the collector deadline)."""
    h = SlowHost({"dmsetup table": None, "dmsetup status": 0.1, "multipathd show": 2.5},
                 {"dmsetup status": STATUS_OK, "multipathd show": daemon_json()})
    src = MultipathSource(_cfg_ctx(tmp_path, 12.0), runner=h.run, monotonic=h.mono)
    data = src.collect()
    assert [k for k, _t in h.calls] == ["dmsetup table", "multipathd show"]
    assert data.kernel == "dmsetup table --target multipath timed out after 6s" and data.multipathd is None
    assert data.maps[0].active_paths == 2 and h.now <= src.budget < 12.0


def test_timeout_still_caps_each_call(tmp_path):
    h = SlowHost({"dmsetup table": 0.5, "dmsetup status": 0.5, "multipathd show": None},
                 {"dmsetup table": TABLE, "dmsetup status": STATUS_OK})
    data = MultipathSource(_cfg_ctx(tmp_path, 12.0), runner=h.run, monotonic=h.mono, timeout=1.5).collect()
    assert [t for _k, t in h.calls] == [1.5, 1.5, 1.5]
    assert "timed out after 1.5s" in data.multipathd and data.maps[0].active_paths == 2


def test_nothing_answers_is_a_failure(tmp_path):
    r = runner({"dmsetup table": FileNotFoundError("dmsetup not installed"),
                "multipathd show": FileNotFoundError("multipathd not installed")})
    with pytest.raises(RuntimeError, match="neither dmsetup"):
        MultipathSource(_ctx(tmp_path), runner=r).collect()


def test_no_maps_is_nodata(tmp_path):
    r = runner({"dmsetup table": "No devices found\n", "dmsetup status": "No devices found\n",
                "multipathd show": '{"major_version": 0, "minor_version": 1, "maps": []}'})
    with pytest.raises(NoData, match="no multipath maps"):
        MultipathSource(_ctx(tmp_path), runner=r).collect()


def _families(snap):
    from agent.exporters.render_multipath import render_multipath

    out = {}
    for fam in render_multipath(snap):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_metrics_of_a_map_with_a_failed_path():
    from agent.records.iscsi import IscsiConnection, IscsiSession, IscsiSessions, ScsiDisk
    from agent.records.multipath import Multipath
    from agent.records.snapshot import Snapshot

    daemon = parse_multipathd_json(daemon_json(states=(("sdb", "8:16", "failed", "faulty", "running"),
                                                       ("sdc", "8:32", "active", "ready", "running"))))
    maps = build_maps(parse_dm_table(TABLE), parse_dm_status(STATUS_ONE_FAILED), daemon, {"mpatha": ("dm-0", "253:0")},
                      lambda d: None)
    conn = IscsiConnection("1:0", "198.18.1.2", 3260, None, None, 41000, "failed", 5, 5)
    sess = IscsiSession(1, "iqn.x", 1, "FAILED", 5, "default", None, "host2", None, None, (conn,),
                        (ScsiDisk("2:0:0:1", 1, "sdb", "8:16", "running", ("dm-0",), ("mpatha",)),))
    snap = Snapshot(1, 0.0, "h", 0.0, data={"multipath": Multipath(tuple(maps)), "iscsi_kernel": IscsiSessions((sess,))})
    f = _families(snap)
    assert f["kvmscope_multipath_maps"] == [({}, 1)]
    assert f["kvmscope_multipath_map_paths"] == [({"map": "mpatha"}, 2)]
    assert f["kvmscope_multipath_map_active_paths"] == [({"map": "mpatha"}, 1)]
    assert f["kvmscope_multipath_map_queue_if_no_path"] == [({"map": "mpatha"}, 1)]
    assert f["kvmscope_multipath_map_queueing"] == [({"map": "mpatha"}, 0)]
    assert f["kvmscope_multipath_map_no_path_retry_checks"] == [({"map": "mpatha"}, 5)]
    assert "kvmscope_multipath_map_queueing_remaining_seconds" not in f
    assert f["kvmscope_multipath_map_path_faults_total"] == [({"map": "mpatha"}, 1)]
    assert f["kvmscope_multipath_path_up"] == [
        ({"map": "mpatha", "path": "sdb", "portal": "198.18.1.2:3260", "devno": "8:16", "group": "1"}, 0),
        ({"map": "mpatha", "path": "sdc", "portal": "", "devno": "8:32", "group": "1"}, 1)]
    faulty = [(lab["path"], v) for lab, v in f["kvmscope_multipath_path_checker_state"] if lab["state"] == "faulty"]
    assert faulty == [("sdb", 1), ("sdc", 0)]
    assert f["kvmscope_multipath_path_failures_total"][0] == (
        {"map": "mpatha", "path": "sdb", "portal": "198.18.1.2:3260"}, 1)


def test_metrics_of_a_map_queueing_with_no_path():
    from agent.records.multipath import Multipath
    from agent.records.snapshot import Snapshot

    daemon = parse_multipathd_json(daemon_json(states=(("sdb", "8:16", "failed", "faulty", "running"),
                                                       ("sdc", "8:32", "failed", "faulty", "running")),
                                               queueing="20 sec"))
    maps = build_maps(parse_dm_table(TABLE), parse_dm_status(STATUS_ALL_FAILED), daemon, {}, lambda d: None)
    f = _families(Snapshot(1, 0.0, "h", 0.0, data={"multipath": Multipath(tuple(maps))}))
    assert f["kvmscope_multipath_map_queueing"] == [({"map": "mpatha"}, 1)]
    assert f["kvmscope_multipath_map_queueing_remaining_seconds"] == [({"map": "mpatha"}, 20)]
    assert f["kvmscope_multipath_map_active_paths"] == [({"map": "mpatha"}, 0)]
    assert _families(Snapshot(1, 0.0, "h", 0.0)) == {}


def _mp_snapshot(seq, status, daemon_states=None):
    """A host with VM db01 on mpatha (sdb via portal 1, sdc via portal 2)."""
    from agent.records.block import BlockDevice, BlockDevices
    from agent.records.iscsi import IscsiConnection, IscsiSession, IscsiSessions, ScsiDisk
    from agent.records.multipath import Multipath
    from agent.records.snapshot import Snapshot
    from agent.records.vms import Vm, VmDisk, Vms

    def sess(sid, portal, disk, devno):
        c = IscsiConnection(f"{sid}:0", portal, 3260, portal, 3260, 41000 + sid, "up", 5, 5)
        return IscsiSession(sid, "iqn.t", 1, "LOGGED_IN", 5, "default", None, f"host{sid}", None, None, (c,),
                            (ScsiDisk(f"{sid}:0:0:1", 1, disk, devno, "running", ("dm-0",), ("mpatha",)),))

    daemon = parse_multipathd_json(daemon_json(states=daemon_states)) if daemon_states else None
    maps = build_maps(parse_dm_table(TABLE), parse_dm_status(status), daemon, {"mpatha": ("dm-0", "253:0")},
                      {"8:16": "sdb", "8:32": "sdc"}.get)
    blk = BlockDevices((BlockDevice("dm-0", "253:0", "mpatha", ("sdb", "sdc"), (), {}),
                        BlockDevice("sdb", "8:16", None, (), ("dm-0",), {}),
                        BlockDevice("sdc", "8:32", None, (), ("dm-0",), {})))
    vms = Vms((Vm("db01", "u1", "running", 4242,
                  (VmDisk("vda", "block", source="/dev/mapper/mpatha", host_devno="253:0"),)),))
    return Snapshot(seq, 1000.0 + seq, "kvm1", 0.1, data={
        "multipath": Multipath(tuple(maps)), "block_devices": blk, "libvirt": vms,
        "iscsi_kernel": IscsiSessions((sess(1, "198.18.1.2", "sdb", "8:16"), sess(2, "198.18.2.2", "sdc", "8:32")))})


def _events(a, b):
    from agent.shipping.ecs import documents
    from agent.shipping.fields import DATASETS, all_fields, flatten
    from tests.unit.test_ecs import _check_types

    out = []
    for _id, stream, doc in documents(b, a, "default"):
        if doc.get("event", {}).get("action", "").startswith("multipath-"):
            _check_types(flatten(doc), all_fields(DATASETS["events"]))
            out.append(flatten(doc))
    return out


def test_es_events_failover_reinstate_and_no_path():
    ok, one, none = (_mp_snapshot(1, STATUS_OK), _mp_snapshot(2, STATUS_ONE_FAILED),
                     _mp_snapshot(3, STATUS_ALL_FAILED))
    assert _events(None, ok) == []  # first cycle: a baseline only
    [e] = _events(ok, one)
    assert e["event.action"] == "multipath-path-failed" and e["kvmscope.multipath.path"] == "sdb"
    assert e["kvmscope.portal"] == "198.18.1.2:3260" and e["kvmscope.vm.name"] == ["db01"]
    assert e["kvmscope.multipath.active_paths"] == 1 and e["kvmscope.multipath.paths"] == 2
    assert e["message"] == "multipath mpatha (db01): path sdb to 198.18.1.2:3260 failed; 1 of 2 paths usable"
    ev = _events(one, none)
    assert [x["event.action"] for x in ev] == ["multipath-path-failed", "multipath-map-no-path"]
    assert ev[0]["kvmscope.multipath.path"] == "sdc" and ev[1]["kvmscope.multipath.queueing"] is True
    assert "db01 hang until a path returns" in ev[1]["message"]
    back = _events(none, one)
    assert [x["event.action"] for x in back] == ["multipath-path-reinstated", "multipath-map-restored"]
    # a path that failed and came back between two cycles: its kernel fail count grew
    flap = "mpatha: 0 2097152 multipath 2 0 0 0 1 1 A 0 2 2 8:16 A 2 0 1 8:32 A 0 0 1\n"
    [f] = _events(ok, _mp_snapshot(4, flap))
    assert f["event.action"] == "multipath-path-flapped" and f["kvmscope.multipath.path"] == "sdb"


def test_openers_of_a_block_device(tmp_path):
    """fd links stat'ed to the device node: a block device's MAJ:MIN matches, a char device with equal numbers not."""
    import os

    from agent.sources.multipath import read_openers

    import stat

    node = tmp_path / "dm-0"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(253, 0))  # the agent runs as root, so do its tests
    devno = "253:0"
    for pid, comm, target in ((1234, "loadgen", str(node)), (99, "other", "/dev/null"), (7, "gone", "/nonexistent")):
        fd = tmp_path / "proc" / str(pid) / "fd"
        fd.mkdir(parents=True)
        (fd / "3").symlink_to(target)
        (tmp_path / "proc" / str(pid) / "comm").write_text(comm + "\n")
    paths = HostPaths(procfs=tmp_path / "proc", sysfs=tmp_path / "sys")
    assert read_openers(paths, {devno, "1:3"}) == {devno: [(1234, "loadgen")]}


# -- real outputs of the lab's kernel-initiator host (Debian 6.1 kernel, multipath-tools 0.9.4),
#    captured by tests/lab/capture.py into tests/fixtures/hosts/kernel-initiator-real/cmd/
def _real(name):
    from tests.conftest import ROOT

    return (ROOT / "tests" / "fixtures" / "hosts" / "kernel-initiator-real" / "cmd" / name).read_text()


def test_real_capture_both_paths_active_as_multipathd_shows():
    table, status = parse_dm_table(_real("dmsetup-table.txt")), parse_dm_status(_real("dmsetup-status.txt"))
    daemon = parse_multipathd_json(_real("multipathd-show-maps-json.json"))
    [m] = build_maps(table, status, daemon, {"mpatha": ("dm-0", "254:0")}, lambda d: None)
    assert (m.name, m.dm, m.uuid, m.vendor, m.product) == (
        "mpatha", "dm-0", "360000000000000000e00000000650001", "IET", "VIRTUAL-DISK")
    assert m.queue_if_no_path and not m.queueing_io and m.no_path_retry == "12 chk" and m.hwhandler is None
    # path_grouping_policy failover: one path per group, the kernel uses group 1
    assert [(g.number, g.state, g.selector) for g in m.groups] == [(1, "active", "service-time 0"),
                                                                    (2, "enabled", "service-time 0")]
    assert m.active_group == 1 and m.active_paths == 2
    assert [(p.name, p.devno, p.group, p.dm_state, p.fail_count, p.checker_state, p.dev_state) for p in m.paths] == [
        ("sda", "8:0", 1, "active", 0, "ready", "running"), ("sdb", "8:16", 2, "active", 0, "ready", "running")]
    # the same as multipathd's own table (show paths: dev, dev_t, dm_st, chk_st, dev_st)
    rows = [line.split() for line in _real("multipathd-show-paths.txt").splitlines()[1:]]
    assert [(r[1], r[2], r[4], r[5], r[6]) for r in rows] == [
        (p.name, p.devno, p.dm_state, p.checker_state, p.dev_state) for p in m.paths]


def test_kernel_log_lines_name_the_map_and_path_in_elasticsearch():
    """The kernel writes 'device-mapper: multipath: 254:0: Failing path 8:0.': the document names mpatha and sda."""
    from agent.records.multipath import Multipath
    from agent.records.snapshot import Snapshot
    from agent.records.storage_log import StorageLogEvent, StorageLogEvents
    from agent.shipping.ecs import documents
    from agent.shipping.fields import flatten
    from agent.sources.storage_log_parse import classify

    [m] = build_maps(parse_dm_table(_real("dmsetup-table.txt")), parse_dm_status(_real("dmsetup-status.txt")),
                     parse_multipathd_json(_real("multipathd-show-maps-json.json")), {"mpatha": ("dm-0", "254:0")},
                     lambda d: None)
    msg = "device-mapper: multipath: 254:0: Failing path 8:0."
    ev = StorageLogEvent(time=5.0, message=msg, origin="kernel", path="/dev/kmsg", offset=7, file_id="kmsg:b",
                         **classify(msg))
    s = Snapshot(1, 5.0, "kh", 0.1, data={"multipath": Multipath((m,)), "storage_log": StorageLogEvents((ev,), 1, 1)})
    [d] = [flatten(d) for _i, stream, d in documents(s, None, "default") if "storage_log" in stream]
    assert (d["event.action"], d["kvmscope.multipath.map"], d["kvmscope.multipath.path"]) == (
        "mpath-fail-path", "mpatha", "sda")


def test_openers_scan_stops_at_the_budget(tmp_path, monkeypatch):
    """A scan of /proc cut short by the budget keeps the previous answer and is tried again next cycle."""
    import os
    import stat

    node = tmp_path / "dm-0-node"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(253, 0))
    fd = tmp_path / "proc" / "4242" / "fd"
    fd.mkdir(parents=True)
    (fd / "5").symlink_to(node)
    (tmp_path / "proc" / "4242" / "comm").write_text("loadgen\n")
    r = runner({"dmsetup table": TABLE, "dmsetup status": STATUS_OK, "multipathd show": daemon_json()})
    now = [0.0]
    src = MultipathSource(_ctx(tmp_path), runner=r, budget=1.0, monotonic=lambda: now[0])
    src.paths = HostPaths(procfs=tmp_path / "proc", sysfs=tmp_path / "sys")
    from agent.sources import multipath as mod

    real = mod.read_openers

    def slow_host(paths, want, stop):  # the clock passes the budget as the scan begins
        now[0] = 5.0
        return real(paths, want, stop=stop)

    monkeypatch.setattr(mod, "read_openers", slow_host)
    assert src.collect().maps[0].openers == ()  # the budget ran out before the first process
    monkeypatch.setattr(mod, "read_openers", real)
    now[0] = 100.0
    assert src.collect().maps[0].openers == ((4242, "loadgen"),)  # tried again at once, not a minute later
