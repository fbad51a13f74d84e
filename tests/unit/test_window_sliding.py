"""The live diagnosis' window, carried from cycle to cycle (agent/diagnose/window.py): the per-disk baselines
kept as sorted samples that slide with the history, the requests per interval read from the timeline.
Whatever is carried forward must give exactly what a walk over the same snapshots gives."""

from pathlib import Path

import pytest

from agent import health
from agent.codec import read_recording
from agent.diagnose import window as W
from agent.diagnose.timeline import Timeline
from agent.records.rates import mean_latency_ms

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"


def load(name):
    return read_recording(str(REC / f"{name}.json"))


def walked_baselines(history):
    """The definition, walked from scratch: per disk the median of its mean latency of each step."""
    per = {}
    for a, b in zip(history, history[1:]):
        for key, (_vm, d) in b.vm_disks.items():
            prev = a.vm_disks.get(key)
            if d.stats is None or prev is None or prev[1].stats is None:
                continue
            s0, s1 = prev[1].stats, d.stats
            if sum((s1.rd_reqs - s0.rd_reqs, s1.wr_reqs - s0.wr_reqs, s1.fl_reqs - s0.fl_reqs)) < 0:
                continue
            ms = mean_latency_ms(s0, s1)
            if ms is not None:
                per.setdefault(key, []).append(ms)
    return {k: b for k, v in per.items() if (b := health.baseline(v, health.BASELINE_QUANTILE)) is not None}


@pytest.fixture(autouse=True)
def fresh_slots(monkeypatch):
    monkeypatch.setattr(W, "_samples", [])


def test_sliding_baselines_equal_a_walk_of_the_same_history():
    snaps = load("flap-portal2")  # 25 snapshots: the flap's slow and stopped steps come and go
    assert len(snaps) >= 20
    for end in range(4, len(snaps) + 1):
        history = snaps[max(0, end - 12):end]  # slides by one, then keeps 12
        assert W._disk_baselines(history) == walked_baselines(history)
    slot = W._samples[0]
    assert len(slot.steps) == 11  # it slid: one step out, one in, per call


def test_two_histories_slide_side_by_side_and_a_third_one_is_walked():
    snaps = load("flap-portal2")
    for end in range(8, len(snaps) + 1):
        long_h, short_h = snaps[max(0, end - 10):end], snaps[max(0, end - 10):end - 2]
        assert W._disk_baselines(long_h) == walked_baselines(long_h)
        assert W._disk_baselines(short_h) == walked_baselines(short_h)
        other = snaps[::3]  # no slot slid to it: walked in full, evicting the least recently used
        if end % 5 == 0:
            assert W._disk_baselines(other) == walked_baselines(other)


def test_a_history_that_jumps_is_walked_again():
    snaps = load("flap-portal2")
    assert W._disk_baselines(snaps[0:6]) == walked_baselines(snaps[0:6])
    assert W._disk_baselines(snaps[10:16]) == walked_baselines(snaps[10:16])  # no overlap
    assert W._disk_baselines(snaps[11:20]) == walked_baselines(snaps[11:20])  # slid by one, grew by four
    assert W._disk_baselines(snaps[11:20]) == walked_baselines(snaps[11:20])  # the same again


@pytest.mark.parametrize("first", [None, "healthy"])
def test_requests_per_interval_from_the_timeline_equal_the_walk(first):
    """The timeline's steps (a disk in every snapshot) and the walk (one that came within the window, counters
    of another run in front) give the same disk windows."""
    snaps = load("healthy-4vms")
    if first:
        snaps = load(first)[-1:] + snaps  # two VMs of another run in front: missing disks, counters reset
    dt = snaps[-1].timestamp - snaps[0].timestamp
    paths = snaps[-1].paths
    tl = W.build_timeline(snaps, paths)
    walked_tl = Timeline(times=tl.times, disk_ops={}, disk_ms={}, disk_portal={}, portal_progress={},
                         portal_retrans={}, portal_backoff={}, portal_ack_age_ms={}, portal_unacked={})
    fast = W._disk_windows(snaps, dt, paths, [], tl)
    walked = W._disk_windows(snaps, dt, paths, [], walked_tl)
    assert fast == walked
    assert len(fast) == 8 and all(len(d.intervals_ops) >= 1 for d in fast)
    if first:
        assert any(None in tl.disk_ops[f"{d.vm}/{d.disk}"] for d in fast)  # the walk was taken for some


