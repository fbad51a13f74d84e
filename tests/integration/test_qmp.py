"""The QMP source against a real stand-alone QEMU, next to a socket that never answers."""

import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from agent.config import Config
from agent.hostpaths import HostPaths
from agent.sources import SourceContext
from agent.sources.qmp_vms import QmpSource, parse_blockstats
from tests.conftest import wait_for

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed (make test installs it)")


@pytest.fixture
def qemu(tmp_path):
    img = tmp_path / "disk0.img"
    img.write_bytes(b"\0" * (4 << 20))
    sock = tmp_path / "vm 'quoted' ü.qmp"
    p = subprocess.Popen(
        [
            QEMU, "-M", "pc", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
            "-name", "guest=standalone,,one",
            "-uuid", "6b0a1e44-1111-4a4a-9c9c-000000000001",
            "-qmp", f"unix:{sock},server=on,wait=off",
            "-drive", f"file={img},if=none,id=drive0,format=raw,cache=none,aio=threads",
            "-device", "virtio-blk-pci,drive=drive0,id=disk0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    for _ in range(100):
        if sock.exists():
            break
        time.sleep(0.05)
    assert sock.exists(), p.stderr.read() if p.poll() is not None else "no QMP socket"
    yield p, sock
    p.kill()
    p.wait(5)


class SilentSocket:
    """Accepts connections and never says a word (a hung QEMU monitor); counts the connections."""

    def __init__(self, path):
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen(16)
        self.held = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    @property
    def accepted(self) -> int:
        return len(self.held)

    def loop(self):
        self.srv.settimeout(0.05)
        while not self.stop.is_set():
            try:
                self.held.append(self.srv.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.thread.join(2)
        for c in self.held:
            c.close()
        self.srv.close()


@pytest.fixture
def silent_socket(tmp_path):
    s = SilentSocket(tmp_path / "silent.qmp")
    yield s.path
    s.close()


def make_source(tmp_path, **qmp):
    cfg = Config()
    cfg.qmp.sockets = [str(tmp_path / "*.qmp")]
    for k, v in qmp.items():
        setattr(cfg.qmp, k, v)
    return QmpSource(SourceContext(cfg, HostPaths()))


def test_real_qemu_and_hung_socket(tmp_path, qemu, silent_socket):
    proc, sock = qemu
    src = make_source(tmp_path, timeout=1.0, latency_histograms=True, histogram_boundaries_ns=[1000, 1000000])
    t0 = time.monotonic()
    data = src.collect()
    elapsed = time.monotonic() - t0
    assert elapsed < 2.5, f"a hung socket must not stall the cycle ({elapsed:.1f}s)"
    assert [v.name for v in data.vms] == ["standalone,one"]
    vm = data.vms[0]
    assert vm.uuid == "6b0a1e44-1111-4a4a-9c9c-000000000001"
    assert vm.state == "prelaunch" and vm.manager == "qmp"
    assert vm.pid == proc.pid
    (disk,) = vm.disks
    assert disk.target == "drive0" and disk.kind == "file" and disk.source.endswith("disk0.img")
    assert vm.error is None
    assert disk.stats.rd_reqs == 0 and disk.stats.wr_reqs == 0  # paused guest (-S): no I/O yet
    # histograms were switched on and come back with len(bins) == len(boundaries) + 1
    h = disk.stats.histograms["rd"]
    assert h["boundaries_ns"] == [1000, 1000000] and len(h["bins"]) == 3
    assert data.failed == ((str(silent_socket), "no answer before the deadline"),)
    src.close()


@pytest.mark.slow
def test_second_cycle_skips_a_query_still_hanging(tmp_path):
    """A query that outlives its cycle is not started again while it hangs. Nine hung
    sockets and the source's eight query threads: the ninth (last in sorted order) waits
    for a thread, starts late and is still running when the cycle ends. The next cycle
    names it "still hanging; skipped" without connecting to it again; once it has ended,
    the cycle after asks it again."""
    socks = [SilentSocket(tmp_path / f"s{i}.qmp") for i in range(9)]
    last = str(socks[-1].path)
    src = make_source(tmp_path, timeout=1.0)
    try:
        first = dict(src.collect().failed)
        assert first[last] == "no answer within 1s", first
        assert all(first[str(s.path)] == "no answer before the deadline" for s in socks[:-1]), first
        assert socks[-1].accepted == 1
        t0 = time.monotonic()
        second = dict(src.collect().failed)
        assert second[last] == "previous query still hanging; skipped", second
        assert socks[-1].accepted == 1, "the hanging socket was connected to again"
        time.sleep(max(0.0, 2.5 - (time.monotonic() - t0)))  # every query of the first two cycles has ended
        third = dict(src.collect().failed)
        assert third[last] != "previous query still hanging; skipped", third
        wait_for(lambda: socks[-1].accepted == 2, 3, "the ninth socket queried again")
    finally:
        src.close()
        for s in socks:
            s.close()


def test_nodata_reasons(tmp_path):
    from agent.errors import NoData

    cfg = Config()
    with pytest.raises(NoData, match="no QMP sockets configured"):
        QmpSource(SourceContext(cfg, HostPaths())).collect()
    with pytest.raises(NoData, match="no QMP socket matches"):
        make_source(tmp_path).collect()


def test_parse_iscsi_drive():
    blockstats = [{"device": "drive-vda", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
                   "stats": {"rd_operations": 10, "rd_bytes": 40960, "rd_total_time_ns": 5000000,
                             "wr_operations": 4, "wr_bytes": 16384, "wr_total_time_ns": 2000000,
                             "flush_operations": 1, "flush_total_time_ns": 300, "failed_rd_operations": 2,
                             "idle_time_ns": 12345}}]
    block = [{"device": "drive-vda", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
              "inserted": {"file": "iscsi://198.18.1.2:3260/iqn.2025-01.io.kvmscope.lab:vm0-vda/1"}}]
    (d,) = parse_blockstats(blockstats, block)
    assert (d.target, d.backend, d.iqn, d.lun, d.hosts) == (
        "drive-vda", "libiscsi", "iqn.2025-01.io.kvmscope.lab:vm0-vda", 1, (("198.18.1.2", 3260),))
    assert (d.stats.rd_reqs, d.stats.wr_time_ns, d.stats.failed_reqs, d.stats.idle_time_ns) == (10, 2000000, 2, 12345)


# What QEMU 7.2 answers in query-block for -drive file=iscsi://[fd00:...::2]:3260/IQN/1,format=raw (seen on
# this machine): the node written as a json: pseudo-filename, not the URL.
QEMU_JSON_ISCSI = ('json:{"driver": "raw", "file": {"lun": "1", "portal": "[fd00:6b76:6d73:6::2]:3260", '
                   '"driver": "iscsi", "transport": "tcp", "target": "iqn.2026-11.io.kvmscope.test:v6"}}')


@pytest.mark.parametrize("file, hosts, iqn, lun", [
    (QEMU_JSON_ISCSI, (("fd00:6b76:6d73:6::2", 3260),), "iqn.2026-11.io.kvmscope.test:v6", 1),
    (QEMU_JSON_ISCSI.replace("[fd00:6b76:6d73:6::2]:3260", "198.18.66.2:3260"),
     (("198.18.66.2", 3260),), "iqn.2026-11.io.kvmscope.test:v6", 1),
    ('json:{"driver": "iscsi", "portal": "FD00:0:0::2", "target": "iqn.x:t", "lun": 3}', (("fd00::2", 3260),),
     "iqn.x:t", 3),  # a bare IPv6 portal (no port), a numeric LUN, no format node
    ("iscsi://[FD00::0002]:3261/iqn.x:t/1", (("fd00::2", 3261),), "iqn.x:t", 1),
])
def test_parse_iscsi_drive_as_qemu_writes_it(file, hosts, iqn, lun):
    block = [{"device": "drive0", "inserted": {"file": file}}]
    (d,) = parse_blockstats([{"device": "drive0", "stats": {}}], block)
    assert (d.backend, d.kind, d.hosts, d.iqn, d.lun) == ("libiscsi", "network", hosts, iqn, lun)


@pytest.mark.parametrize("file", [
    'json:{"driver": "raw", "file": {"driver": "iscsi", "portal": 7, "target": "iqn.x:t"}}',
    'json:{"driver": "raw", "file": {"driver": "iscsi", "portal": "p/q", "target": "iqn.x:t"}}',
    'json:{"driver": "raw", "file": {"driver": "nbd", "server": {"host": "::1"}}}',
    'json:{"driver": "raw", "file": [1, 2]}',
    'json:{not json',
    "json:" + '{"file": ' * 20 + "{}" + "}" * 20,
])
def test_odd_json_filenames_stay_what_they_are(file):
    (d,) = parse_blockstats([{"device": "drive0", "stats": {}}], [{"device": "drive0", "inserted": {"file": file}}])
    assert d.backend != "libiscsi" and d.source == file


def test_json_filename_of_a_local_file():
    f = 'json:{"driver": "raw", "file": {"driver": "file", "filename": "/nonexistent/d.img"}}'
    (d,) = parse_blockstats([{"device": "drive0", "stats": {}}], [{"device": "drive0", "inserted": {"file": f}}])
    assert (d.kind, d.source) == ("file", "/nonexistent/d.img")
