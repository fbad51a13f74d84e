"""The pure parts of the lab package (deploy/lab/kvmslab): argument parsing,
the iptables/tgtadm/blkio lines it would write, the status document, the
state file. No root, no lab: the real commands are proven by tests/lab."""

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from tests.conftest import ROOT, wait_for

sys.path.insert(0, str(ROOT / "deploy" / "lab"))

from kvmslab import cli, common, faults, guest, hosts, state, status, target, vms  # noqa: E402
from kvmslab.common import LabError  # noqa: E402

LAB = ROOT / "deploy" / "lab" / "lab"


@pytest.fixture
def lab_dir(tmp_path, monkeypatch):
    d = tmp_path / "lab"
    monkeypatch.setattr(common, "LAB_DIR", str(d))
    return d


def faults_with(**kw):
    f = faults.empty_faults()
    f.update(kw)
    return f


# -- command line -------------------------------------------------------------

def test_subcommands_in_help_order(capsys):
    assert "KVMSCOPE_LAB_DIR" in cli.build_parser().format_help()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bogus"])
    assert ("(choose from 'up', 'down', 'loss', 'throttle-target', 'target-offline', "
            "'target-online', 'shape', 'flap', 'kernel-host', 'status')") in capsys.readouterr().err


def test_parse_defaults_and_options():
    p = cli.build_parser()
    a = p.parse_args(["up"])
    assert (a.cmd, a.vms, a.timeout, a.func) == ("up", 2, 300, cli.cmd_up)
    a = p.parse_args(["up", "--vms", "4", "--timeout", "12.5"])
    assert (a.vms, a.timeout) == (4, 12.5)
    a = p.parse_args(["loss", "5", "--portal", "1"])
    assert (a.cmd, a.pct, a.portal) == ("loss", "5", 1)
    assert p.parse_args(["loss", "0"]).portal is None
    a = p.parse_args(["status"])
    assert (a.json, a.interval) == (False, 2.0)
    assert p.parse_args(["status", "--json", "--interval", "0.5"]).interval == 0.5
    assert p.parse_args(["throttle-target", "off"]).iops == "off"
    assert p.parse_args(["target-offline", "--portal", "2"]).portal == 2