def test_window_latencies_are_the_three_mean_latencies():
    import random

    from agent.records.rates import window_latencies_ms
    from agent.records.vms import DiskStats

    rnd = random.Random(17)
    fields = ("rd_reqs", "rd_time_ns", "wr_reqs", "wr_time_ns", "fl_reqs", "fl_time_ns")
    for _ in range(3000):
        a = DiskStats(**{f: rnd.choice([0, 5, rnd.randrange(10**9)]) for f in fields})
        b = DiskStats(**{f: max(0, getattr(a, f) + rnd.choice([0, 0, 3, rnd.randrange(10**7), -1]))
                         for f in fields})
        assert window_latencies_ms(a, b) == (mean_latency_ms(a, b), mean_latency_ms(a, b, "read"),
                                             mean_latency_ms(a, b, "write"))


def walked_conn_windows(snaps):
    """The connection windows walked from scratch (no running sums)."""
    seen = W._connections_seen(snaps)
    dt = max(snaps[-1].timestamp - snaps[0].timestamp, 1e-9)
    return W._conn_windows_summed(snaps, seen, dt, snaps[-1].paths, {})


@pytest.fixture()
def fresh_conn_slots(monkeypatch):
    monkeypatch.setattr(W, "_conn_slots", [])


@pytest.mark.parametrize("name", ["flap-portal2", "offline-portal1-4vms", "loss-tohost-portal2"])
def test_connection_sums_carried_forward_equal_a_walk(name, fresh_conn_slots):
    """Two windows sliding side by side (12 and 3 snapshots, as the live diagnosis' window and recent
    intervals), connections coming and going (the flap's reconnects, a portal offline): the running sums
    give exactly the walked windows."""
    snaps = load(name)
    for end in range(3, len(snaps) + 1):
        for size in (12, 3):
            win = snaps[max(0, end - size):end]
            seen = W._connections_seen(win)
            dt = max(win[-1].timestamp - win[0].timestamp, 1e-9)
            assert W._conn_windows(win, seen, dt, win[-1].paths) == walked_conn_windows(win)
    assert len(W._conn_slots) == 2 and {len(x.refs) for x in W._conn_slots} == {3, min(12, len(snaps))}


def test_connection_sums_of_a_list_whose_dropped_snapshot_is_gone_are_walked_again(fresh_conn_slots):
    import copy

    snaps = load("flap-portal2")
    first = [copy.copy(s) for s in snaps[:6]]  # objects of their own, dropped below
    win = first + snaps[6:8]
    W._conn_windows(win, W._connections_seen(win), 1.0, win[-1].paths)
    later = first[1:] + snaps[6:9]
    del first, win
    import gc

    gc.collect()
    seen = W._connections_seen(later)
    got = W._conn_windows(later, seen, 1.0, later[-1].paths)
    assert got == W._conn_windows_summed(later, seen, 1.0, later[-1].paths, {})


@pytest.mark.parametrize("name", ["flap-portal2", "offline-portal1-4vms", "loss-tohost-portal2"])
def test_window_records_are_the_records_their_constructors_make(name):
    """The per-disk and per-connection windows are made without their dataclass __init__ (window._made): each
    holds every field, in field order, and equals and hashes like the record the constructor makes from
    the same values (and the recorded ones with a connection born inside the window and ones with tcp_info
    counters missing give the same deltas as reading them one by one)."""
    import dataclasses

    snaps = load(name)
    made = 0
    for end in range(2, len(snaps) + 1):
        w = W.build_window(snaps[max(0, end - 12):end], history=snaps[max(0, end - 30):max(0, end - 12)])
        for rec in (*w.disks, *w.conns):
            names = [f.name for f in dataclasses.fields(rec)]
            assert list(vars(rec)) == names
            again = type(rec)(**{n: getattr(rec, n) for n in names})
            assert rec == again and hash(rec) == hash(again) and repr(rec) == repr(again)
            made += 1
    assert made > 100


