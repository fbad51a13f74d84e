"""The unit tests' fixture builders against captures of a real kernel initiator.

tests/fixtures/hosts/kernel-initiator-real/ was captured from the lab's
kernel-initiator host (tests/lab/capture.py; open-iscsi 2.1.8, Debian 6.1
kernel, multipath-tools 0.9.4, two sessions, one multipath map). Every file and
link tests/fixtures/sysfs_iscsi.py writes must exist there at the same place
(ids aside), be a file or a link alike, and hold a value of the same form; the
iscsiadm -s text it writes must have the real counter names in the real order.
The sources under test then read the real capture as they read the fixture
trees, and agree with the captured iscsiadm -P 3. tests/lab/test_kernel_host.py
holds the capture itself to the live guest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent.hostpaths import HostPaths
from tests.fixtures import sysfs_iscsi

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "hosts" / "kernel-initiator-real"

# ids that differ between a fixture and the capture, replaced by placeholders
_IDS = [
    (re.compile(r"\b\d+:\d+:\d+:\d+\b"), "H:C:T:L"),
    (re.compile(r"\btarget\d+:\d+:\d+\b"), "targetH:C:T"),
    (re.compile(r"\bconnection\d+:\d+\b"), "connectionS:C"),
    (re.compile(r"\bsession\d+\b"), "sessionS"),
    (re.compile(r"\bhost\d+\b"), "hostH"),
    (re.compile(r"\bsd[a-z]+\b"), "sdX"),
    (re.compile(r"\bdm-\d+\b"), "dm-N"),
]


def norm(rel: str) -> str:
    for rx, repl in _IDS:
        rel = rx.sub(repl, rel)
    return rel


def tree(root: Path) -> dict[str, tuple[str, str]]:
    """{normalised relative path: (kind, value)}; kind file|link|dir, links by their normalised resolved target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = norm(str(p.relative_to(root)))
            if p.is_symlink():  # where it points, relative to the root (the kernel and relpath spell it apart)
                out[rel] = ("link", norm(os.path.normpath(os.path.join(os.path.dirname(rel), os.readlink(p)))))
            elif p.is_dir():
                if not any(p.iterdir()):
                    continue  # an empty directory (sdX/slaves, dm-N/holders): git keeps none, so no side has one
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", p.read_text())
    return out


def form(value: str) -> str:
    """The form of a sysfs value: what a parser depends on."""
    v = value.strip()
    if v == "":
        return "empty"
    if re.fullmatch(r"-?\d+", v):
        return "int"
    if re.fullmatch(r"0x[0-9a-f]+", v):
        return "hex"
    if re.fullmatch(r"\d+:\d+", v):
        return "majmin"
    if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", v):
        return "ipv4"
    if re.fullmatch(r"iqn\.\S+", v):
        return "iqn"
    if re.fullmatch(r"[A-Z_]+", v):
        return "UPPER"
    if re.fullmatch(r"[a-z]+", v):
        return "lower"
    return "text"


def real_sessions() -> list[int]:
    return sorted(int(p.name[len("session"):]) for p in (REAL / "sys/class/iscsi_session").iterdir())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The fixture builder's tree for the same shape: two sessions, one map over both."""
    root = tmp_path_factory.mktemp("built") / "sys"
    sessions = [
        sysfs_iscsi.Sess(sid=1, host=2, target="iqn.2025-01.io.kvmscope.lab:kvmslab-kh-lun", portal="198.18.1.2",
                         lun=1, disk="sda", devno="8:0", recovery_tmo="5"),
        sysfs_iscsi.Sess(sid=2, host=3, target="iqn.2025-01.io.kvmscope.lab:kvmslab-kh-lun", portal="198.18.2.2",
                         lun=1, disk="sdb", devno="8:16", recovery_tmo="5"),
    ]
    return sysfs_iscsi.build(root, sessions, multipath={"dm-0:mpatha": ["sda", "sdb"]})


def test_capture_is_present_and_real():
    assert (REAL / "README.md").exists()
    assert real_sessions() == [1, 2]
    assert (REAL / "cmd" / "uname-r.txt").read_text().startswith("6.1.")


