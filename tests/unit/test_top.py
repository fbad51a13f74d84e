"""kvmscope top's rows and screen, on a real lab recording and on QEMU histograms."""

from pathlib import Path

from agent.cli.top import header, render, top_rows
from agent.codec import load_recording
from agent.diagnose.window import build_window

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"


def test_lossy_vm_ranks_first_and_fits_80_columns():
    snaps = load_recording(open(REC / "loss-portal1.json"))
    w = build_window(snaps[-2:])
    rows = top_rows(w, snaps[-2], snaps[-1])
    assert (rows[0]["vm"], rows[0]["disk"]) == ("kvmslab-vm0", "vda")
    assert rows[0]["p99_ms"] is None  # a recording from before the libiscsi probe: no histogram
    lines = render(header(w, snaps[-1]), rows)
    assert all(len(ln) <= 80 for ln in lines)
    assert lines[4].startswith("kvmslab-vm0      vda")


def test_p50_p99_per_disk_from_the_libiscsi_histograms_over_the_interval():
    from agent.records.ebpf import LibiscsiData, LibiscsiLatency
    from agent.records.snapshot import Snapshot
    from agent.records.vms import DiskStats, Vm, VmDisk, Vms

    def snap(seq, ts, reqs, slots):
        disk = VmDisk("vda", "network", "iscsi", "iqn.x/1", (("198.18.1.2", 3260),), "iqn.x", 1,
                      stats=DiskStats(rd_reqs=reqs, rd_time_ns=reqs * 600_000))
        lat = LibiscsiData((LibiscsiLatency(42, 0xAB, 1, "read", slots, sum(slots.values()), reqs * 550_000),), (), {}, {})
        return Snapshot(seq, ts, "h", 0.0, {"libvirt": Vms((Vm("vm0", None, "running", 42, (disk,)),)),
                                            "ebpf_libiscsi": lat})
    a, b = snap(1, 100.0, 1000, {19: 1000}), snap(2, 102.0, 1200, {19: 1100, 20: 96, 23: 4})
    rows = top_rows(build_window([a, b]), a, b)
    # in the interval: 100 in slot 19 (< 2^19 ns = 0.524 ms), 96 in slot 20, 4 in slot 23 (< 8.39 ms)
    assert (rows[0]["p50_ms"], rows[0]["p99_ms"], rows[0]["latency_source"]) == (0.524288, 8.388608, "libiscsi")
    lines = render(header(build_window([a, b]), b), rows)
    assert "0.524/8.39" in lines[4] and all(len(ln) <= 80 for ln in lines)
