"""kvmscope top's rows and screen, on a real lab recording and on QEMU histograms."""

from pathlib import Path

from agent.cli.top import header, p99_ms, render, top_rows
from agent.codec import load_recording
from agent.diagnose.window import build_window

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"


def test_p99_from_histogram_deltas():
    b = {"rd": {"boundaries_ns": [1_000_000, 10_000_000], "bins": [100, 0, 0]}}
    a = {"rd": {"boundaries_ns": [1_000_000, 10_000_000], "bins": [190, 9, 1]},
         "wr": {"boundaries_ns": [1_000_000, 10_000_000], "bins": [0, 0, 0]}}
    # in the interval: 90 under 1 ms, 9 in [1, 10) ms, 1 above: p99 is in the 10 ms bucket
    assert p99_ms(b, a) == 10.0
    assert p99_ms(None, {"rd": {"boundaries_ns": [5], "bins": [0, 0]}}) is None
    assert p99_ms(None, {"rd": {"boundaries_ns": [5], "bins": [0, 1]}}) == float("inf")


def test_lossy_vm_ranks_first_and_fits_80_columns():
    snaps = load_recording(open(REC / "loss-portal1.json"))
    w = build_window(snaps[-2:])
    rows = top_rows(w, snaps[-2], snaps[-1])
    assert (rows[0]["vm"], rows[0]["disk"]) == ("kvmslab-vm0", "vda")
    assert rows[0]["p99_ms"] is None  # libvirt VMs have no QEMU histograms
    lines = render(header(w, snaps[-1]), rows)
    assert all(len(ln) <= 80 for ln in lines)
    assert lines[4].startswith("kvmslab-vm0      vda")
