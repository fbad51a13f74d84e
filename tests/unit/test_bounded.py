"""Per-object state kept across cycles is bounded and expires (issue 16 #8): the running
totals per TCP storage remote, the block probe's device-name cache, the QMP source's
per-socket state. Pure logic; the real-kernel check is tests/ebpf/test_tcp_probes.py."""

from __future__ import annotations

import pytest

from agent.ebpf.block_io import DeviceNames
from agent.ebpf.bounded import AgingTable
from agent.ebpf.tcp_retrans import KINDS, TcpRetransProbe
from agent.hostpaths import HostPaths


def test_aging_table_cap_evicts_least_recently_seen():
    t = AgingTable(cap=3, expire_cycles=10)
    for k in "abc":
        t.setdefault(k, list)
    t.get("a")  # seen again: b is now the least recently seen
    t.setdefault("d", list)
    assert sorted(k for k, _ in t.items()) == ["a", "c", "d"]
    assert t.counts() == {"evicted": 1, "expired": 0}


def test_aging_table_expires_what_was_not_seen():
    t = AgingTable(cap=10, expire_cycles=2)
    t.put("old", 1)
    t.put("kept", 2)
    t.end_cycle()
    t.get("kept")
    t.end_cycle()  # "old" last seen 2 cycles ago: still within 2 cycles
    assert "old" in t
    t.get("kept")
    t.end_cycle()
    assert "old" not in t and "kept" in t and t.counts() == {"evicted": 0, "expired": 1}
    with pytest.raises(ValueError):
        AgingTable(0, 1)


def rows_for(remotes, counts=(1, 0, 0, 0)):
    return [(f"key-{a}".encode(), (a, 3260), counts) for a in remotes]


def test_tcp_retrans_remotes_bounded_under_a_flood():
    """Any local user can make SYN retransmits to many addresses on port 3260: the totals stay capped."""
    p = TcpRetransProbe(max_remotes=64, expire_cycles=5)
    for cycle in range(10):
        out = p.accumulate(rows_for(f"10.{cycle}.{i // 256}.{i % 256}" for i in range(1000)))
        assert len(out) <= 64
    assert p.dropped["evicted"] >= 10 * 1000 - 64
    assert len(p._storage_cum) <= 64


def test_tcp_retrans_remote_expires_and_real_totals_survive():
    p = TcpRetransProbe(max_remotes=8, expire_cycles=3)
    portal = ("198.18.1.2", 3260)
    rows = [(b"portal-conn", portal, (5, 0, 1, 0))]
    out = p.accumulate(rows + rows_for(["10.0.0.1"]))
    assert out[portal] == dict(zip(KINDS, (5, 0, 1, 0)))
    for _ in range(3):  # the portal's connection stays in the kernel map; the flood address is gone
        out = p.accumulate([(b"portal-conn", portal, (7, 0, 1, 0))])
    assert "10.0.0.1" not in {a for a, _ in out} and p.dropped["expired"] == 1
    assert out[portal]["retransmit"] == 7  # monotonic across reads, never reset by the pruning


def test_device_names_cache_bounded(tmp_path):
    sysfs = tmp_path / "sys"
    for minor in range(20):
        d = sysfs / "dev" / "block" / f"8:{minor}"
        d.mkdir(parents=True)
        (d / "uevent").write_text(f"MAJOR=8\nMINOR={minor}\nDEVNAME=sd{minor}\n")
    names = DeviceNames(HostPaths(sysfs=sysfs), cap=5, expire_cycles=2)
    dev = lambda minor: (8 << 20) | minor  # kernel-internal dev_t (MINORBITS 20)
    assert [names.name(dev(m)) for m in range(20)] == [f"sd{m}" for m in range(20)]
    assert len(names._cache) == 5 and names.counts()["evicted"] == 15
    names.end_cycle()
    names.end_cycle()
    names.end_cycle()
    assert len(names._cache) == 0 and names.counts()["expired"] == 5


def proc_rows(entries):
    """((cpu, index), gen, (tgid, dev, op), (slot counts..., sum_ns, bytes)) rows as a read of the kernel's
    per-CPU procs table."""
    from agent.ebpf.block_io import NSLOTS
    rows = []
    for where, gen, key, slots, sum_ns, nbytes in entries:
        vals = [0] * NSLOTS
        for s, c in slots.items():
            vals[s] = c
        rows.append((where, gen, key, tuple(vals) + (sum_ns, nbytes)))
    return rows


