"""The libiscsi probe on the real kernel, against libiscsi.so.7's own functions called here.

A private copy of the library (uprobes live on a file's inode: another agent's probe on the system
library never counts here) is loaded with ctypes; scsi_create_task + scsi_free_scsi_task on it are
tasks the probe sees freed without a submission (``untimed``). Attached, each free is counted;
with the command uprobes detached (sampling), none is, and the call costs nothing again; attached
again, counted again. The calibration measures what one hit costs this machine.

The distribution: a stand-alone QEMU (its guest looping 4 KiB O_DIRECT reads and writes) on a LUN
of a tgtd of this test's own on loopback, with QEMU's own block-latency-histogram-set on its disk,
bounds = the probe's log2 bounds: over the same 15 s the p50 and p99 buckets of QEMU's histogram and
of the probe's (that QEMU's pid) are at most one bucket apart. ~40 s (a guest boot under TCG).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.ebpf.libiscsi import TOT_N, TOT_UNTIMED, LibiscsiProbe
from agent.ebpf.loader import ATTACHED, LoadOptions, find_library
from agent.records.disk_latency import log2_bounds_ns, quantile_ns, slots_to_counts
from agent.records.ebpf import SLOT_MAX
from agent.sources.qmp_vms import QmpClient
from tests.conftest import wait_for
from tests.ebpf.conftest import need_root

pytestmark = pytest.mark.ebpf


@pytest.fixture
def private_lib(tmp_path):
    need_root()
    src = find_library(LibiscsiProbe.library, LoadOptions().library_dirs)
    assert src is not None, "libiscsi.so.7 missing (Debian libiscsi7, pulled in by qemu-block-extra)"
    shutil.copyfile(src, tmp_path / LibiscsiProbe.library)
    return tmp_path


def test_command_uprobes_detach_and_attach_again(private_lib):
    p = LibiscsiProbe(LoadOptions(library_dirs=(private_lib,)))
    rep = p.load()
    assert rep.state == ATTACHED, f"{rep.reason} (fix: {rep.fix})"
    try:
        assert "uprobe:libiscsi.so.7:scsi_free_scsi_task" in rep.tracepoints
        assert p.hit_ns is not None and p.hit_ns > 0, "a breakpoint trap costs something"
        lib = ctypes.CDLL(str(private_lib / LibiscsiProbe.library))
        lib.scsi_create_task.restype = ctypes.c_void_p
        lib.scsi_create_task.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.scsi_free_scsi_task.argtypes = [ctypes.c_void_p]
        cdb = (ctypes.c_ubyte * 16)(0x28)

        def free_tasks(n=50):
            t0 = time.perf_counter()
            for _ in range(n):
                lib.scsi_free_scsi_task(lib.scsi_create_task(10, cdb, 0, 0))
            return (time.perf_counter() - t0) / n

        def untimed():
            return p.read().totals["untimed"]

        u0 = untimed()
        on = free_tasks()
        u1 = untimed()
        assert u1 - u0 == 50
        p.detach_sampled()
        p._off_left = 1  # as the duty cycle leaves it: one cycle detached
        off = free_tasks()
        u2 = p.percpu_totals("totals", TOT_N)[TOT_UNTIMED]
        assert u2 == u1, "detached: no free seen"
        p._off_left = 0
        p.attach_sampled()
        free_tasks()
        assert p.percpu_totals("totals", TOT_N)[TOT_UNTIMED] - u2 == 50
        print(f"\nscsi_create_task + free: {on * 1e6:.1f} us attached, {off * 1e6:.1f} us detached; "
              f"calibrated hit {p.hit_ns / 1000:.1f} us", flush=True)
        assert off < on
    finally:
        p.close()


# -- the distribution against QEMU's own histogram ------------------------------------------------------------------

TGT_PORT, TGT_CONTROL = 3271, 74  # a tgtd of this test's own on loopback (the lab's is 42)
IQN = "iqn.2026-11.io.kvmscope.test:libiscsi-reference"
WINDOW = 15.0


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def reference_qemu(tmp_path, private_lib):
    """tgtd on loopback with a LUN in tmp, and a stand-alone QEMU (private libiscsi copy) whose guest loops
    4 KiB O_DIRECT reads and writes on it; QMP on a socket."""
    from tests.es.test_ipv6_portal import build_initramfs  # the lab's guest parts, one disk, its own /init

    for b in ("tgtd", "tgtadm", "qemu-system-x86_64"):
        assert shutil.which(b), f"{b} not installed (deploy/setup.sh installs it)"
    lun = tmp_path / "lun.img"
    with open(lun, "wb") as f:
        f.truncate(64 << 20)
    tgtd = subprocess.Popen(["tgtd", "-f", "-C", str(TGT_CONTROL), "--iscsi", f"portal=127.0.0.1:{TGT_PORT}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    adm = ["tgtadm", "-C", TGT_CONTROL, "--lld", "iscsi"]
    q = None
    try:
        wait_for(lambda: sh(*adm, "--op", "show", "--mode", "sys", check=False).returncode == 0, 15, "tgtd", step=0.2)
        sh(*adm, "--op", "new", "--mode", "target", "--tid", 1, "-T", IQN)
        sh(*adm, "--op", "new", "--mode", "logicalunit", "--tid", 1, "--lun", 1, "-b", lun)
        sh(*adm, "--op", "bind", "--mode", "target", "--tid", 1, "--initiator-address", "127.0.0.1")
        kernel = build_initramfs(tmp_path / "initrd.gz")
        qmp, console = tmp_path / "qmp.sock", tmp_path / "console.log"
        log = open(tmp_path / "qemu.log", "wb")
        q = subprocess.Popen([
            "qemu-system-x86_64", "-M", "pc", "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config",
            "-display", "none", "-name", "guest=kvmscope-reference", "-no-reboot",
            "-kernel", kernel, "-initrd", str(tmp_path / "initrd.gz"), "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{console}", "-qmp", f"unix:{qmp},server=on,wait=off",
            "-drive", f"file=iscsi://127.0.0.1:{TGT_PORT}/{IQN}/1,if=none,id=drive0,format=raw,cache=none",
            "-device", "virtio-blk-pci,drive=drive0,id=disk0",
        ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, LD_LIBRARY_PATH=str(private_lib)))
        log.close()

        def started():
            assert q.poll() is None, f"QEMU exited: {(tmp_path / 'qemu.log').read_text()[-2000:]}"
            return console.exists() and "load started" in console.read_text(errors="replace")

        wait_for(started, 120, "the reference guest's disk load")
        yield {"pid": q.pid, "qmp": str(qmp)}
    finally:
        if q is not None:
            q.kill()
            q.wait(10)
        sh(*adm, "--op", "delete", "--mode", "target", "--tid", 1, "--force", check=False)
        sh(*adm, "--op", "delete", "--mode", "system", check=False)
        try:
            tgtd.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(tgtd.pid, signal.SIGKILL)
            tgtd.wait(5)
        for p in (f"/var/run/tgtd/socket.{TGT_CONTROL}", f"/var/run/tgtd/socket.{TGT_CONTROL}.lock"):
            Path(p).unlink(missing_ok=True)


def qmp(path, cmd, args=None):
    c = QmpClient(path, time.monotonic() + 10)
    try:
        c.connect()
        return c.execute(cmd, args)
    finally:
        c.close()


def rw_counts(data, pid):
    counts = [0] * (SLOT_MAX + 2)
    for x in data.latencies:
        if x.tgid == pid and x.op in ("read", "write"):
            counts = [a + b for a, b in zip(counts, slots_to_counts(x.slots))]
    return counts


def bucket(bounds, counts, q):
    v = quantile_ns(bounds, counts, q)
    return len(bounds) if v == float("inf") else bounds.index(int(v))


def test_distribution_matches_qemus_own_histogram(reference_qemu, private_lib):
    """Within one log2 bucket at p50 and p99: the probe against QEMU's block-latency-histogram of the same
    process and interval, bounds = the probe's log2 bounds (QEMU times the guest request, the probe the iSCSI
    command under it)."""
    bounds = log2_bounds_ns()
    blocks = qmp(reference_qemu["qmp"], "query-block")
    dev = next(b["qdev"] for b in blocks if b.get("qdev", "").startswith("/machine/peripheral/disk0"))
    p = LibiscsiProbe(LoadOptions(library_dirs=(private_lib,), uprobe_budget=1.0))  # always attached here
    rep = p.load()
    assert rep.state == ATTACHED, rep.reason
    try:
        # QEMU's bin i counts [bound i-1, bound i); bounds from 2^1 make its bin s the probe's slot s (bin 0: slots 0-1)
        qmp(reference_qemu["qmp"], "block-latency-histogram-set", {"id": dev, "boundaries": list(bounds[1:])})
        before = rw_counts(p.read(), reference_qemu["pid"])
        time.sleep(WINDOW)
        after = rw_counts(p.read(), reference_qemu["pid"])
        stats = qmp(reference_qemu["qmp"], "query-blockstats")
    finally:
        p.close()
    st = next(s["stats"] for s in stats if s.get("qdev") == dev)
    qemu = [a + b for a, b in zip(st["rd_latency_histogram"]["bins"], st["wr_latency_histogram"]["bins"])]
    ours = [y - x for x, y in zip(before, after)]
    ours = [ours[0] + ours[1]] + ours[2:]
    qb = bounds[1:]
    n_q, n_o = sum(qemu), sum(ours)
    print(f"\nreference QEMU over {WINDOW:.0f}s: QEMU's histogram {n_q} requests, the probe {n_o} commands",
          file=sys.stderr)
    assert n_q > 100 and abs(n_q - n_o) <= 0.05 * n_q + 5
    for q in (0.5, 0.99):
        bq, bo = bucket(qb, qemu, q), bucket(qb, ours, q)
        print(f"  p{int(q * 100)}: QEMU's bucket < {qb[min(bq, len(qb) - 1)] / 1e6:.3f} ms, "
              f"the probe's < {qb[min(bo, len(qb) - 1)] / 1e6:.3f} ms", file=sys.stderr)
        assert abs(bq - bo) <= 1, (q, bq, bo)