def test_counter_deltas_equal_reading_them_by_name():
    import random

    from agent.records.tcp import TcpInfo

    rnd = random.Random(4)
    for _ in range(2000):
        a, b = ({n: rnd.choice([None, 0, 7, rnd.randrange(1 << 40)]) for n in W._DELTAS} for _ in range(2))
        i0, i1 = TcpInfo(**a), TcpInfo(**b)
        for born in (False, True):
            for first in (i0, None):
                assert W._deltas(first, i1, born) == W._deltas_by_name(first, i1, born)
    plain = type("Info", (), {"total_retrans": 5, "segs_out": 9})()  # not a TcpInfo: the rest is None
    assert W._deltas(None, plain, True) == [5, 9] + [None] * (len(W._DELTAS) - 2)


def _without_first_vm(s):
    """The snapshot with its first libvirt VM gone (a VM shut down or migrated away)."""
    import dataclasses

    vms = s.data["libvirt"]
    return dataclasses.replace(s, data={**s.data, "libvirt": dataclasses.replace(vms, vms=vms.vms[1:])})


@pytest.mark.parametrize("name", ["flap-portal2", "offline-portal1-4vms"])
def test_disk_series_carried_forward_equal_the_walk(name, monkeypatch):
    """Two windows sliding side by side (12 and 3 snapshots), a VM that leaves for a few snapshots in the
    middle (its disks come and go: those windows are walked) and a list that jumps: every timeline equals
    the one walked snapshot by snapshot."""
    from agent.diagnose import timeline as T

    monkeypatch.setattr(T, "_series_slots", [])
    snaps = load(name)
    assert "libvirt" in snaps[0].data and len(snaps[0].vm_disks) >= 2
    snaps = snaps[:4] + [_without_first_vm(s) for s in snaps[4:7]] + snaps[7:]
    walk = T._disk_series

    def walked(win):
        monkeypatch.setattr(T, "_disk_series", lambda snaps: None)
        try:
            return T.build_timeline(win, win[-1].paths)
        finally:
            monkeypatch.setattr(T, "_disk_series", walk)

    for end in range(2, len(snaps) + 1):
        for size in (12, 3):
            win = snaps[max(0, end - size):end]
            assert T.build_timeline(win, win[-1].paths) == walked(win), (end, size)
    jumped = snaps[::2]
    assert T.build_timeline(jumped, jumped[-1].paths) == walked(jumped)
    # the carried series did slide: a window one snapshot on from the last one cuts and appends one step
    win = snaps[-7:-1]  # after the VM came back
    T.build_timeline(win, win[-1].paths)
    slot = T._series_slots[0]
    first_ops = [list(v) for v in slot.ops]
    nxt = snaps[-6:]
    assert T.build_timeline(nxt, nxt[-1].paths) == walked(nxt)
    assert T._series_slots[0] is slot and [v[:-1] for v in slot.ops] == [v[1:] for v in first_ops]


@pytest.mark.parametrize("name", ["flap-portal2", "offline-portal1-4vms", "loss-tohost-portal2"])
def test_connections_seen_equal_the_walk(name):
    """The observations per connection of windows of 12 and 3 snapshots (made with zip when every snapshot
    holds the same connections in the same order): the walk's dict, in its order, lists and all."""
    import dataclasses

    snaps = load(name)

    def conns(s, keep):  # the snapshot with other storage connections (one gone, one seen twice)
        tcp = s.data["storage_tcp"]
        return dataclasses.replace(s, data={**s.data, "storage_tcp": dataclasses.replace(
            tcp, connections=keep(tcp.connections))})

    snaps = [conns(s, lambda c: c[1:]) if i == 3 else conns(s, lambda c: c + c[:1]) if i == 6 else s
             for i, s in enumerate(snaps)]

    def walked(win):
        seen = {}
        for s in win:
            for c in s.storage_connections:
                seen.setdefault(c.four_tuple, []).append(c)
        return seen

    zipped = 0
    for end in range(1, len(snaps) + 1):
        for size in (12, 3, 1):
            win = snaps[max(0, end - size):end]
            got = W._connections_seen(win)
            assert list(got.items()) == list(walked(win).items())
            orders = {W._four_tuple_order(s) for s in win}
            zipped += len(orders) == 1 and None not in orders
    assert zipped > 0 and W._four_tuple_order(snaps[6]) is None  # (a repeated four-tuple: walked)