def test_block_process_totals_sum_cpus_survive_restarts_and_are_bounded(tmp_path):
    from agent.ebpf.block_io import BlockIoProbe
    from agent.ebpf.loader import LoadOptions
    procfs, sysfs = tmp_path / "proc", tmp_path / "sys"
    (procfs / "4242").mkdir(parents=True)
    (procfs / "4242" / "comm").write_text("qemu-system-x86\n")
    d = sysfs / "dev" / "block" / "253:0"
    d.mkdir(parents=True)
    (d / "uevent").write_text("MAJOR=253\nMINOR=0\nDEVNAME=dm-0\n")
    probe = BlockIoProbe(LoadOptions(paths=HostPaths(procfs=procfs, sysfs=sysfs)), max_processes=2,
                         process_expire_cycles=3)
    dm0 = (253 << 20) | 0
    q = (4242, dm0, 0)
    # one (tgid, dev, op) on two CPUs, at different indexes: summed by key
    read1 = [((0, 5), 1, q, {10: 3}, 3000, 12288), ((1, 6), 1, q, {11: 1}, 1000, 4096)]
    first = probe.accumulate_processes(proc_rows(read1))
    assert len(first) == 1
    p = first[0]
    assert (p.tgid, p.comm, p.device, p.major, p.minor, p.op) == (4242, "qemu-system-x86", "dm-0", 253, 0, "read")
    assert (p.count, p.slots, p.sum_ns, p.bytes) == (4, {10: 3, 11: 1}, 4000, 16384)
    # unchanged: the very same record (shared by the snapshots of the history)
    assert probe.accumulate_processes(proc_rows(read1))[0] is p
    # CPU 1's entry was restarted (pushed out and taken again: another gen) with less than before:
    # its new content is added, CPU 0's growth too; nothing counted twice
    read3 = [((0, 5), 1, q, {10: 4}, 4000, 16384), ((1, 6), 2, q, {12: 2}, 9000, 8192)]
    again = probe.accumulate_processes(proc_rows(read3))[0]
    assert (again.count, again.slots, again.sum_ns, again.bytes) == (7, {10: 4, 11: 1, 12: 2}, 14000, 28672)
    # bounded: a third (tgid, dev, op) pushes out the least recently active; an ended process has no name
    rows = proc_rows(read3 + [((0, 9), 1, (7, dm0, 1), {5: 1}, 20, 512), ((0, 10), 1, (8, dm0, 1), {5: 1}, 20, 512)])
    kept = probe.accumulate_processes(rows)
    assert sorted(p.tgid for p in kept) == [7, 8] and all(p.comm == "" for p in kept)
    assert probe.dropped["evicted"] == 1
    # idle for expire_cycles reads: forgotten
    for _ in range(3):
        kept = probe.accumulate_processes(rows)
    assert kept == () and probe.dropped["expired"] == 2


def test_reuse_gives_back_the_same_record_for_an_unchanged_entry():
    from agent.ebpf.bounded import Reuse

    r, made = Reuse(), []

    def make(tag):
        return lambda: made.append(tag) or [tag]

    a = r.get(b"k1v1", make("a"))
    b = r.get(b"k2v1", make("b"))
    r.end_cycle()
    assert r.get(b"k1v1", make("a2")) is a  # unchanged: the same object, not rebuilt
    c = r.get(b"k2v2", make("c"))  # changed: rebuilt
    assert c is not b and c == ["c"]
    r.end_cycle()
    assert made == ["a", "b", "c"] and len(r) == 2  # only the last read's entries are kept
    r.end_cycle()
    assert len(r) == 0


