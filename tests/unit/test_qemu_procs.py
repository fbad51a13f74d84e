"""Which process is a VM's QEMU: a name and a command line are the process's own claim.

Pure logic on /proc trees built here (comm, cmdline, status, an exe link), and a
real impostor: a copy of /bin/sh named qemu-system-x86_64, run by an unprivileged
user with the -uuid of a libvirt domain (libvirt's own test driver), on the real /proc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from agent.hostpaths import HostPaths
from agent.sources.qemu_procs import Owners, impostor_reason, qmp_socket_paths

U = "6b0a1e44-3333-4a4a-9c9c-000000000001"
TRUSTED = frozenset({0, 64055})


@pytest.fixture
def proc_tree(tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    bindir = tmp_path / "usr" / "bin"
    bindir.mkdir(parents=True)
    qemu = bindir / "qemu-system-x86_64"
    qemu.write_bytes(b"\x7fELF")
    qemu.chmod(0o755)
    other = bindir / "python3"
    other.write_bytes(b"\x7fELF")
    other.chmod(0o755)
    writable = tmp_path / "tmp" / "qemu-system-x86_64"
    writable.parent.mkdir()
    writable.write_bytes(b"\x7fELF")
    writable.chmod(0o777)

    def add(pid, argv, uid=0, exe=qemu, comm="qemu-system-x86", start=None):
        """A process; with ``start`` (its start time) also /proc/PID/stat, as the real /proc has it."""
        d = root / str(pid)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        (d / "comm").write_text(comm + "\n")
        if start is not None:
            (d / "stat").write_text(f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 " + "0 " * 12 + f"{start} 0 0\n")
        (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\t0\t0\t0\n")
        os.symlink(exe, d / "exe")

    add.paths = HostPaths(procfs=root, rundir=tmp_path / "run")
    add.other, add.writable, add.qemu, add.root = other, writable, qemu, root
    return add


def test_unprivileged_impostor_never_takes_the_pid(proc_tree):
    proc_tree(100, ["/usr/bin/qemu-system-x86_64", "-name", "guest=vm0", "-uuid", U], uid=64055)
    proc_tree(900, ["/home/u/qemu-system-x86_64", "-uuid", U], uid=1000)  # later pid: used to win
    pid, note = Owners(proc_tree.paths, TRUSTED).by_uuid(U, "vm0")
    assert pid == 100
    assert "pid 900" in note and "uid 1000" in note


def test_impostor_alone_gets_nothing(proc_tree):
    proc_tree(900, ["qemu-system-x86_64", "-uuid", U], uid=1000)
    assert Owners(proc_tree.paths, TRUSTED).by_uuid(U, "vm0")[0] is None


@pytest.mark.parametrize("which", ["other", "writable"])
def test_root_process_with_wrong_executable_rejected(proc_tree, which):
    exe = getattr(proc_tree, which)
    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=0, exe=exe)
    assert "executable" in impostor_reason(proc_tree.paths, 100, TRUSTED)
    pid, note = Owners(proc_tree.paths, TRUSTED).by_uuid(U)
    assert pid is None and "executable" in note


def test_two_trusted_claims_are_ambiguous(proc_tree):
    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=64055)
    proc_tree(200, ["qemu-system-x86_64", "-uuid", U], uid=0)
    pid, note = Owners(proc_tree.paths, TRUSTED).by_uuid(U, "vm0")
    assert pid is None and "ambiguous" in note and "100" in note and "200" in note


def test_libvirt_pid_file_decides(proc_tree):
    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=64055)
    proc_tree(200, ["qemu-system-x86_64", "-uuid", U], uid=0)
    run = proc_tree.paths.rundir / "libvirt" / "qemu"
    run.mkdir(parents=True)
    (run / "vm0.pid").write_text("200")
    assert Owners(proc_tree.paths, TRUSTED).by_uuid(U, "vm0") == (200, None)
    # a pid file naming a process that does not claim the UUID is not believed
    (run / "vm0.pid").write_text("4242")
    assert Owners(proc_tree.paths, TRUSTED).by_uuid(U, "vm0")[0] is None
    (run / "vm0.pid").write_text("²")
    assert Owners(proc_tree.paths, TRUSTED).by_uuid(U, "vm0")[0] is None


def test_qmp_socket_matched_exactly(proc_tree):
    proc_tree(100, ["qemu-system-x86_64", "-qmp", "unix:/run/q/vm1.qmp.old,server=on,wait=off"], uid=0)
    proc_tree(200, ["qemu-system-x86_64", "-chardev", "socket,id=mon,path=/run/q/vm1.qmp,server=on",
                    "-mon", "chardev=mon,mode=control"], uid=0)
    proc_tree(300, ["qemu-system-x86_64", "-name", "/run/q/vm1.qmp"], uid=0)  # substring of an argument only
    o = Owners(proc_tree.paths, TRUSTED)
    assert o.by_socket("/run/q/vm1.qmp") == (200, None)
    assert o.by_socket("/run/q/vm1") == (None, None)
    assert o.by_socket("/run/q/vm1.qmp", peer_pid=100) == (100, None)  # the kernel's word (SO_PEERCRED) first


def test_qmp_socket_paths_forms():
    assert qmp_socket_paths(("q", "-qmp", "unix:/a,,b.qmp,server,nowait", "-monitor", "unix:/m,server",
                             "-chardev", "socket,id=c,path=/c.sock,server=on", "-chardev", "pty,id=x")) == {
        "/a,b.qmp", "/m", "/c.sock"}


# -- the verdicts kept across cycles (ProcessCache) --------------------------------


def test_stat_line_with_odd_names():
    from agent.sources.qemu_procs import _stat_comm_start

    assert _stat_comm_start(b"42 (qemu-system-x86) S 1 42 42 0 -1 4194560" + b" 0" * 12 + b" 777 0 0\n") == (
        b"qemu-system-x86", 777)
    assert _stat_comm_start(b"42 (a) (b) S 1 42 42 0 -1 4194560" + b" 0" * 12 + b" 9 0\n") == (b"a) (b", 9)
    assert _stat_comm_start(b"garbage")[1] is None


def test_cache_judges_each_process_once(proc_tree, monkeypatch):
    from agent.sources import qemu_procs

    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=64055, start=5000)
    proc_tree(900, ["qemu-system-x86_64", "-uuid", U], uid=1000, start=5100)  # an impostor beside it
    calls = []
    real = qemu_procs.impostor_reason
    monkeypatch.setattr(qemu_procs, "impostor_reason", lambda *a: calls.append(a[1]) or real(*a))
    cache = qemu_procs.ProcessCache()
    for _ in range(3):
        pid, note = Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0")
        assert pid == 100 and "pid 900" in note and "uid 1000" in note
    assert sorted(calls) == [100, 900]  # judged in the first cycle only
    assert cache.keys[100][:2] == (100, 5000) and cache.keys[900][:2] == (900, 5100)
    (proc_tree.root / "900").rename(proc_tree.root / "gone")  # the impostor exits: forgotten
    assert Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0") == (100, None)
    assert {k[0] for k in cache.procs} == {100} and {k[0][0] for k in cache.verdicts} == {100}


def test_scan_reads_the_name_of_other_processes_and_the_stat_of_known_qemus(proc_tree, monkeypatch):
    """Every cycle reads every process of the host: only its comm (cheaper for the kernel than stat) unless
    it was a QEMU in the last scan, whose stat has name and start time in one read; a process that becomes a
    QEMU (an exec) is found by its new name."""
    from agent.sources import qemu_procs

    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=64055, start=5000)
    proc_tree(200, ["/usr/bin/python3"], exe=proc_tree.other, comm="python3", start=5100)
    reads = []
    real = qemu_procs._read
    monkeypatch.setattr(qemu_procs, "_read", lambda path, *a: reads.append(path.rsplit("/", 2)[1:]) or real(path, *a))
    cache = qemu_procs.ProcessCache()
    assert [q.pid for q in qemu_procs.qemu_processes(proc_tree.paths, cache)] == [100]
    assert sorted(reads) == [["100", "comm"], ["100", "stat"], ["200", "comm"]]
    reads.clear()
    proc_tree(200, ["qemu-system-x86_64", "-uuid", U[:-1] + "2"], uid=64055, comm="qemu-system-x86", start=5100)  # exec
    assert [q.pid for q in qemu_procs.qemu_processes(proc_tree.paths, cache)] == [100, 200]
    assert sorted(reads) == [["100", "stat"], ["200", "comm"], ["200", "stat"]]


def test_cache_judges_again_when_the_process_or_its_binary_changes(proc_tree):
    from agent.sources.qemu_procs import ProcessCache

    cache = ProcessCache()
    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=0, start=5000)
    assert Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0") == (100, None)
    # the binary became writable by others (same inode, another mode): rejected at once
    proc_tree.qemu.chmod(0o777)
    pid, note = Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0")
    assert pid is None and "writable by others" in note
    proc_tree.qemu.chmod(0o755)
    assert Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0") == (100, None)
    # the process exec'd another program named like QEMU (same pid, same start time, another executable)
    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=0, exe=proc_tree.writable, start=5000)
    pid, note = Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0")
    assert pid is None and "writable by others" in note
    # the pid was reused by a user's process with the same binary: another start time, judged afresh
    proc_tree(100, ["qemu-system-x86_64", "-uuid", U], uid=1000, start=7000)
    pid, note = Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0")
    assert pid is None and "uid 1000" in note
    # ... and a new claim is read with it
    proc_tree(100, ["qemu-system-x86_64", "-uuid", "another"], uid=0, start=8000)
    assert Owners(proc_tree.paths, TRUSTED, cache).by_uuid(U, "vm0") == (None, None)
    assert Owners(proc_tree.paths, TRUSTED, cache).by_uuid("another", "vm1") == (100, None)


# -- the real thing ------------------------------------------------------------------

NODE = f"""<node><domain type='test'><name>victim</name><uuid>{U}</uuid><memory>65536</memory>
<os><type>hvm</type></os></domain></node>"""


@pytest.fixture
def impostor():
    """A copy of /bin/sh named qemu-system-x86_64, run as nobody with the domain's -uuid."""
    if os.geteuid() != 0:
        pytest.skip("starting a process as another user needs root (make test runs as root)")
    d = Path(tempfile.mkdtemp(prefix="kvmscope-impostor-"))
    d.chmod(0o755)
    exe = d / "qemu-system-x86_64"
    shutil.copy("/bin/sh", exe)
    os.chown(exe, 65534, 65534)
    p = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          str(exe), "-c", "sleep 60; :", "-uuid", U, "-name", "guest=victim"])
    try:
        for _ in range(500):  # until setpriv has exec'd the impostor (its own argv names -uuid too)
            try:
                if Path(f"/proc/{p.pid}/comm").read_text().startswith("qemu"):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        else:
            pytest.fail("the impostor did not start")
        yield p
    finally:
        p.kill()
        p.wait(5)
        shutil.rmtree(d)


