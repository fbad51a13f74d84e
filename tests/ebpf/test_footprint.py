"""The agent holds its probes without bcc or LLVM: compiled in a child, handed over by fd, read with bpf(2).

Each check runs in a fresh interpreter (another test of this session may have
imported bcc into pytest's own process) that loads the probes the way the
agent does and reports on itself: what is mapped (/proc/self/maps), whether
bcc was imported, and what its maps counted for a known amount of work.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent.ebpf.bpfsys import ProgInfo, obj_info
from agent.ebpf.compiler import Attach
from agent.ebpf.loader import ATTACHED, FAILED, LoadOptions, Probe
from tests.ebpf.conftest import need_root

pytestmark = pytest.mark.ebpf

ROOT = Path(__file__).resolve().parents[2]
LLVM_MARKS = ("libLLVM", "libclang", "libbcc")

HOLDER = textwrap.dedent(r'''
    import json, mmap, os, socket, sys, time
    from agent.ebpf import probe_classes
    from agent.ebpf.loader import LoadOptions
    dev, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    t0 = time.monotonic()
    probes = {name: cls(LoadOptions(storage_ports=(port,), events_per_second=100000)) for name, cls in probe_classes().items()}
    futs = {name: p.load_async() for name, p in probes.items()}
    states = {name: f.result().state + " " + f.result().reason for name, f in futs.items()}
    loaded = time.monotonic() - t0
    blk, life = probes["block_io"], probes["tcp_lifecycle"]
    b0, l0 = blk.read(), life.read()
    devname = os.path.basename(dev)
    s0 = open(f"/sys/block/{devname}/stat").read().split()
    buf = mmap.mmap(-1, 4096)
    buf.write(b"k" * 4096)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    for i in range(n):
        os.pwritev(fd, [buf], i * 4096)  # one request at a time: nothing to merge
    os.close(fd)
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(n)
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port))
        a, _addr = srv.accept()
        c.close(); a.close()
    srv.close()
    time.sleep(0.2)
    s1 = open(f"/sys/block/{devname}/stat").read().split()
    b1, l1 = blk.read(), life.read()
    def writes(d):
        h = d.histogram(devname, "write")
        return h.count if h else 0
    maps = open("/proc/self/maps").read()
    rss = int([ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmRSS:")][0])
    out = {
        "states": states, "loaded_seconds": loaded,
        "bcc_imported": sorted(m for m in sys.modules if m == "bcc" or m.startswith("bcc.")),
        "llvm_lines": [ln for ln in maps.splitlines() if any(k in ln for k in %(marks)r)],
        "block_writes": writes(b1) - writes(b0), "sysfs_writes": int(s1[4]) - int(s0[4]),
        "connects": l1.counts.get(("127.0.0.1", port), {}).get("connect", 0)
                    - l0.counts.get(("127.0.0.1", port), {}).get("connect", 0),
        "connect_events": sum(1 for e in l1.events if e.kind == "connect" and e.dport == port),
        "stream_dropped": l1.totals["stream_dropped"] - l0.totals["stream_dropped"],
        "rss_kb": rss,
    }
    for p in probes.values():
        p.close()
    print(json.dumps(out))
''') % {"marks": LLVM_MARKS}


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_probes_held_without_llvm_and_maps_count_exactly(loopdev):
    n = 64
    r = subprocess.run([sys.executable, "-c", HOLDER, loopdev, str(free_port()), str(n)], capture_output=True,
                       text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(s.startswith("attached") for s in out["states"].values()), out["states"]
    assert out["bcc_imported"] == [], "the agent's process imported bcc"
    assert out["llvm_lines"] == [], "LLVM/bcc mapped into the agent's process"
    assert out["block_writes"] == out["sysfs_writes"] == n, out
    assert out["connects"] == n and out["connect_events"] == n, out
    assert out["rss_kb"] < 64 * 1024, f"{out['rss_kb']} kB resident with three probes attached"


class _TestProbe(Probe):
    name = "footprint_test"
    source_file = "footprint_test.bpf.c"

    def __init__(self, opts, attach=()):
        super().__init__(opts)
        self._attach = list(attach)

    def attachments(self, present):
        return self._attach

    def read(self):
        return None


UPROBE_C = r"""
BPF_ARRAY(hits, u64, 2);
int on_getppid(struct pt_regs *ctx) {
    int k = 0;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
RAW_TRACEPOINT_PROBE(sched_process_exec) {
    int k = 1;
    u64 *v = hits.lookup(&k);
    if (v) __sync_fetch_and_add(v, 1);
    return 0;
}
"""


def test_declared_uprobe_and_raw_tracepoint_carried_and_detached(tmp_path):
    """A uprobe declared by the probe class (libc getppid, one process) and an auto-attached raw tracepoint:
    made by the compiler child, counted exactly through the handed-over map, gone from the kernel on close."""
    need_root()
    (tmp_path / "footprint_test.bpf.c").write_text(UPROBE_C)
    worker = subprocess.Popen([sys.executable, "-c", "import ctypes, sys\nlibc = ctypes.CDLL(None)\n"
                               "for line in sys.stdin:\n    for _ in range(int(line)): libc.getppid()\n"
                               "    print('done', flush=True)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    probe = _TestProbe(LoadOptions(probes_dir=tmp_path, tracepoints=set()),
                       [Attach("uprobe", "on_getppid", binary="c", symbol="getppid", pid=worker.pid)])
    try:
        rep = probe.load()
        assert rep.state == ATTACHED, rep.reason
        labels = set(rep.tracepoints)
        assert "raw_tracepoint:sched_process_exec" in labels
        assert any(lb.startswith("uprobe:c:getppid") for lb in labels), labels
        hits = probe.bpf["hits"]
        before = hits[0]
        worker.stdin.write("250\n")
        worker.stdin.flush()
        assert worker.stdout.readline().strip() == "done"
        subprocess.run(["true"], check=True)  # one exec at least
        assert hits[0] - before == 250
        assert hits[1] >= 1
        prog_ids = [obj_info(p.fd, ProgInfo()).id for p in probe.bpf.programs.values()]
        assert prog_ids and all(_prog_exists(i) for i in prog_ids)
    finally:
        probe.close()
        worker.stdin.close()
        worker.wait(timeout=30)
    # detached and unloaded: no program of ours is left in the kernel
    left = [i for i in prog_ids if _prog_exists(i)]
    assert not left, f"programs still loaded after close: {left}"


def _prog_exists(prog_id: int) -> bool:
    import ctypes

    from agent.ebpf import bpfsys

    class Attr(ctypes.Structure):
        _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]

    try:
        fd = bpfsys.bpf(13, Attr(prog_id, 0, 0))  # BPF_PROG_GET_FD_BY_ID
    except OSError:
        return False
    os.close(fd)
    return True


def test_compile_error_degrades_that_probe_with_the_compilers_message(tmp_path):
    need_root()
    (tmp_path / "footprint_test.bpf.c").write_text("int broken(void *ctx) { return undeclared_thing; }\n")
    probe = _TestProbe(LoadOptions(probes_dir=tmp_path, tracepoints=set()))
    rep = probe.load()
    probe.close()
    assert rep.state == FAILED
    assert "undeclared_thing" in rep.reason and "error" in rep.reason, rep.reason
    assert probe.bpf is None


KILLED = textwrap.dedent(r'''
    import json, sys, time
    from agent.ebpf.block_io import BlockIoProbe
    from agent.ebpf.bpfsys import ProgInfo, obj_info
    p = BlockIoProbe()
    rep = p.load()
    print(json.dumps({"state": rep.state, "reason": rep.reason,
                      "ids": [obj_info(x.fd, ProgInfo()).id for x in p.bpf.programs.values()]}), flush=True)
    time.sleep(600)
''')


def test_programs_detached_when_the_agent_is_killed():
    """kill -9 of the process holding the probe: the kernel closes its fds, the programs are detached and
    unloaded (nothing pinned, nothing left by the compiler child)."""
    need_root()
    p = subprocess.Popen([sys.executable, "-c", KILLED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    try:
        out = json.loads(p.stdout.readline())
        assert out["state"] == ATTACHED, out["reason"]
        assert out["ids"] and all(_prog_exists(i) for i in out["ids"])
        kids = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        assert kids == [], f"compiler child still running: {kids}"
    finally:
        p.kill()
        p.wait(30)
    deadline = time.monotonic() + 5
    while any(_prog_exists(i) for i in out["ids"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [i for i in out["ids"] if _prog_exists(i)], "programs left loaded after the holder was killed"