def test_bound_malloc_applies_on_glibc():
    """kvmscope run bounds glibc's arenas and fixes its mmap threshold (in a fresh process: no effect on this one)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "from agent.cli.run import bound_malloc; print(bound_malloc())"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True", r.stderr


def test_storage_totals_of_an_idle_remote_are_shared_between_reads():
    """The per-remote totals each read returns (one copy per snapshot of the history) share the last read's
    copy of a remote whose counts did not move, and the whole mapping when nothing moved; a copy once returned
    never changes."""
    from agent.ebpf.tcp_lifecycle import TcpLifecycleProbe

    p = TcpRetransProbe()
    portal, idle = ("198.18.1.2", 3260), ("198.18.2.2", 3260)
    first = p.accumulate([(b"c1", portal, (1, 0, 0, 0)), (b"c2", idle, (2, 0, 0, 0))])
    second = p.accumulate([(b"c1", portal, (4, 0, 0, 0)), (b"c2", idle, (2, 0, 0, 0))])
    assert second[idle] is first[idle]
    assert second[portal] is not first[portal] and second[portal]["retransmit"] == 4
    assert first[portal]["retransmit"] == 1  # the earlier snapshot's copy is untouched
    third = p.accumulate([(b"c1", portal, (4, 0, 0, 0)), (b"c2", idle, (2, 0, 0, 0))])
    assert third is second and list(third) == list(second)

    lc = TcpLifecycleProbe()
    a = lc.accumulate([(b"k1", portal, "connect", 1), (b"k2", idle, "connect", 3)])
    b = lc.accumulate([(b"k1", portal, "connect", 2), (b"k2", idle, "connect", 3)])
    assert b[idle] is a[idle] and b[portal] is not a[portal]
    assert (a[portal]["connect"], b[portal]["connect"]) == (1, 2)
    assert lc.accumulate([(b"k1", portal, "connect", 2), (b"k2", idle, "connect", 3)]) is b


def test_shared_copy_keeps_order_and_new_keys():
    from agent.ebpf.bounded import shared_copy

    prev = shared_copy([("a", {"x": 1}), ("b", {"x": 2})], {})
    assert shared_copy([("a", {"x": 1}), ("b", {"x": 2})], prev) is prev
    reordered = shared_copy([("b", {"x": 2}), ("a", {"x": 1})], prev)  # same counts, other order: a new mapping
    assert reordered is not prev and list(reordered) == ["b", "a"] and reordered["a"] is prev["a"]
    grown = shared_copy([("a", {"x": 1}), ("b", {"x": 2}), ("c", {"x": 0})], prev)
    assert grown is not prev and grown["c"] == {"x": 0}
    assert shared_copy([("a", {"x": 1})], prev) == {"a": {"x": 1}}  # a remote forgotten


def test_unchanged_gives_back_last_cycles_equal_record():
    from agent.source_api import Unchanged

    u = Unchanged()
    a, b = u.same("sda", ("sda", 1)), u.same("sdb", ("sdb", 1))
    assert u.end_cycle() is False  # nothing to compare with yet
    assert u.same("sda", ("sda", 1)) is a and u.same("sdb", ("sdb", 1)) is b
    assert u.end_cycle() is True
    assert u.same("sda", ("sda", 1)) is a
    c = u.same("sdb", ("sdb", 2))
    assert c == ("sdb", 2) and c is not b
    assert u.end_cycle() is False
    assert u.same("sda", ("sda", 1)) is a
    assert u.end_cycle() is False  # sdb gone


def test_probe_text_is_decoded_once_per_value():
    from agent.ebpf import decode

    raw = bytes([198, 18, 1, 2]) + bytes(12)
    a = decode.addr_text(decode.AF_INET, raw)
    assert a == "198.18.1.2" and decode.addr_text(decode.AF_INET, bytearray(raw[:4]) + bytes(12)) is a
    v6 = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert decode.addr_text(decode.AF_INET6, v6) == "10.0.0.1"  # IPv4-mapped
    assert decode.addr_text(decode.AF_INET6, bytes(15) + b"\x01") == "::1"
    assert decode.addr_text(7, raw) == "family7"
    name = decode.comm_text(b"qemu-system-x86\0")
    assert name == "qemu-system-x86" and decode.comm_text(b"qemu-system-x86") is name
    assert decode.comm_text(b"\xffbad\0junk") == "\ufffdbad"


def test_tuples_is_the_last_reads_tuple_when_it_holds_the_same_records():
    from agent.ebpf.bounded import Tuples

    a, b = object(), object()
    t = Tuples()
    first = t.same("live", [a, b])
    assert t.same("live", [a, b]) is first and first == (a, b)
    other = t.same("other", [a, b])
    assert other is not first and other == first  # each kind is compared with its own last tuple
    assert t.same("live", [b, a]) == (b, a)  # another order: a new tuple
    equal_not_same = [object(), object()]
    assert t.same("live", equal_not_same) == tuple(equal_not_same)


def test_shared_int_keeps_one_object_per_value():
    from agent.ebpf import decode

    x = decode.shared_int(int("3260"))
    assert decode.shared_int(int("3260")) is x and x == 3260
    assert decode.shared_int(40000 + int("1")) == 40001


def test_block_slot_counts_that_did_not_move_are_the_last_records(tmp_path):
    """A busy (tgid, dev, op): its new record's unchanged slots hold the previous record's count objects."""
    from agent.ebpf.block_io import NSLOTS, BlockIoProbe
    from agent.ebpf.loader import LoadOptions

    probe = BlockIoProbe(LoadOptions(paths=HostPaths(procfs=tmp_path, sysfs=tmp_path)))
    vals = [0] * NSLOTS + [0, 0]
    vals[10], vals[12] = 100000 + int("7"), 5000
    first = probe.accumulate_processes([((0, 0), 1, (42, 8 << 20, 0), tuple(vals))])[0]
    vals[12] += 3
    second = probe.accumulate_processes([((0, 0), 1, (42, 8 << 20, 0), tuple(vals))])[0]
    assert second is not first and second.slots == {10: 100007, 12: 5003} and first.slots[12] == 5000
    assert second.slots[10] is first.slots[10]
