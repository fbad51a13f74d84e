"""Probes loaded from the object cache (agent/ebpf/objcache.py) count what freshly compiled ones count.

Each test uses a cache directory of its own: the first load compiles (bcc, in the child) and writes the
entry, the next one loads the entry with plain bpf(2) calls. Compiled and cached copies are attached at
the same time and see the same real events.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from agent.config import LIBRARY_DIRS
from agent.ebpf.block_io import BlockIoProbe
from agent.ebpf.compiler import Attach
from agent.ebpf.loader import ATTACHED, LoadOptions, Probe, find_library
from agent.ebpf.tcp_lifecycle import TcpLifecycleProbe
from tests.ebpf.conftest import need_root

pytestmark = pytest.mark.ebpf


def entries(d) -> list:
    return sorted(p for p in d.iterdir() if p.suffix == ".json")


def test_cached_real_probes_count_like_compiled_ones(loopdev, tmp_path):
    """block_io (BTF tracepoints) and tcp_lifecycle (tracepoints), each compiled and from the cache, attached
    together: the same direct writes and the same connections, the same counts, equal to the kernel's."""
    need_root()
    cache = tmp_path / "bpf"
    port = free_port()
    opts = lambda: LoadOptions(storage_ports=(port,), events_per_second=100000, cache_dir=cache)  # noqa: E731
    compiled = [BlockIoProbe(opts(), modes=("btf",)), TcpLifecycleProbe(opts())]
    cached = []
    try:
        for p in compiled:
            rep = p.load()
            assert rep.state == ATTACHED and rep.origin == "compiled", rep.reason
        assert len(entries(cache)) == 3  # the two probes, and block_io's request layout read from the BTF
        cached = [BlockIoProbe(opts(), modes=("btf",)), TcpLifecycleProbe(opts())]
        for p, c in zip(cached, compiled):
            rep = p.load()
            assert rep.state == ATTACHED and rep.origin == "cache", rep.reason
            assert rep.tracepoints == c.report.tracepoints
        dev = os.path.basename(loopdev)
        before = [p.read() for p in compiled + cached]
        s0 = open(f"/sys/block/{dev}/stat").read().split()
        n = 64
        buf = mmap.mmap(-1, 4096)
        buf.write(b"c" * 4096)
        fd = os.open(loopdev, os.O_WRONLY | os.O_DIRECT)
        for i in range(n):
            os.pwritev(fd, [buf], i * 4096)
        os.close(fd)
        srv = socket.socket()
        srv.bind(("127.0.0.1", port))
        srv.listen(n)
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", port))
            a, _ = srv.accept()
            c.close()
            a.close()
        srv.close()
        time.sleep(0.2)
        s1 = open(f"/sys/block/{dev}/stat").read().split()
        after = [p.read() for p in compiled + cached]
    finally:
        for p in compiled + cached:
            p.close()

    def writes(d):
        h = d.histogram(dev, "write")
        return h.count if h else 0

    def connects(d):
        return d.counts.get(("127.0.0.1", port), {}).get("connect", 0)

    sysfs_writes = int(s1[4]) - int(s0[4])
    assert sysfs_writes == n
    assert writes(after[0]) - writes(before[0]) == writes(after[2]) - writes(before[2]) == n
    assert connects(after[1]) - connects(before[1]) == connects(after[3]) - connects(before[3]) == n
    assert sum(1 for e in after[3].events if e.kind == "connect" and e.dport == port) == n


COUNTER_C = r"""
BPF_ARRAY(cfg, u32, 1);
BPF_PERCPU_ARRAY(hits, u64, 3);
BPF_HASH(by_tid, u32, u64, 64);
static __always_inline void hit(int k) {
    int z = 0;
    u32 *want = cfg.lookup(&z);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!want || *want != tgid)
        return;
    u64 *v = hits.lookup(&k);
    if (v) (*v)++;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u64 one = 1, *t = by_tid.lookup(&tid);
    if (t) __sync_fetch_and_add(t, 1); else by_tid.update(&tid, &one);
}
TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { hit(0); return 0; }
RAW_TRACEPOINT_PROBE(sys_enter) { if (ctx->args[1] == GETPPID_NR) hit(1); return 0; }
int on_getppid(struct pt_regs *ctx) { hit(2); return 0; }
"""


class CounterProbe(Probe):
    name = "objcache_test"
    source_file = "objcache_test.bpf.c"

    def extra_cflags(self, present):
        return [f"-DGETPPID_NR={GETPPID_NR}"]

    def attachments(self, present):
        libc = find_library("libc.so.6", LIBRARY_DIRS)
        return [Attach("uprobe", "on_getppid", target="libc.so.6:getppid", binary=str(libc), symbol="getppid")]

    def read(self):
        return None