@pytest.mark.parametrize("argv", [[], ["bogus"], ["loss"], ["loss", "5", "--portal", "3"],
                                  ["target-online", "--portal", "0"], ["up", "--vms", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "usage: lab" in capsys.readouterr().err


@pytest.mark.parametrize("text,pct", [("0", 0.0), ("5", 5.0), ("0.5", 0.5), ("100", 100.0)])
def test_parse_pct(text, pct):
    assert faults.parse_pct(text) == pct


@pytest.mark.parametrize("text,msg", [("abc", "PCT must be a number 0..100, got 'abc'"),
                                      ("500", "PCT must be between 0 and 100, got 500"),
                                      ("-1", "PCT must be between 0 and 100, got -1")])
def test_parse_pct_rejects(text, msg):
    with pytest.raises(LabError, match=msg):
        faults.parse_pct(text)


@pytest.mark.parametrize("text,iops", [("off", None), ("OFF", None), ("0", None), ("none", None),
                                       ("50", 50), (" 7 ", 7)])
def test_parse_iops(text, iops):
    assert faults.parse_iops(text) == iops


def test_parse_iops_rejects():
    with pytest.raises(LabError, match="positive integer or 'off', got 'x'"):
        faults.parse_iops("x")
    with pytest.raises(LabError, match="must be > 0"):
        faults.parse_iops("-5")


def test_vm_count_validation():
    kind = vms.LIBVIRT_VMS
    for n in (0, 17):
        with pytest.raises(LabError, match="--vms must be between 1 and 16"):
            kind.validate(cli.build_parser().parse_args(["up", "--vms", str(n)]))
    args = cli.build_parser().parse_args(["up", "--vms", "4"])
    kind.validate(args)
    kind.check_against(None, args)
    kind.check_against({"vm_count": 4}, args)
    with pytest.raises(LabError, match="already up with 2 VMs; run `lab down` before `lab up --vms 4`"):
        kind.check_against({"vm_count": 2}, args)


def test_portal_list():
    assert common.portal_list(None) == [1, 2]
    assert common.portal_list(2) == [2]
    with pytest.raises(LabError):
        common.portal_list(3)


def test_front_is_the_package(tmp_path):
    """deploy/lab/lab run by the system Python answers as the package does."""
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    env = dict(os.environ, KVMSCOPE_LAB_DIR=str(tmp_path / "none"))
    p = subprocess.run([py, str(LAB), "-h"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and p.stdout == cli.build_parser().format_help()
    p = subprocess.run([py, str(LAB), "loss", "5", "--portal", "9"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2 and "invalid choice: 9" in p.stderr


# -- fault registry and iptables rules -----------------------------------------

EMPTY_FAULTS = {"loss_pct": {"1": 0.0, "2": 0.0}, "loss_direction": {"1": "both", "2": "both"},
                "throttle_iops": None, "throttle_iops_by_lun": {}, "offline_portals": [],
                "shape_rate_kbit": {"1": None, "2": None}, "flaps": {"down": [], "periods": []}}


def test_fault_registry():
    assert [s.key for s in faults.FAULTS] == ["loss_pct", "throttle_iops", "offline_portals",
                                              "shape_rate_kbit", "flaps"]
    assert faults.mechanisms() == [faults.IPTABLES, faults.BLKIO, faults.TC]
    assert faults.empty_faults() == EMPTY_FAULTS
    for m in faults.mechanisms():
        assert m.stage in (faults.NETWORK, faults.TARGET)
        assert callable(m.apply) and callable(m.clear)


def test_no_faults_no_rules():
    assert faults.drop_rules(faults.empty_faults()) == []
    assert faults.drop_rules(faults_with(loss_pct={"1": 0, "2": 0.0})) == []


def test_loss_rules_drop_at_the_receiving_end():
    rules = faults.drop_rules(faults_with(loss_pct={"1": 5.0, "2": 0.0}))
    stat = ["-m", "statistic", "--mode", "random", "--probability", "0.050000",
            "-m", "comment", "--comment", "kvmslab portal 1 loss 5%", "-j", "DROP"]
    assert rules == [
        (None, ["iptables", "-w", "-A", "KVMSLAB", "-i", "kvmslab-h1", "-s", "198.18.1.2",
                "-p", "tcp", "--sport", "3260"] + stat),
        ("kvmslab-stor", ["ip", "netns", "exec", "kvmslab-stor", "iptables", "-w", "-A", "KVMSLAB",
                          "-i", "kvmslab-n1", "-d", "198.18.1.2", "-p", "tcp", "--dport", "3260"]
         + stat),
    ]


def test_full_loss_and_fractions():
    rules = faults.drop_rules(faults_with(loss_pct={"1": 100.0, "2": 0.25}))
    assert len(rules) == 4
    assert "statistic" not in rules[0][1] and "kvmslab portal 1 loss 100%" in rules[0][1]
    assert rules[2][1][rules[2][1].index("--probability") + 1] == "0.002500"
    assert "kvmslab portal 2 loss 0.25%" in rules[3][1]


def test_offline_beats_loss_on_its_portal_only():
    rules = faults.drop_rules(faults_with(loss_pct={"1": 5.0, "2": 5.0}, offline_portals=[2]))
    assert [r[1][r[1].index("--comment") + 1] for r in rules] == [
        "kvmslab portal 1 loss 5%", "kvmslab portal 1 loss 5%",
        "kvmslab portal 2 offline", "kvmslab portal 2 offline"]
    assert "statistic" not in rules[2][1]
    assert [r[0] for r in rules] == [None, "kvmslab-stor", None, "kvmslab-stor"]


# -- blkio throttle ------------------------------------------------------------

@pytest.fixture
def blkio(tmp_path, monkeypatch):
    root = tmp_path / "blkio"
    root.mkdir()
    for f in ("blkio.throttle.read_iops_device", "blkio.throttle.write_iops_device"):
        (root / f).write_text("")
    monkeypatch.setattr(faults, "BLKIO_ROOT", str(root))
    return root


def test_throttle_lines(blkio):
    assert faults.throttle_writes(["7:0", "7:1"], 50) == [
        (str(blkio / "blkio.throttle.read_iops_device"), "7:0 50\n"),
        (str(blkio / "blkio.throttle.read_iops_device"), "7:1 50\n"),
        (str(blkio / "blkio.throttle.write_iops_device"), "7:0 50\n"),
        (str(blkio / "blkio.throttle.write_iops_device"), "7:1 50\n")]
    assert {line for _, line in faults.throttle_writes(["7:0"], None)} == {"7:0 0\n"}


def test_set_throttle_writes_each_file(blkio):
    faults.set_throttle(["7:3"], 20)
    assert (blkio / "blkio.throttle.write_iops_device").read_text() == "7:3 20\n"
    assert faults.current_throttles() == {
        str(blkio / "blkio.throttle.read_iops_device"): {"7:3": 20},
        str(blkio / "blkio.throttle.write_iops_device"): {"7:3": 20}}


def test_set_throttle_without_blkio(tmp_path, monkeypatch):
    monkeypatch.setattr(faults, "BLKIO_ROOT", str(tmp_path / "absent"))
    with pytest.raises(LabError, match="cgroup v1 blkio throttling not available"):
        faults.set_throttle(["7:0"], 5)


# -- tgtd / tgtadm / losetup ---------------------------------------------------

def test_tgt_command_lines():
    assert target.tgtd_cmd() == ["ip", "netns", "exec", "kvmslab-stor", "tgtd", "-f", "-C", "42",
                                 "--iscsi", "portal=198.18.1.2:3260"]
    assert target.tgtadm_cmd("--op", "show", "--mode", "sys") == [
        "tgtadm", "-C", "42", "--lld", "iscsi", "--op", "show", "--mode", "sys"]
    assert target.new_target_args(3, "iqn.x:y") == ["--op", "new", "--mode", "target",
                                                     "--tid", "3", "-T", "iqn.x:y"]
    assert target.new_lun_args(3, "/dev/loop2") == [
        "--op", "new", "--mode", "logicalunit", "--tid", "3", "--lun", "1", "-b", "/dev/loop2",
        "--bsoflags", "direct"]
    assert "--bsoflags" not in target.new_lun_args(3, "/dev/loop2", direct=False)
    assert target.bind_args(3)[-2:] == ["--initiator-address", "ALL"]


class FakeRun:
    """Records tgtadm argv; answers `show target` with `shown`, fails what `fail` says."""

    def __init__(self, shown="", fail=()):
        self.cmds, self.shown, self.fail = [], shown, fail

    def __call__(self, cmd, check=True, **kw):
        self.cmds.append(cmd)
        rc = 1 if any(f in cmd for f in self.fail) else 0
        if rc and check:
            raise LabError("failed")
        out = self.shown if cmd[-4:] == ["--op", "show", "--mode", "target"] else ""
        return subprocess.CompletedProcess(cmd, rc, out, "refused" if rc else "")


def test_ensure_target_new(monkeypatch):
    fake = FakeRun()
    monkeypatch.setattr(target, "run", fake)
    target.ensure_target(2, "iqn.a:b", "/dev/loop1")
    assert [c[5:] for c in fake.cmds] == [
        ["--op", "show", "--mode", "target"], target.new_target_args(2, "iqn.a:b"),
        target.new_lun_args(2, "/dev/loop1"), target.bind_args(2)]


def test_ensure_target_present_or_replaced(monkeypatch, capsys):
    shown = "Target 2: iqn.a:b\n    System information:\nTarget 5: iqn.c:d\n"
    assert target.parse_targets(shown) == {2: "iqn.a:b", 5: "iqn.c:d"}
    fake = FakeRun(shown)
    monkeypatch.setattr(target, "run", fake)
    target.ensure_target(2, "iqn.a:b", "/dev/loop1")
    assert len(fake.cmds) == 1                       # already there: nothing to do
    fake = FakeRun(shown, fail=("--bsoflags",))
    monkeypatch.setattr(target, "run", fake)
    target.ensure_target(5, "iqn.new:e", "/dev/loop4")
    assert [c[5:] for c in fake.cmds[1:]] == [
        target.delete_target_args(5), target.new_target_args(5, "iqn.new:e"),
        target.new_lun_args(5, "/dev/loop4"), target.new_lun_args(5, "/dev/loop4", direct=False),
        target.bind_args(5)]
    assert "LUN without O_DIRECT" in capsys.readouterr().err


def test_losetup_parsers():
    assert target.parse_losetup_j("/dev/loop3: [2049]:12 (/var/tmp/kvmscope-lab/a.img)\n"
                                  "junk\n") == ["/dev/loop3"]
    listing = ("/dev/loop0 /var/tmp/kvmscope-lab/kvmslab-vm0-lun.img\n"
               "/dev/loop1 /var/tmp/kvmscope-lab/kvmslab-vm1-lun.img (deleted)\n"
               "/dev/loop2 /srv/other.img\n/dev/loop3\n")
    assert target.parse_losetup_list(listing, "/var/tmp/kvmscope-lab") == ["/dev/loop0", "/dev/loop1"]


# -- state file ------------------------------------------------------------------

def test_state_roundtrip(lab_dir):
    assert state.load_state() is None
    with pytest.raises(LabError, match=f"the lab is not up \\(no state in {lab_dir}\\)"):
        state.require_state()
    assert state.empty_state()["faults"] == {}
    st = state.empty_state(faults.empty_faults())
    assert st["faults"] == EMPTY_FAULTS and st["lab_dir"] == str(lab_dir)
    assert (st["version"], st["vms"], st["tgtd_pid"]) == (1, [], None)
    st["faults"]["loss_pct"]["1"] = 5.0
    state.save_state(st)
    assert os.listdir(lab_dir) == ["state.json"]     # written through a tmp + rename
    assert state.require_state() == st
    assert json.loads((lab_dir / "state.json").read_text())["faults"]["loss_pct"]["1"] == 5.0


def test_state_unreadable(lab_dir):
    lab_dir.mkdir()
    (lab_dir / "state.json").write_text("{not json")
    with pytest.raises(LabError, match="cannot read lab state .*run `lab down` to clean up"):
        state.load_state()


# -- host kinds -------------------------------------------------------------------

def test_vm_records_and_domain(lab_dir):
    vm = vms.vm_record(3, {"loop": "/dev/loop7", "loop_majmin": "7:7"})
    assert vm == {"name": "kvmslab-vm3", "index": 3, "portal": 2,
                  "iqn": "iqn.2025-01.io.kvmscope.lab:kvmslab-vm3-vda", "tid": 4, "lun": 1,
                  "lun_file": f"{lab_dir}/kvmslab-vm3-lun.img", "loop": "/dev/loop7",
                  "loop_majmin": "7:7", "vdb_file": f"{lab_dir}/kvmslab-vm3-vdb.img",
                  "console": f"{lab_dir}/kvmslab-vm3.console.log"}
    dom = ET.fromstring(vms.domain_xml(vm))
    assert dom.get("type") == "qemu" and dom.findtext("name") == "kvmslab-vm3"
    vda, vdb = dom.findall("devices/disk")
    assert vda.find("source").get("name") == vm["iqn"] + "/1"
    assert vda.find("source/host").attrib == {"name": "198.18.2.2", "port": "3260"}
    assert vdb.find("source").get("file") == vm["vdb_file"]
    assert vdb.find("driver").get("io") == "native"
    assert dom.find("devices/serial/source").get("path") == vm["console"]
    assert [k.luns({"vms": [vm]}) for k in hosts.host_kinds()] == [[vm], []]
    assert hosts.recorded_luns({"vms": [vm]}) == [vm] and hosts.recorded_luns(None) == []


def test_ordered_modules_dependencies_first():
    deps = {"virtio_blk": ["virtio", "virtio_ring"], "virtio": [], "virtio_ring": [],
            "virtio_pci": ["virtio_pci_modern_dev", "virtio-ring"], "virtio_pci_modern_dev": []}
    order = guest.ordered_modules("v", ["virtio_blk", "virtio_pci"], lambda v, m: deps.get(m, []))
    assert order == ["virtio", "virtio_ring", "virtio_blk", "virtio_pci_modern_dev", "virtio_pci"]


def test_cpio_newc():
    c = guest.Cpio()
    c.dir("bin")
    c.file("init", b"#!/bin/sh\n", 0o755)
    c.chardev("dev/console", 5, 1)
    data = c.finish()
    names, off = [], 0
    while True:
        hdr = data[off:off + 110].decode()
        assert hdr.startswith("070701")
        f = [int(hdr[6 + 8 * k:14 + 8 * k], 16) for k in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[off + 110:off + 110 + namesize - 1].decode()
        names.append((name, f[1], f[9:11]))
        off += 110 + namesize
        off += (4 - off % 4) % 4
        if name == "TRAILER!!!":
            break
        assert data[off:off + filesize] == (b"#!/bin/sh\n" if name == "init" else b"")
        off += filesize + (4 - filesize % 4) % 4
    assert off == len(data)
    assert [(n, oct(m)) for n, m, _ in names] == [("bin", "0o40755"), ("init", "0o100755"),
                                                  ("dev/console", "0o20600"), ("TRAILER!!!", "0o0")]
    assert names[2][2] == [5, 1]


# -- status ------------------------------------------------------------------------

def sample(rd, rd_ns, wr, wr_ns):
    return {"rd.reqs": rd, "rd.times": rd_ns, "rd.bytes": rd * 4096, "wr.reqs": wr,
            "wr.times": wr_ns, "wr.bytes": wr * 4096, "fl.reqs": 0, "fl.times": 0}


def test_stats_delta():
    a, b = sample(100, 10_000_000, 100, 10_000_000), sample(300, 50_000_000, 300, 70_000_000)
    assert vms.stats_delta(a, b, 2.0) == {"ops": 400, "ops_per_s": 200.0, "avg_latency_ms": 0.25}
    assert vms.stats_delta(a, a, 2.0) == {"ops": 0, "ops_per_s": 0.0, "avg_latency_ms": None}
    assert vms.stats_delta(a, b, 0)["ops_per_s"] == 0.0


def test_parse_block_stats():
    rec = {"block.count": 2, "block.0.name": "vda", "block.0.rd.reqs": 5, "block.0.wr.times": 9,
           "block.1.name": "vdb"}
    out = vms.parse_block_stats(rec)
    assert set(out) == {"vda", "vdb"} and out["vda"]["rd.reqs"] == 5 and out["vda"]["wr.times"] == 9
    assert set(out["vdb"]) == set(vms.STAT_KEYS) and not any(out["vdb"].values())


def status_doc(lab_dir, running=True):
    f = faults_with(loss_pct={"1": 5.0, "2": 0.0}, offline_portals=[2], throttle_iops=50)
    res = status.base_doc(1.0, f, True, {1: True, 2: False})
    vm = vms.vm_record(0, {"loop": "/dev/loop0", "loop_majmin": "7:0"})
    a = {"disks": {"vda": sample(0, 0, 0, 0), "vdb": sample(0, 0, 0, 0)}}
    b = {"disks": {"vda": sample(10, 4_000_000, 10, 4_000_000), "vdb": sample(0, 0, 0, 0)}}
    res["vms"] = [vms.vm_status(vm, a, b, 1.0, running, ("/dev/vda", "254:0"))]
    return res


def test_status_document_shape(lab_dir):
    res = status_doc(lab_dir)
    json.dumps(res)
    assert set(res) == {"schema", "up", "lab_dir", "sample_interval_s", "namespace", "tgtd",
                        "libvirt", "portals", "faults", "vms"}
    assert res["schema"] == 1 and res["lab_dir"] == str(lab_dir)
    assert res["tgtd"] == {"pid": None, "running": False, "control_port": 42,
                           "log": f"{lab_dir}/tgtd.log"}
    assert set(res["libvirt"]) == {"uri", "reachable", "libvirtd_started_by_lab",
                                   "virtlogd_started_by_lab"}
    p1, p2 = res["portals"]
    assert p1 == {"index": 1, "address": "198.18.1.2", "port": 3260, "host_addr": "198.18.1.1",
                  "host_if": "kvmslab-h1", "ns_if": "kvmslab-n1", "link_up": True,
                  "loss_pct": 5.0, "loss_direction": "both", "offline": False,
                  "shape_rate_kbit": None, "flap_down": False}
    assert (p2["link_up"], p2["offline"], p2["loss_pct"]) == (False, True, 0.0)
    vm = res["vms"][0]
    assert set(vm) == {"name", "index", "portal", "running", "load_progressing", "console", "disks"}
    vda, vdb = vm["disks"]
    assert vda["url"] == "iscsi://198.18.1.2:3260/iqn.2025-01.io.kvmscope.lab:kvmslab-vm0-vda/1"
    assert (vda["ops"], vda["ops_per_s"], vda["avg_latency_ms"], vda["progressing"]) == (20, 20.0, 0.4, True)
    assert (vda["target_backing_device"], vda["target_backing_majmin"], vda["tid"]) == ("/dev/loop0", "7:0", 1)
    assert (vdb["backend"], vdb["host_device"], vdb["host_majmin"]) == ("file", "/dev/vda", "254:0")
    assert (vdb["ops"], vdb["avg_latency_ms"], vdb["progressing"]) == (0, None, False)
    assert vm["running"] and not vm["load_progressing"]        # vdb did not move
    assert set(vda["stats"]) == set(vms.STAT_KEYS)


def test_status_when_vm_stats_missing(lab_dir):
    vm = vms.vm_record(1, {"loop": "/dev/loop1", "loop_majmin": "7:1"})
    rec = vms.vm_status(vm, {"disks": {}}, {"disks": {}, "state": None}, 0.0, False, (None, None))
    assert [(d["stats"], d["ops"], d["ops_per_s"], d["avg_latency_ms"]) for d in rec["disks"]] == [
        (None, 0, 0.0, None)] * 2
    assert (rec["running"], rec["load_progressing"], rec["portal"]) == (False, False, 2)


def test_status_text(lab_dir):
    res = status_doc(lab_dir)
    res["tgtd"].update(pid=123, running=True)
    assert status.render_text(res).splitlines() == [
        f"lab dir: {lab_dir}   up: no",
        "namespace kvmslab-stor: present   tgtd: running pid 123",
        "portal 1: 198.18.1.2:3260 via kvmslab-h1 (host 198.18.1.1) link up  loss 5%  online",
        "portal 2: 198.18.2.2:3260 via kvmslab-h2 (host 198.18.2.1) link absent  loss 0%  OFFLINE",
        "target throttle: 50 IOPS/device",
        f"kvmslab-vm0: running, load NOT progressing (console {lab_dir}/kvmslab-vm0.console.log)",
        "  vda: iSCSI 198.18.1.2:3260 iqn.2025-01.io.kvmscope.lab:kvmslab-vm0-vda LUN 1 "
        "(portal 1, target dev /dev/loop0)",
        "       20 ops/s, avg 0.40 ms over 1s",
        f"  vdb: file {lab_dir}/kvmslab-vm0-vdb.img on /dev/vda",
        "       0 ops/s, avg - over 1s"]


def test_status_when_down(lab_dir):
    """No state: the document still has every portal and the empty faults."""
    res = status.collect_status(0)
    assert res["up"] is False and res["vms"] == [] and "kernel" not in res
    assert res["faults"] == faults.empty_faults()
    assert [p["index"] for p in res["portals"]] == [1, 2]


# -- module seams ----------------------------------------------------------------

LAYERS = ["cli", "status", "faults", "hosts", "vms", "kernelhost", "hostkind", "libvirtd", "guest",
          "target", "network", "state", "common", "guestagent"]


def test_imports_go_down_the_layers():
    """Each module imports only modules below it (README: Code layout)."""
    import ast

    pkg = ROOT / "deploy" / "lab" / "kvmslab"
    assert {p.stem for p in pkg.glob("*.py")} == set(LAYERS) | {"__init__"}
    for mod in LAYERS:
        tree = ast.parse((pkg / f"{mod}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                for name in names:
                    if name == "__doc__":
                        continue
                    assert LAYERS.index(name) > LAYERS.index(mod), f"{mod} imports {name}"


# -- new fault shapes: shape, one-direction loss, flap, one-LUN throttle ------------

def test_parse_new_subcommands():
    p = cli.build_parser()
    a = p.parse_args(["shape", "2mbit", "--portal", "1"])
    assert (a.cmd, a.rate, a.portal) == ("shape", "2mbit", 1)
    assert p.parse_args(["shape", "off"]).portal is None
    a = p.parse_args(["loss", "5", "--portal", "2", "--direction", "to-host"])
    assert (a.pct, a.portal, a.direction) == ("5", 2, "to-host")
    assert p.parse_args(["loss", "5"]).direction == "both"
    a = p.parse_args(["flap", "--portal", "2", "--down", "3.5"])
    assert (a.portal, a.down, a.up, a.count) == (2, 3.5, 5.0, 1)
    a = p.parse_args(["flap", "--portal", "1", "--down", "3", "--up", "7", "--count", "4"])
    assert (a.up, a.count) == (7.0, 4)
    a = p.parse_args(["throttle-target", "30", "--vm", "kvmslab-vm0"])
    assert (a.iops, a.vm, a.lun) == ("30", "kvmslab-vm0", None)
    assert p.parse_args(["throttle-target", "30", "--lun", "2"]).lun == "2"
    assert p.parse_args(["throttle-target", "30"]).vm is None


@pytest.mark.parametrize("argv", [
    ["shape"], ["shape", "1mbit", "--portal", "3"], ["flap", "--down", "3"],
    ["flap", "--portal", "1"], ["flap", "--portal", "1", "--down", "x"],
    ["loss", "5", "--direction", "sideways"],
    ["throttle-target", "5", "--vm", "a", "--lun", "b"]])
def test_new_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "usage: lab" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["shape", "flap", "loss", "throttle-target"])
def test_new_subcommands_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([cmd, "-h"])
    out = capsys.readouterr().out
    assert "examples:" in out and f"lab {cmd} " in out


@pytest.mark.parametrize("text,kbit", [("2mbit", 2000), ("500kbit", 500), ("1.5mbit", 1500),
                                       ("1gbit", 1000000), (" 64KBIT ", 64), ("off", None),
                                       ("0", None)])
def test_parse_rate(text, kbit):
    assert faults.parse_rate(text) == kbit


@pytest.mark.parametrize("text,msg", [("2", "RATE must be a number with a unit"),
                                      ("2mbps", "RATE must be a number with a unit"),
                                      ("fast", "RATE must be a number with a unit"),
                                      ("10kbit", "RATE must be between 64kbit and 10gbit"),
                                      ("11gbit", "RATE must be between 64kbit and 10gbit")])
def test_parse_rate_rejects(text, msg):
    with pytest.raises(LabError, match=msg):
        faults.parse_rate(text)


def test_fmt_rate():
    assert [faults.fmt_rate(k) for k in (2000, 500, 1500, 1000000)] == [
        "2mbit", "500kbit", "1500kbit", "1gbit"]


def test_tbf_params_queue_deep_bucket_small():
    # 1 Mbit/s = 125000 B/s: a one-frame bucket, a queue of 2 s of traffic
    assert faults.tbf_params(1000) == (1600, 250000)
    assert faults.tbf_params(64) == (1600, 64 * 1024)            # floor of the queue
    assert faults.tbf_params(1000000) == (250000, 16 * 1024 * 1024)  # 1 Gbit/s: capped queue


def test_shape_cmds_both_ends_of_one_portal():
    f = faults_with(shape_rate_kbit={"1": 2000, "2": None})
    burst, limit = faults.tbf_params(2000)
    tail = ["root", "tbf", "rate", "2000kbit", "burst", str(burst), "limit", str(limit)]
    assert faults.shape_cmds(f) == [
        (None, ["tc", "qdisc", "replace", "dev", "kvmslab-h1"] + tail),
        ("kvmslab-stor", ["tc", "-n", "kvmslab-stor", "qdisc", "replace", "dev", "kvmslab-n1"]
         + tail)]
    assert faults.shape_cmds(faults.empty_faults()) == []
    assert faults.unshape_cmd("kvmslab-stor", "kvmslab-n2") == [
        "tc", "-n", "kvmslab-stor", "qdisc", "del", "dev", "kvmslab-n2", "root"]


def test_has_tbf():
    assert faults.has_tbf("qdisc tbf 8001: root refcnt 2 rate 2Mbit burst 1600b lat 1.0s \n")
    assert not faults.has_tbf("qdisc noqueue 0: root refcnt 2 \n")
    assert not faults.has_tbf("qdisc tbf 10: parent 1:1 rate 1Mbit\n")
    assert not faults.has_tbf("")


def comments(rules):
    return [(ns, r[r.index("--comment") + 1]) for ns, r in rules]


def test_loss_one_direction_only():
    to_host = faults.drop_rules(faults_with(loss_pct={"1": 5.0, "2": 0.0},
                                            loss_direction={"1": "to-host", "2": "both"}))
    assert comments(to_host) == [(None, "kvmslab portal 1 loss 5% to-host")]
    assert to_host[0][1][4:11] == ["-i", "kvmslab-h1", "-s", "198.18.1.2", "-p", "tcp", "--sport"]
    to_target = faults.drop_rules(faults_with(loss_pct={"1": 0.0, "2": 2.0},
                                              loss_direction={"1": "both", "2": "to-target"}))
    assert comments(to_target) == [("kvmslab-stor", "kvmslab portal 2 loss 2% to-target")]
    assert "-i" in to_target[0][1] and "kvmslab-n2" in to_target[0][1]
    # a state written before directions existed means both
    old = {"loss_pct": {"1": 1.0, "2": 0.0}, "throttle_iops": None, "offline_portals": []}
    assert len(faults.drop_rules(faults.fill_defaults(old))) == 2


def test_offline_and_flap_beat_one_direction_loss():
    f = faults_with(loss_pct={"1": 5.0, "2": 5.0}, loss_direction={"1": "to-host", "2": "both"},
                    offline_portals=[1], flaps={"down": [1, 2], "periods": []})
    assert comments(faults.drop_rules(f)) == [
        (None, "kvmslab portal 1 offline"), ("kvmslab-stor", "kvmslab portal 1 offline"),
        (None, "kvmslab portal 2 flap down"), ("kvmslab-stor", "kvmslab portal 2 flap down")]
    assert not any("statistic" in r for _, r in faults.drop_rules(f))


LUNS = [vms.vm_record(i, {"loop": f"/dev/loop{i}", "loop_majmin": f"7:{i}"}) for i in range(3)]


def test_throttle_plan_one_lun_beats_all():
    assert faults.throttle_plan(faults.empty_faults(), LUNS) == {"7:0": 0, "7:1": 0, "7:2": 0}
    f = faults_with(throttle_iops_by_lun={LUNS[0]["iqn"]: 30})
    assert faults.throttle_plan(f, LUNS) == {"7:0": 30, "7:1": 0, "7:2": 0}
    f = faults_with(throttle_iops=50, throttle_iops_by_lun={LUNS[2]["iqn"]: 10})
    assert faults.throttle_plan(f, LUNS) == {"7:0": 50, "7:1": 50, "7:2": 10}


def test_resolve_luns():
    st = {"vms": LUNS}
    assert faults.resolve_luns(st) == LUNS
    assert faults.resolve_luns(st, vm="kvmslab-vm1") == [LUNS[1]]
    assert faults.resolve_luns(st, vm="2") == [LUNS[2]]
    assert faults.resolve_luns(st, lun=LUNS[0]["iqn"]) == [LUNS[0]]
    assert faults.resolve_luns(st, lun="3") == [LUNS[2]]             # tid
    assert faults.resolve_luns(st, lun="/dev/loop1") == [LUNS[1]]
    with pytest.raises(LabError, match=r"--vm kvmslab-vm9: no such LUN in the lab \(LUNs: "
                                       r"kvmslab-vm0 \(iqn"):
        faults.resolve_luns(st, vm="kvmslab-vm9")


# -- state transitions through the real subcommands (kernel mechanisms recorded) ----

@pytest.fixture
def up_lab(lab_dir, monkeypatch):
    """A recorded 3-VM lab; each mechanism's apply() records the fault state it
    was given instead of touching the kernel."""
    applied = []
    for m in (faults.IptablesDrops, faults.BlkioThrottle, faults.TcShaper):
        monkeypatch.setattr(m, "apply", lambda self, st, m=m: applied.append(
            (m.__name__, json.loads(json.dumps(st["faults"])))))
    monkeypatch.setattr(faults, "check_root_and_binaries", lambda binaries=None: None)
    st = state.empty_state(faults.empty_faults())
    st["vms"], st["vm_count"] = LUNS, 3
    state.save_state(st)
    return applied


def lab_main(*argv):
    return cli.main([str(a) for a in argv])


def test_loss_direction_transitions(up_lab):
    assert lab_main("loss", 5, "--portal", 2, "--direction", "to-host") == 0
    f = state.load_state()["faults"]
    assert (f["loss_pct"], f["loss_direction"]) == ({"1": 0.0, "2": 5.0},
                                                    {"1": "both", "2": "to-host"})
    assert up_lab[-1][0] == "IptablesDrops" and up_lab[-1][1] == f
    assert lab_main("loss", 3) == 0                  # default: both directions, both portals
    f = state.load_state()["faults"]
    assert f["loss_direction"] == {"1": "both", "2": "both"} and f["loss_pct"]["1"] == 3.0
    assert lab_main("loss", 2, "--direction", "to-target") == 0
    assert lab_main("loss", 0, "--portal", 1) == 0   # clearing resets the direction
    f = state.load_state()["faults"]
    assert f["loss_direction"] == {"1": "both", "2": "to-target"}


def test_loss_on_a_state_from_before_directions(up_lab):
    st = state.load_state()
    for k in ("loss_direction", "shape_rate_kbit", "flaps", "throttle_iops_by_lun"):
        del st["faults"][k]
    state.save_state(st)
    assert lab_main("loss", 1, "--portal", 1, "--direction", "to-host") == 0
    assert state.load_state()["faults"] == dict(
        EMPTY_FAULTS, loss_pct={"1": 1.0, "2": 0.0}, loss_direction={"1": "to-host", "2": "both"})


def test_shape_transitions(up_lab, capsys):
    assert lab_main("shape", "2mbit", "--portal", 1) == 0
    assert state.load_state()["faults"]["shape_rate_kbit"] == {"1": 2000, "2": None}
    assert up_lab[-1][0] == "TcShaper"
    assert "portal 1 (198.18.1.2) 2mbit each way, portal 2 (198.18.2.2) off" in capsys.readouterr().err
    assert lab_main("shape", "off") == 0
    assert state.load_state()["faults"]["shape_rate_kbit"] == {"1": None, "2": None}
    assert lab_main("shape", "2") == 1
    assert "lab shape: error: RATE must be a number with a unit" in capsys.readouterr().err


def test_throttle_one_lun_transitions(up_lab, capsys):
    assert lab_main("throttle-target", 30, "--vm", "kvmslab-vm0") == 0
    f = state.load_state()["faults"]
    assert (f["throttle_iops"], f["throttle_iops_by_lun"]) == (None, {LUNS[0]["iqn"]: 30})
    assert up_lab[-1][0] == "BlkioThrottle"
    assert "kvmslab-vm0 LUN (/dev/loop0): throttled to 30 read IOPS" in capsys.readouterr().err
    assert lab_main("throttle-target", 10, "--lun", "/dev/loop2") == 0
    assert state.load_state()["faults"]["throttle_iops_by_lun"] == {LUNS[0]["iqn"]: 30,
                                                                   LUNS[2]["iqn"]: 10}
    assert lab_main("throttle-target", "off", "--vm", "0") == 0
    assert state.load_state()["faults"]["throttle_iops_by_lun"] == {LUNS[2]["iqn"]: 10}
    assert lab_main("throttle-target", 50) == 0      # one setting for all again
    f = state.load_state()["faults"]
    assert (f["throttle_iops"], f["throttle_iops_by_lun"]) == (50, {})
    assert lab_main("throttle-target", 5, "--vm", "nope") == 1
    assert "lab throttle-target: error: --vm nope: no such LUN" in capsys.readouterr().err


class FakeClock:
    def __init__(self, t=1_764_386_000.0):
        self.t, self.sleeps = t, []

    def now(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(round(s, 3))
        self.t += s


def test_flap_records_each_down_period(up_lab, monkeypatch, capsys):
    clock = FakeClock()
    monkeypatch.setattr(faults, "now", clock.now)
    monkeypatch.setattr(faults, "sleep", clock.sleep)
    assert lab_main("flap", "--portal", 2, "--down", 3, "--up", 7, "--count", 2) == 0
    assert clock.sleeps == [3.0, 7.0, 3.0]
    # the drop rules follow: down, up, down, up
    assert [a[1]["flaps"]["down"] for a in up_lab] == [[2], [], [2], []]
    assert {a[0] for a in up_lab} == {"IptablesDrops"}
    fl = state.load_state()["faults"]["flaps"]
    assert fl["down"] == []
    t0 = 1_764_386_000.0
    assert [(p["portal"], p["n"], p["count"], p["start"], p["end"], p["seconds"])
            for p in fl["periods"]] == [(2, 1, 2, t0, t0 + 3, 3.0), (2, 2, 2, t0 + 10, t0 + 13, 3.0)]
    assert fl["periods"][0]["start_iso"] == "2025-11-29T03:13:20.000Z"
    assert fl["periods"][0]["end_iso"] == "2025-11-29T03:13:23.000Z"
    err = capsys.readouterr().err
    assert "flap 1/2: portal 2 (198.18.2.2) DOWN at 2025-11-29T03:13:20.000Z for 3s" in err
    assert "flap 2/2: portal 2 (198.18.2.2) UP at 2025-11-29T03:13:33.000Z (down 3.00s)" in err


def test_flap_interrupted_brings_the_portal_back(up_lab, monkeypatch, capsys):
    clock = FakeClock()

    def interrupted(s):
        clock.t += 1.25
        assert state.load_state()["faults"]["flaps"]["periods"][0]["end"] is None  # open period
        raise KeyboardInterrupt

    monkeypatch.setattr(faults, "now", clock.now)
    monkeypatch.setattr(faults, "sleep", interrupted)
    assert lab_main("flap", "--portal", 1, "--down", 10) == 130
    fl = state.load_state()["faults"]["flaps"]
    assert fl["down"] == [] and [a[1]["flaps"]["down"] for a in up_lab] == [[1], []]
    assert [(p["n"], p["seconds"]) for p in fl["periods"]] == [(1, 1.25)]
    assert "lab flap: interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("argv,msg", [
    (["--down", "0"], "--down must be > 0 and <= 3600 seconds, got 0"),
    (["--down", "5", "--up", "-1"], "--up must be between 0 and 3600 seconds, got -1"),
    (["--down", "5", "--count", "0"], "--count must be between 1 and 1000, got 0")])
def test_flap_argument_errors(up_lab, argv, msg, capsys):
    assert lab_main("flap", "--portal", 1, *argv) == 1
    assert f"lab flap: error: {msg}" in capsys.readouterr().err
    assert up_lab == []


def test_flap_needs_a_lab(lab_dir, monkeypatch, capsys):
    monkeypatch.setattr(faults, "check_root_and_binaries", lambda binaries=None: None)
    assert lab_main("flap", "--portal", 1, "--down", 1) == 1
    assert "the lab is not up" in capsys.readouterr().err


def test_target_online_ends_a_killed_flap(up_lab):
    st = state.load_state()
    st["faults"]["flaps"]["down"] = [1]
    state.save_state(st)
    assert lab_main("target-online", "--portal", 1) == 0
    assert state.load_state()["faults"]["flaps"]["down"] == []


def test_status_shows_new_faults(lab_dir):
    f = faults_with(loss_pct={"1": 5.0, "2": 0.0}, loss_direction={"1": "to-host", "2": "both"},
                    shape_rate_kbit={"1": None, "2": 1500}, throttle_iops_by_lun={LUNS[0]["iqn"]: 30},
                    flaps={"down": [2], "periods": [
                        {"id": "x", "portal": 2, "n": 1, "count": 2, "start": 1.0,
                         "start_iso": "1970-01-01T00:00:01.000Z", "end": 4.5,
                         "end_iso": "1970-01-01T00:00:04.500Z", "seconds": 3.5},
                        {"id": "y", "portal": 2, "n": 2, "count": 2, "start": 9.0,
                         "start_iso": "1970-01-01T00:00:09.000Z", "end": None,
                         "end_iso": None, "seconds": None}]})
    res = status.base_doc(1.0, f, True, {1: True, 2: True})
    p1, p2 = res["portals"]
    assert (p1["loss_direction"], p1["shape_rate_kbit"], p1["flap_down"]) == ("to-host", None, False)
    assert (p2["loss_direction"], p2["shape_rate_kbit"], p2["flap_down"]) == ("both", 1500, True)
    res["vms"] = [vms.vm_status(vm, {"disks": {}}, {"disks": {}, "state": None}, 0.0, False,
                                (None, None)) for vm in LUNS[:2]]
    status.annotate_throttles(res)
    assert [vm["disks"][0]["target_throttle_iops"] for vm in res["vms"]] == [30, None]
    assert "target_throttle_iops" not in res["vms"][0]["disks"][1]     # vdb: not a LUN
    text = status.render_text(res).splitlines()
    assert text[2].endswith("link up  loss 5%  online to-host")
    assert text[3].endswith("link up  loss 0%  online  shaped 1500kbit  FLAP DOWN")
    assert text[4:8] == [
        "target throttle: off",
        f"  LUN {LUNS[0]['iqn']}: 30 IOPS",
        "flap portal 2 1/2: down 1970-01-01T00:00:01.000Z -> 1970-01-01T00:00:04.500Z (3.50s)",
        "flap portal 2 2/2: down 1970-01-01T00:00:09.000Z -> (still down)"]


# -- the kernel-initiator host (kernelhost.py, guestagent.py) ---------------------

from kvmslab import guestagent, kernelhost  # noqa: E402


def test_kernel_host_is_a_host_kind_with_its_own_subcommands():
    assert kernelhost.KERNEL_HOST in hosts.host_kinds()
    p = cli.build_parser()
    a = p.parse_args(["up", "--kernel-host"])
    assert a.kernel_host and a.vms == 2
    assert not p.parse_args(["up"]).kernel_host
    a = p.parse_args(["kernel-host", "exec", "--", "iscsiadm", "-m", "session"])
    assert (a.kh_cmd, a.argv[-3:]) == ("exec", ["iscsiadm", "-m", "session"])
    assert p.parse_args(["kernel-host", "stop"]).kh_cmd == "stop"
    with pytest.raises(SystemExit):
        p.parse_args(["kernel-host"])


def test_kernel_host_network_stays_in_the_lab_range_and_never_forwards_everything():
    import ipaddress

    lab_net = ipaddress.ip_network("198.18.0.0/15")
    for ln in kernelhost.LINKS:
        for key in ("host_addr", "guest_addr"):
            assert ipaddress.ip_address(ln[key]) in lab_net
        assert ipaddress.ip_network(ln["net"]).subnet_of(lab_net)
    paths = kernelhost.forwarding_paths()
    assert all("/conf/all/" not in p and "/conf/default/" not in p for p in paths)
    assert sorted(os.path.basename(os.path.dirname(p)) for p in paths) == \
        ["kvmslab-h1", "kvmslab-h2", "kvmslab-kt1", "kvmslab-kt2"]     # not the host-only tap
    assert kernelhost.netns_route_cmds() == [
        ["ip", "-n", "kvmslab-stor", "route", "replace", "198.18.11.0/24", "via", "198.18.1.1",
         "dev", "kvmslab-n1"],
        ["ip", "-n", "kvmslab-stor", "route", "replace", "198.18.12.0/24", "via", "198.18.2.1",
         "dev", "kvmslab-n2"]]
    assert kernelhost.tap_cmds(kernelhost.LINKS[0])[0] == ["ip", "tuntap", "add", "dev", "kvmslab-kt1",
                                                           "mode", "tap"]


def test_kernel_host_guest_env_and_qemu_command():
    env = dict(line.split("=", 1) for line in kernelhost.guest_env("/x/.venv/bin/kvmscope").splitlines())
    assert env["KH_ROUTES"] == "'198.18.1.2/32,198.18.11.1 198.18.2.2/32,198.18.12.1'"
    assert env["KH_PORTALS"] == "'198.18.1.2:3260 198.18.2.2:3260'"
    assert env["KH_IQN"] == "'iqn.2025-01.io.kvmscope.lab:kvmslab-kh-lun'"
    assert env["KH_KVMSCOPE"] == "'/x/.venv/bin/kvmscope'" and env["KH_MAP"] == "'mpatha'"
    argv = kernelhost.qemu_argv("/l/vmlinuz", "/l/init.gz", "/l/console.log", "/l/qemu.pid")
    assert argv[0] == "qemu-system-x86_64" and "pc,accel=tcg" in argv
    assert argv[argv.index("-m") + 1] == "1024"
    virtfs = argv[argv.index("-virtfs") + 1]
    assert "path=/," in virtfs and "readonly=on" in virtfs and "multidevs=remap" in virtfs
    nets = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
    assert [n.split("ifname=")[1].split(",")[0] for n in nets] == ["kvmslab-kt1", "kvmslab-kt2", "kvmslab-km"]
    assert all("script=no" in n for n in nets)


def test_kernel_host_config_files():
    conf = kernelhost.iscsid_conf()
    assert "node.startup = manual" in conf
    assert "node.session.timeo.replacement_timeout = 15" in conf
    assert "node.conn[0].timeo.noop_out_interval = 5" in conf
    mp = kernelhost.multipath_conf()
    assert "no_path_retry 12" in mp and "find_multipaths no" in mp and 'vendor "IET"' in mp
    assert "listen: \"198.18.10.2:9847\"" in kernelhost.kvmscope_conf()
    from agent.config import Config
    import yaml
    kc = Config.model_validate(yaml.safe_load(kernelhost.kvmscope_conf()))
    assert kc.file_output.enabled and kc.file_output.path == kernelhost.GUEST_SHIPPED and kc.agent.collector_timeout == 12
    assert "client_auth_type: RequireAndVerifyClientCert" in kernelhost.web_yml()
    cmds = kernelhost.pki_cmds("/d")
    assert all(c[0] == "openssl" for c in cmds) and "san.ext" in cmds[2]
    xml = ET.fromstring(kernelhost.vm_xml())
    disk = xml.find("devices/disk")
    assert disk.get("type") == "block" and disk.find("source").get("dev") == "/dev/mapper/mpatha"


def test_kernel_host_parsers():
    assert kernelhost.parse_sessions(
        "tcp: [1] 198.18.1.2:3260,1 iqn.x:lun (non-flash)\n"
        "tcp: [2] 198.18.2.2:3260,1 iqn.x:lun (non-flash)\n") == [
        {"sid": 1, "portal": "198.18.1.2:3260", "tpgt": 1, "iqn": "iqn.x:lun"},
        {"sid": 2, "portal": "198.18.2.2:3260", "tpgt": 1, "iqn": "iqn.x:lun"}]
    assert kernelhost.parse_paths("sda mpatha active ready running 2:0:0:1\n") == [
        {"dev": "sda", "map": "mpatha", "dm_state": "active", "checker": "ready",
         "dev_state": "running", "hcil": "2:0:0:1"}]
    assert kernelhost.boot_marks(
        "noise\nkvmslab-kh: stage2 started (t=3.15)\n"
        "kvmslab-kh: multipath map mpatha has 2 paths (t=24.4)\nkvmslab-kh: ready (t=25.02)\n") == {
        "stage2 started": 3.15, "multipath map mpatha has 2 paths": 24.4, "ready": 25.02}


def test_drops_reach_forwarded_traffic():
    """The host's KVMSLAB chain is jumped to from FORWARD too (the kernel host's
    segments are routed), the namespace's from INPUT only."""
    assert faults.JUMP_HOOKS == {False: ("INPUT", "FORWARD"), True: ("INPUT",)}
    rules = faults.drop_rules(faults_with(offline_portals=[1]))
    host = [argv for ns, argv in rules if ns is None]
    assert host and all("-i" in a and a[a.index("-i") + 1] == "kvmslab-h1" for a in host)


def test_guest_agent_runs_commands_over_tcp():
    """The agent and its client on loopback: argv, shell text, input, rc, timeout."""
    import socket
    import threading

    srv = guestagent._Server(("127.0.0.1", 0), guestagent._Handler)
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = guestagent.guest_run("127.0.0.1", ["echo", "hi"], port=port)
        assert (r["rc"], r["stdout"]) == (0, "hi\n")
        r = guestagent.guest_run("127.0.0.1", sh="cat; echo err >&2; exit 3", input="in", port=port)
        assert (r["rc"], r["stdout"], r["stderr"]) == (3, "in", "err\n")
        r = guestagent.guest_run("127.0.0.1", ["sleep", "5"], timeout=0.3, port=port)
        assert r["rc"] == 124 and "timed out" in r["stderr"]
        r = guestagent.guest_run("127.0.0.1", ["/nonexistent/x"], port=port)
        assert r["rc"] == 127
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"not json\n")
            s.shutdown(socket.SHUT_WR)
            assert b'"rc": 2' in s.recv(4096)
    finally:
        srv.shutdown()
        srv.server_close()


def test_status_text_shows_the_kernel_host():
    res = status.base_doc(1.0, faults.empty_faults(), True, {1: True, 2: True})
    res["kernel_hosts"] = [{
        "name": "kvmslab-kh", "running": True, "agent": True, "mgmt_addr": "198.18.10.2",
        "agent_port": 7001, "console": "/x/console.log",
        "sessions": [{"sid": 1, "portal": "198.18.1.2:3260", "tpgt": 1, "iqn": "iqn.x:lun"}],
        "paths": [{"dev": "sda", "map": "mpatha", "dm_state": "failed", "checker": "faulty",
                   "dev_state": "running", "hcil": "2:0:0:1"}]}]
    text = status.render_text(res)
    assert "kvmslab-kh: running, agent answers on 198.18.10.2:7001 (console /x/console.log)\n" in text
    assert "  session 1: 198.18.1.2:3260 iqn.x:lun\n" in text
    assert "  path sda (2:0:0:1) of mpatha: failed faulty running\n" in text


def test_kernel_host_refuses_without_the_guest_userland(monkeypatch):
    monkeypatch.setattr(kernelhost, "missing_binaries", lambda names: ["multipathd"])
    args = cli.build_parser().parse_args(["up", "--kernel-host"])
    with pytest.raises(LabError, match="multipathd.*multipath-tools"):
        kernelhost.KERNEL_HOST.validate(args)
    kernelhost.KERNEL_HOST.validate(cli.build_parser().parse_args(["up"]))   # not asked: no check


def test_kernel_host_probes_setting_is_kept_unless_asked(tmp_path):
    """`--kernel-host-probes` is applied when given; a `lab up` without it keeps what the kernel host has
    (its record), a first boot has the probes on. The restart of the guest's kvmscope is valid bash that
    reads its config from stdin and keeps the pid file the tests pause the agent by."""
    p = cli.build_parser()
    assert p.parse_args(["up", "--kernel-host"]).kernel_host_probes is None
    want = kernelhost.probes_wanted
    assert want(p.parse_args(["up", "--kernel-host"])) is True
    assert want(p.parse_args(["up", "--kernel-host", "--kernel-host-probes", "off"]), {"probes": True}) is False
    assert want(p.parse_args(["up", "--kernel-host", "--kernel-host-probes", "on"]), {"probes": False}) is True
    assert want(p.parse_args(["up"]), {"probes": False}) is False
    assert want(p.parse_args(["up"]), {"probes": None}) is True
    script = kernelhost.kvmscope_restart_script("/x/.venv/bin/kvmscope")
    assert "cat > '/etc/kvmscope/config.yaml'" in script and "rm -rf '/var/lib/kvmscope'" in script
    assert f"'/x/.venv/bin/kvmscope' run -q >>'{kernelhost.GUEST_KVMSCOPE_LOG}'" in script
    assert f"echo \"$!\" >'{kernelhost.GUEST_KVMSCOPE_PID}'" in script


FAKE_KVMSCOPE = """#!/bin/bash
echo "started $$ with $KVMSCOPE_CONFIG: $*"
sleep 1000 &                      # a child (a probe's compiler)
echo $! > "$(dirname "$0")/child.$$"
trap '%s' TERM
while true; do sleep 0.1; done
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


@pytest.mark.parametrize("on_term", ["echo stopping; exit 0", ""])
def test_kernel_host_kvmscope_restart_script_runs(tmp_path, on_term):
    """The restart script run for real (bash, ps, kill) on stand-in paths and a stand-in kvmscope: the new
    config written from stdin, the old process stopped (by SIGTERM, or SIGKILL when it ignores SIGTERM) with
    its child, the state directory emptied, the new one running with the config, its pid in the pid file."""
    exe = tmp_path / "kvmscope"
    exe.write_text(FAKE_KVMSCOPE % on_term)
    exe.chmod(0o755)
    paths = {"config": str(tmp_path / "config.yaml"), "pidfile": str(tmp_path / "run.pid"),
             "logfile": str(tmp_path / "log" / "run.log"), "state_dir": str(tmp_path / "state")}
    os.makedirs(paths["state_dir"])
    (tmp_path / "state" / "old").write_text("x")
    script = kernelhost.kvmscope_restart_script(str(exe), stop_timeout=2, **paths)
    started = []
    try:
        res = subprocess.run(["bash", "-c", script], input="first: 1\n", capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        first = int(res.stdout)
        started.append(first)
        assert int((tmp_path / "run.pid").read_text()) == first
        assert wait_for(lambda: (tmp_path / f"child.{first}").exists(), 10, "the stand-in's child")
        child = int((tmp_path / f"child.{first}").read_text())
        started.append(child)
        t0 = time.monotonic()
        res = subprocess.run(["bash", "-c", script], input="second: 2\n", capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        second = int(res.stdout)
        started.append(second)
        assert second != first and int((tmp_path / "run.pid").read_text()) == second
        assert _gone(first) and _gone(child) and not _gone(second)
        assert (tmp_path / "config.yaml").read_text() == "second: 2\n"
        assert os.listdir(tmp_path / "state") == []
        if on_term:
            assert took < 2 and "ignored SIGTERM" not in res.stderr, (took, res.stderr)
        else:
            assert took >= 2 and "ignored SIGTERM for 2 s: SIGKILL" in res.stderr, (took, res.stderr)
        log = wait_for(lambda: (lambda t: t if f"started {second}" in t else None)(
            (tmp_path / "log" / "run.log").read_text()), 10, "the second start in the log")
        assert f"started {first} with {paths['config']}: run -q" in log and log.count("--- restarted by lab up") == 2
        assert ("stopping" in log) == bool(on_term)
        wait_for(lambda: (tmp_path / f"child.{second}").exists(), 10, "the second stand-in's child")
    finally:
        started += [int(f.read_text()) for f in tmp_path.glob("child.*") if f.read_text().strip()]
        for pid in started:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def test_kernel_host_kvmscope_config_loads_with_its_compile_timeout(tmp_path):
    """The guest's kvmscope config is valid kvmscope config, and its probes get the longer compile timeout
    (four parallel bcc compiles on the guest's one emulated vCPU take minutes)."""
    from agent import config
    from agent.ebpf.source import load_options
    from agent.hostpaths import HostPaths
    from agent.source_api import SourceContext

    p = tmp_path / "config.yaml"
    p.write_text(kernelhost.kvmscope_conf())
    cfg, _ = config.load(p, environ={})
    assert cfg.ebpf.compile_timeout == kernelhost.KVMSCOPE_COMPILE_TIMEOUT >= 300
    assert cfg.agent.interval == kernelhost.KVMSCOPE_INTERVAL
    opts = load_options(SourceContext(cfg, HostPaths.from_config(cfg.paths)))
    assert opts.compile_timeout == kernelhost.KVMSCOPE_COMPILE_TIMEOUT


def test_kernel_host_probes_off_leaves_the_ebpf_collectors_out(tmp_path):
    """`lab up --kernel-host --kernel-host-probes off`: the guest's kvmscope config disables exactly the eBPF
    collectors (known names: the agent builds without them, the other collectors as before)."""
    from agent import config
    from agent.engine import build_agent

    assert kernelhost.probes_wanted(cli.build_parser().parse_args(["up", "--kernel-host"])) is True  # boots with them
    args = cli.build_parser().parse_args(["up", "--kernel-host", "--kernel-host-probes", "off"])
    assert args.kernel_host_probes == "off"
    p = tmp_path / "config.yaml"
    p.write_text(kernelhost.kvmscope_conf(probes=False))
    cfg, _ = config.load(p, environ={})
    assert sorted(cfg.agent.collectors.disable) == sorted(kernelhost.EBPF_COLLECTORS)
    assert cfg.file_output.enabled and cfg.ebpf.compile_timeout == kernelhost.KVMSCOPE_COMPILE_TIMEOUT
    agent = build_agent(cfg)
    try:
        names = {s.name for s in agent.sources}
    finally:
        agent.close()
    assert "multipath" in names and "iscsi_kernel" in names and not names & set(kernelhost.EBPF_COLLECTORS)
    p.write_text(kernelhost.kvmscope_conf())
    on, _ = config.load(p, environ={})
    assert on.agent.collectors.disable == []
