"""bpfsys.Table on real kernel maps (no bcc, no program): batched reads against one key at a time."""

from __future__ import annotations

import ctypes
import os

import pytest

from agent.ebpf import bpfsys

pytestmark = pytest.mark.ebpf


class Key(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint16), ("pad", ctypes.c_uint16)]


class Leaf(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint64), ("m", ctypes.c_uint32)]


@pytest.fixture
def table():
    if os.geteuid() != 0:
        pytest.skip("creating BPF maps needs root")
    made = []

    def make(map_type: int, entries: int, fill: int) -> bpfsys.Table:
        ncpus = bpfsys.possible_cpus()
        array = map_type in bpfsys.ARRAY_TYPES  # keyed by a u32 index
        key_type = ctypes.c_uint32 if array else Key
        fd = bpfsys.map_create(map_type, ctypes.sizeof(key_type), ctypes.sizeof(Leaf), entries, name="ks_test")
        made.append(fd)
        info = bpfsys.obj_info(fd, bpfsys.MapInfo())
        t = bpfsys.Table("ks_test", fd, info, key_type, Leaf, ncpus)
        for i in range(fill):
            k = ctypes.c_uint32(i) if array else Key(i, i % 7)
            if t.percpu:
                t[k] = (Leaf * t.ncpus)(*[Leaf(i * 1000 + c, c) for c in range(t.ncpus)])
            else:
                t[k] = Leaf(i * 3, i)
        return t

    yield make
    for fd in made:
        os.close(fd)


def _plain(t: bpfsys.Table, items):
    def leaf(v):
        return [(x.n, x.m) for x in v] if t.percpu else (v.n, v.m)

    return sorted(((k.a, k.b), leaf(v)) for k, v in items)


def _one_key_at_a_time(t: bpfsys.Table):
    return [(k, t._decode()) for k in t.keys() if t._lookup_raw(k)]


@pytest.mark.parametrize("map_type", [bpfsys.HASH, bpfsys.PERCPU_HASH, bpfsys.LRU_HASH])
@pytest.mark.parametrize("fill", [0, 1, 255, 256, 1000])
def test_batched_items_equal_a_walk_key_by_key(table, map_type, fill, monkeypatch):
    t = table(map_type, 1024, fill)
    calls = []
    real = bpfsys.bpf
    monkeypatch.setattr(bpfsys, "bpf", lambda cmd, attr: calls.append(cmd) or real(cmd, attr))
    got = t.items()
    assert t._batch_ok  # this kernel has batch lookups of hash maps (5.6+)
    assert set(calls) == {bpfsys.MAP_LOOKUP_BATCH}
    assert len(calls) <= fill // t.BATCH + 2  # not one call per entry
    want = _plain(t, _one_key_at_a_time(t))
    assert len(want) == fill
    assert _plain(t, got) == want
    if map_type == bpfsys.PERCPU_HASH and fill > 3:
        assert dict(_plain(t, got))[(3, 3)][1] == (3001, 1)  # every CPU's slot, in CPU order


def test_batched_items_grow_the_batch_when_a_bucket_does_not_fit(table, monkeypatch):
    t = table(bpfsys.HASH, 64, 64)
    monkeypatch.setattr(bpfsys.Table, "BATCH", 1)  # a bucket of two or more entries needs more room than 1
    assert _plain(t, t.items()) == _plain(t, _one_key_at_a_time(t))


def test_items_fall_back_to_one_key_at_a_time_without_batch_lookups(table, monkeypatch):
    t = table(bpfsys.HASH, 64, 10)
    real = bpfsys.bpf

    def no_batch(cmd, attr):
        if cmd == bpfsys.MAP_LOOKUP_BATCH:
            raise OSError(22, "Invalid argument")
        return real(cmd, attr)

    monkeypatch.setattr(bpfsys, "bpf", no_batch)
    assert len(t.items()) == 10
    assert t._batch_ok is False


@pytest.mark.parametrize("map_type", [bpfsys.ARRAY, bpfsys.PERCPU_ARRAY])
@pytest.mark.parametrize("entries,chunk", [(1, 64), (100, 64), (128, 64), (130, 7), (1024, 64)])
def test_array_read_in_chunks_equals_one_lookup_per_index(table, map_type, entries, chunk):
    t = table(map_type, entries, entries)  # every index written
    got = b"".join(raw for _n, raw in t.batch_chunks(chunk))
    want = b""
    for i in range(entries):
        assert t._lookup_raw(ctypes.c_uint32(i))
        want += t._vbuf.raw
    assert got == want and len(got) == entries * t.stride * t.ncpus
    counts = [n for n, _raw in t.batch_chunks(chunk)]
    assert sum(counts) == entries and max(counts) <= chunk


def test_array_read_in_chunks_falls_back_without_batch_lookups(table, monkeypatch):
    t = table(bpfsys.PERCPU_ARRAY, 10, 10)
    want = b"".join(raw for _n, raw in t.batch_chunks())
    real = bpfsys.bpf

    def no_batch(cmd, attr):
        if cmd == bpfsys.MAP_LOOKUP_BATCH:
            raise OSError(22, "Invalid argument")
        return real(cmd, attr)

    monkeypatch.setattr(bpfsys, "bpf", no_batch)
    assert b"".join(raw for _n, raw in t.batch_chunks()) == want
