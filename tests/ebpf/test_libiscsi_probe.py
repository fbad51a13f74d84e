"""The libiscsi probe on the real kernel, against libiscsi.so.7's own functions called here.

A private copy of the library (uprobes live on a file's inode: another agent's probe on the system
library never counts here) is loaded with ctypes; scsi_create_task + scsi_free_scsi_task on it are
tasks the probe sees freed without a submission (``untimed``). Attached, each free is counted;
with the command uprobes detached (sampling), none is, and the call costs nothing again; attached
again, counted again. The calibration measures what one hit costs this machine.
"""

from __future__ import annotations

import ctypes
import shutil
import time

import pytest

from agent.ebpf.libiscsi import TOT_N, TOT_UNTIMED, LibiscsiProbe
from agent.ebpf.loader import ATTACHED, LoadOptions, find_library
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
