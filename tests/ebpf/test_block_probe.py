"""block_io probe against fio O_DIRECT I/O on a loop device of our own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from agent.ebpf import decode
from agent.ebpf.block_io import MODES, BlockIoProbe
from agent.ebpf.loader import ATTACHED, LoadOptions
from agent.exporters.render_ebpf import render_block_io

pytestmark = pytest.mark.ebpf


def stat_fields(dev: str) -> list[int]:
    return [int(x) for x in open(f"/sys/block/{dev}/stat").read().split()]


def hist_total(data, dev):
    out = {}
    for op in ("read", "write"):
        h = data.histogram(dev, op)
        out[op] = h
    return out


@pytest.mark.parametrize("mode", MODES)
def test_histogram_matches_diskstats_and_fio(loopdev, mode):
    """Each way the probe can run (request mode on tp_btf or raw tracepoints with the running kernel's
    BTF offsets, the classic tracepoint fallback) counts what the kernel's disk statistics count, with
    the same mean, fio's median, and the I/O attributed to fio's process."""
    if not shutil.which("fio"):
        pytest.skip("fio not installed")
    dev = os.path.basename(loopdev)
    probe = BlockIoProbe(LoadOptions(), modes=(mode,))
    rep = probe.load()
    assert rep.state == ATTACHED, rep.reason
    assert probe.mode == mode
    want = {"btf": {"tp_btf:block_io_start", "tp_btf:block_rq_complete"},
            "raw": {"raw_tracepoint:block_io_start", "raw_tracepoint:block_rq_complete"},
            "classic": {"block:block_rq_issue", "block:block_rq_complete", "block:block_rq_insert"}}[mode]
    assert set(rep.tracepoints) == want
    try:
        before = probe.read()
        s0 = stat_fields(dev)
        fio = subprocess.Popen(
            ["fio", "--name=ks", f"--filename={loopdev}", "--direct=1", "--rw=randrw", "--rwmixread=70", "--bs=4k",
             "--ioengine=libaio", "--iodepth=4", "--thread", "--time_based", "--runtime=2", "--size=200M",
             "--output-format=json", "--norandommap"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        fio.stdout_text, err = fio.communicate(timeout=60)
        assert fio.returncode == 0, err
        time.sleep(0.2)
        s1 = stat_fields(dev)
        after = probe.read()
        # no leak: the requests fio issued have left the in-flight table, but
        # for lost completions: skipped by the kernel (a completion nested in
        # another BPF program on its CPU: recursion misses) or not matched to
        # their issue, and a few per 100k that leave no trace at completion
        # (seen with the old LRU hash too; cause not identified). Such an
        # entry is evicted later by its set, like an LRU entry.
        rdev = os.stat(loopdev).st_rdev
        kdev = os.major(rdev) << decode.MINORBITS | os.minor(rdev)
        left = [(w.op, w.sector) for _, st in probe.bpf[b"inflight"].items() for w in st.way
                if w.dev == kdev and (w.insert_ns or w.issue_ns)] if mode == "classic" else []
        complete = next(tp for tp in rep.tracepoints if tp.endswith("block_rq_complete"))
        skipped = probe.stats().per_program[complete]["recursion_misses"]
    finally:
        probe.close()
    res = json.loads(fio.stdout_text[fio.stdout_text.index("{"):])

    d_ios = (s1[0] - s0[0]) + (s1[4] - s0[4])
    d_ticks_ms = (s1[3] - s0[3]) + (s1[7] - s0[7])

    def delta(op):
        a, b = after.histogram(dev, op), before.histogram(dev, op)
        cnt = (a.count if a else 0) - (b.count if b else 0)
        sm = (a.sum_ns if a else 0) - (b.sum_ns if b else 0)
        slots = {s: (a.slots.get(s, 0) if a else 0) - (b.slots.get(s, 0) if b else 0) for s in range(40)}
        return cnt, sm, slots

    (rc, rs, rsl), (wc, ws, wsl) = delta("read"), delta("write")
    count = rc + wc
    assert d_ios > 5000, f"too little I/O to compare ({d_ios})"
    lost = skipped + after.totals["unmatched"] - before.totals["unmatched"]
    if mode != "classic":  # the kernel timed every request of the loop device (I/O statistics on)
        assert after.totals["untimed"] == before.totals["untimed"], after.totals
    assert len(left) <= lost + 0.001 * d_ios, f"{left} of {dev} still in the in-flight table after fio ({lost} lost)"
    assert abs(count - d_ios) <= 0.01 * d_ios, (count, d_ios)
    mean_probe_ms = (rs + ws) / count / 1e6
    mean_stat_ms = d_ticks_ms / d_ios
    assert abs(mean_probe_ms - mean_stat_ms) <= 0.2 * mean_stat_ms, (mean_probe_ms, mean_stat_ms)

    # median of the histogram (read) within one bucket of fio's read clat median
    fio_median_ns = res["jobs"][0]["read"]["clat_ns"]["percentile"]["50.000000"]
    acc, med_slot = 0, None
    for s in sorted(rsl):
        acc += rsl[s]
        if acc >= rc / 2:
            med_slot = s
            break
    assert abs(med_slot - decode.slot_of_ns(fio_median_ns)) <= 1, (med_slot, fio_median_ns)

    # attribution: >= 95% of this device's I/O to the fio process (--thread: every job is a
    # thread of it, one tgid), with a latency histogram per op that agrees with the device's
    def by_proc(data):
        return {(p.tgid, p.op): p for p in data.processes if p.device == dev}

    b_p, a_p = by_proc(before), by_proc(after)
    mine = {op: a_p[(fio.pid, op)] for op in ("read", "write") if (fio.pid, op) in a_p}
    assert set(mine) == {"read", "write"}, sorted(a_p)
    assert not any(k[0] == fio.pid for k in b_p)
    fio_count = sum(p.count for p in mine.values())
    assert fio_count >= 0.95 * count, (fio_count, count, a_p)
    p = mine["read"]
    assert p.count == sum(p.slots.values())
    assert (p.major, p.minor) == (os.major(rdev), os.minor(rdev))
    assert p.bytes == 4096 * p.count
    # the process's histogram is the device's, less what others did: same median slot
    acc, p_med = 0, None
    for s in sorted(p.slots):
        acc += p.slots[s]
        if acc >= p.count / 2:
            p_med = s
            break
    assert abs(p_med - med_slot) <= 1, (p_med, med_slot)

    # Prometheus rendering: a real histogram with every bound present
    fam = next(f for f in render_block_io(after) if f.name == "kvmscope_block_io_latency_seconds")
    buckets = [s for s in fam.samples if s.name.endswith("_bucket") and s.labels["device"] == dev and s.labels["op"] == "read"]
    assert len(buckets) == after.slot_max + 2
    assert buckets[-1].labels["le"] == "+Inf"
    cnt = next(s for s in fam.samples if s.name.endswith("_count") and s.labels["device"] == dev and s.labels["op"] == "read")
    assert buckets[-1].value == cnt.value == after.histogram(dev, "read").count