GETPPID_NR = {"x86_64": 110, "aarch64": 173}[os.uname().machine]


def counter(tmp_path, cache, text=COUNTER_C) -> CounterProbe:
    (tmp_path / "objcache_test.bpf.c").write_text(text)
    return CounterProbe(LoadOptions(probes_dir=tmp_path, tracepoints=set(), cache_dir=cache))


def test_cached_program_counts_like_the_compiled_one(tmp_path):
    """A tracepoint, a raw tracepoint (both attached by bcc itself when compiled) and a declared uprobe:
    250 calls of getppid() by one process, counted 250 times at each place by both copies."""
    need_root()
    if find_library("libc.so.6", LIBRARY_DIRS) is None:
        pytest.fail("no libc.so.6 in " + ", ".join(LIBRARY_DIRS))
    cache = tmp_path / "bpf"
    worker = subprocess.Popen([sys.executable, "-c", "import ctypes, sys\nlibc = ctypes.CDLL('libc.so.6')\n"
                               "for line in sys.stdin:\n    for _ in range(int(line)): libc.getppid()\n"
                               "    print('done', flush=True)"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    a, b = counter(tmp_path, cache), counter(tmp_path, cache)
    try:
        assert a.load().origin == "compiled" and a.report.state == ATTACHED, a.report.reason
        assert b.load().origin == "cache" and b.report.state == ATTACHED, b.report.reason
        want = {"syscalls:sys_enter_getppid", "raw_tracepoint:sys_enter", "uprobe:libc.so.6:getppid"}
        assert set(a.report.tracepoints) == set(b.report.tracepoints) == want
        for p in (a, b):
            p.bpf["cfg"][ctypes.c_int(0)] = ctypes.c_uint32(worker.pid)  # the agent writes a cached map
        worker.stdin.write("250\n")
        worker.stdin.flush()
        assert worker.stdout.readline().strip() == "done"
        counts = [[sum(p.bpf["hits"][ctypes.c_int(k)]) for k in range(3)] for p in (a, b)]
        per_tid = [sum(v for _k, v in p.bpf["by_tid"].items()) for p in (a, b)]
        # the programs are the kernel's own: their run counts agree too
        runs = [{lb: st["run_cnt"] > 0 for lb, st in p.stats().per_program.items()} for p in (a, b)]
    finally:
        a.close()
        b.close()
        worker.stdin.close()
        worker.wait(timeout=30)
    assert counts == [[250, 250, 250], [250, 250, 250]], counts
    assert per_tid == [750, 750]
    assert runs[0] == runs[1] and all(runs[1].values()), runs


def test_changed_source_compiles_and_a_corrupt_entry_is_rebuilt(tmp_path):
    """Another source text is another key (compiled, a second entry); an entry whose program the verifier
    refuses (a valid digest: only the kernel can tell) or that is garbage is compiled again and replaced."""
    need_root()
    cache = tmp_path / "bpf"

    def load(text=COUNTER_C) -> str:
        p = counter(tmp_path, cache, text)
        rep = p.load()
        p.close()
        assert rep.state == ATTACHED, rep.reason
        return rep.origin

    assert load() == "compiled"
    assert load() == "cache"
    [entry] = entries(cache)
    assert load(COUNTER_C + "\n// another revision\n") == "compiled"
    assert len(entries(cache)) == 2

    bad = json.loads(entry.read_text())
    prog = next(p for p in bad["recipe"]["programs"] if p["name"] == "on_getppid")
    raw = bytearray(base64.b64decode(prog["insns"]))
    struct.pack_into("<BBhi", raw, len(raw) - 8, 0x05, 0, -1, 0)  # the last instruction: "goto self", not exit
    prog["insns"] = base64.b64encode(bytes(raw)).decode()
    bad["digest"] = hashlib.sha256(json.dumps(bad["recipe"], sort_keys=True).encode()).hexdigest()
    entry.write_text(json.dumps(bad))
    assert load() == "compiled"
    rebuilt = json.loads(entry.read_text())
    prog = next(p for p in rebuilt["recipe"]["programs"] if p["name"] == "on_getppid")
    assert base64.b64decode(prog["insns"])[-8] == 0x95  # rebuilt: ends with exit again
    assert load() == "cache"

    entry.write_bytes(b"\x7fELF definitely not a recipe")
    assert load() == "compiled"
    assert load() == "cache"


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