def test_every_built_file_and_link_exists_in_the_real_tree(built):
    real, mine = tree(REAL / "sys"), tree(built)
    missing = sorted(p for p in mine if p not in real)
    assert not missing, f"the fixture builder writes paths a real kernel does not have: {missing}"
    kinds = {p: (mine[p][0], real[p][0]) for p in mine if mine[p][0] != real[p][0]}
    assert not kinds, f"file/link/dir differ (fixture, real): {kinds}"


def test_built_links_point_where_real_ones_do(built):
    real, mine = tree(REAL / "sys"), tree(built)
    wrong = {p: (v, real[p][1]) for p, (k, v) in mine.items() if k == "link" and real[p][1] != v}
    assert not wrong, f"links differ (fixture, real): {wrong}"


def test_built_values_have_the_real_forms(built):
    real, mine = tree(REAL / "sys"), tree(built)
    wrong = {p: (v.strip(), real[p][1].strip()) for p, (k, v) in mine.items()
             if k == "file" and form(v) != form(real[p][1])}
    assert not wrong, f"values of another form than the real ones (fixture, real): {wrong}"
    # every value ends with one newline, as the kernel prints them
    assert all(v.endswith("\n") for k, v in real.values() if k == "file" and v)


def test_stats_text_has_the_real_counters_in_the_real_order():
    def names(text):
        return re.findall(r"^\t([a-z_0-9]+): \d+$", text, re.M)

    for sid in real_sessions():
        text = (REAL / "cmd" / f"iscsiadm-m-session-r{sid}-s.txt").read_text()
        s = sysfs_iscsi.Sess(sid=sid, host=2, target="iqn.x", portal="198.18.1.2")
        mine = sysfs_iscsi.stats_text(s)
        assert names(mine) == names(text)
        assert [ln for ln in mine.splitlines() if not ln.startswith("\t")][1:] == \
               [ln for ln in text.splitlines() if not ln.startswith("\t")][1:]
        header = text.splitlines()[0]
        assert re.fullmatch(r"Stats for session \[sid: \d+, target: \S+, portal: [\d.]+,\d+\]", header), header
        assert re.fullmatch(r"Stats for session \[sid: \d+, target: \S+, portal: [\d.]+,\d+\]",
                            mine.splitlines()[0])


def test_iscsi_kernel_reads_the_real_tree_as_iscsiadm_shows_it():
    """The source on the captured sysfs (counters from the captured iscsiadm -s) says
    what the captured iscsiadm -m session -P 3 says."""
    from agent.config import Config
    from agent.sources import SourceContext
    from agent.sources.iscsi_kernel import IscsiKernelSource

    def runner(argv, timeout):
        sid = argv[argv.index("-r") + 1]
        return (REAL / "cmd" / f"iscsiadm-m-session-r{sid}-s.txt").read_text()

    ctx = SourceContext(Config(), HostPaths(sysfs=REAL / "sys"))
    got = IscsiKernelSource(ctx, runner=runner).collect()
    p3 = (REAL / "cmd" / "iscsiadm-m-session-P3.txt").read_text()
    blocks = re.split(r"\n(?=\s*Current Portal:)", p3)[1:]
    assert len(got.sessions) == len(blocks) == 2
    for s in got.sessions:
        (b,) = [b for b in blocks if re.search(rf"SID: {s.sid}\n", b)]
        assert f"Current Portal: {s.portal},{s.tpgt}" in b
        assert re.search(rf"iSCSI Session State: {s.state}\n", b)
        assert re.search(rf"Recovery Timeout: {s.recovery_tmo}\n", b)
        assert re.search(rf"Iface Initiatorname: {re.escape(s.initiator)}\n", b)
        disk = next(d for d in s.disks if d.name)
        assert re.search(rf"Attached scsi disk {disk.name}\s+State: {disk.state}(\n|$)", b)
        assert disk.holder_names == ("mpatha",) and disk.ioerr_cnt is not None and disk.iotmo_cnt is not None
        assert s.stats["scsicmd_pdus"] > 0 and s.stats["txdata_octets"] > 0
    # target name from -m session
    flat = (REAL / "cmd" / "iscsiadm-m-session.txt").read_text()
    for s in got.sessions:
        assert f"tcp: [{s.sid}] {s.portal},{s.tpgt} {s.target} (non-flash)" in flat