def test_real_impostor_rejected_by_libvirt_source(tmp_path, impostor):
    pytest.importorskip("libvirt", reason="python3-libvirt not installed (make test installs it)")
    from agent.config import Config
    from agent.sources import SourceContext
    from agent.sources.libvirt_vms import LibvirtSource

    (tmp_path / "node.xml").write_text(NODE)
    cfg = Config()
    cfg.libvirt.uri = f"test://{tmp_path / 'node.xml'}"
    paths = HostPaths(rundir=tmp_path / "run")  # real /proc; no libvirt pid file for the test driver's domain
    assert any(q.pid == impostor.pid and q.uuid == U for q in Owners(paths).procs), "the impostor looks like a QEMU"
    src = LibvirtSource(SourceContext(cfg, paths))
    try:
        first = src.collect().vms
        (vm,) = src.collect().vms  # the next cycle judges from the source's cache: the same verdict
    finally:
        src.close()
    for vm in (first[0], vm):
        assert vm.uuid == U and vm.pid is None
        assert f"pid {impostor.pid} (uid 65534 is not root" in vm.error


def test_real_trusted_process_judged_again_when_its_binary_turns_writable(tmp_path):
    """On the real /proc, through the libvirt source's cache: a root process running a root-owned binary
    named like QEMU, with a domain's -uuid, is the domain's QEMU; the cycle after its binary became writable
    by others it is not, and the cycle after that (mode restored) it is again."""
    if os.geteuid() != 0:
        pytest.skip("a root-owned binary and process need root (make test runs as root)")
    pytest.importorskip("libvirt", reason="python3-libvirt not installed (make test installs it)")
    from agent.config import Config
    from agent.sources import SourceContext
    from agent.sources.libvirt_vms import LibvirtSource

    d = Path(tempfile.mkdtemp(prefix="kvmscope-qemu-"))
    d.chmod(0o755)
    exe = d / "qemu-system-x86_64"
    shutil.copy("/bin/sh", exe)
    exe.chmod(0o755)
    p = subprocess.Popen([str(exe), "-c", "sleep 60; :", "-uuid", U, "-name", "guest=victim"])
    (tmp_path / "node.xml").write_text(NODE)
    cfg = Config()
    cfg.libvirt.uri = f"test://{tmp_path / 'node.xml'}"
    src = LibvirtSource(SourceContext(cfg, HostPaths(rundir=tmp_path / "run")))
    try:
        for _ in range(500):
            try:
                if Path(f"/proc/{p.pid}/comm").read_text().startswith("qemu"):
                    break
            except OSError:
                pass
            time.sleep(0.02)
        (vm,) = src.collect().vms
        assert vm.pid == p.pid, vm.error
        (vm,) = src.collect().vms  # from the cache
        assert vm.pid == p.pid and (p.pid, U) in {(q.pid, q.uuid) for q in src._procs.procs.values()}
        exe.chmod(0o777)
        (vm,) = src.collect().vms
        assert vm.pid is None and f"pid {p.pid} (executable {exe} is owned by uid 0 or writable by others)" in vm.error
        exe.chmod(0o755)
        (vm,) = src.collect().vms
        assert vm.pid == p.pid, vm.error
    finally:
        src.close()
        p.kill()
        p.wait(5)
        shutil.rmtree(d)
