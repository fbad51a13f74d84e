"""agent/ebpf/btf.py and the block probe's request layout, on BTF blobs built here (the format of
include/uapi/linux/btf.h), and on the running kernel's own BTF when it has one."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.ebpf import btf
from agent.ebpf.block_io import RQ_FIELDS, RQ_OPS, RQ_TRACEPOINTS, BlockIoProbe, request_layout
from agent.ebpf.loader import LoadOptions
from agent.hostpaths import HostPaths


class Blob:
    """A BTF blob: types appended in id order (from 1), strings deduplicated."""

    def __init__(self):
        self.types = b""
        self.strings = b"\0"
        self.next_id = 1

    def s(self, name: str) -> int:
        if not name:
            return 0
        enc = name.encode() + b"\0"
        at = self.strings.find(b"\0" + enc)
        if at >= 0:
            return at + 1
        off = len(self.strings)
        self.strings += enc
        return off

    def add(self, name: str, kind: int, vlen: int, size_or_type: int, tail: bytes = b"", kflag: int = 0) -> int:
        self.types += struct.pack("<III", self.s(name), kflag << 31 | kind << 24 | vlen, size_or_type) + tail
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int) -> int:
        return self.add(name, btf.INT, 0, size, struct.pack("<I", size * 8))

    def struct_(self, name: str, size: int, members, kind=btf.STRUCT, kflag=0) -> int:
        tail = b"".join(struct.pack("<III", self.s(n), t, off) for n, t, off in members)
        return self.add(name, kind, len(members), size, tail, kflag)

    def enum(self, name: str, values: dict[str, int]) -> int:
        tail = b"".join(struct.pack("<Ii", self.s(n), v) for n, v in values.items())
        return self.add(name, btf.ENUM, len(values), 4, tail)

    def bytes(self) -> bytes:
        hdr = struct.pack("<HBBIIIII", btf.MAGIC, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return hdr + self.types + self.strings


def kernel_like(drop: str | None = None) -> bytes:
    """The types request mode reads, laid out like a 6.18 kernel (offsets in bits), and some others around."""
    b = Blob()
    u32, u64 = b.int_("unsigned int", 4), b.int_("long long unsigned int", 8)
    opf = b.add("blk_opf_t", btf.TYPEDEF, 0, u32)
    u64t = b.add("u64", btf.TYPEDEF, 0, u64)
    cu64 = b.add("", btf.CONST, 0, u64t)
    b.int_("char", 1)
    ptr = b.add("", btf.PTR, 0, u64)  # (struct gendisk *: every pointer is 8 bytes)
    q = b.struct_("request_queue", 512, [("queuedata", u64, 0), ("disk", ptr, 104 * 8)] if drop != "disk" else
                  [("queuedata", u64, 0)])
    ptr_q = b.add("", btf.PTR, 0, q)
    # an anonymous union inside struct request, as queuelist/rq_next
    anon = b.struct_("", 16, [("queuelist", u64, 0), ("rq_next", u64, 0)], kind=btf.UNION)
    members = [("q", ptr_q, 0), ("cmd_flags", opf, 24 * 8), ("rq_flags", u32, 28 * 8), ("__data_len", u32, 44 * 8),
               ("", anon, 72 * 8), ("start_time_ns", cu64, 104 * 8), ("io_start_time_ns", u64, 112 * 8)]
    b.struct_("request", 304, [m for m in members if m[0] != drop])
    # bitfields (kind_flag): a member at a bit offset is not a byte offset
    b.struct_("gendisk", 256, [("major", u32, 0), ("first_minor", u32, 4 * 8), ("flags", u32, (3 << 24) | 8 * 8)],
              kflag=1)
    b.enum("req_op", {f"REQ_OP_{op}": v for op, v in zip(RQ_OPS, (0, 1, 2, 3, 5)) if op != drop})
    for tp in RQ_TRACEPOINTS:
        b.add(f"btf_trace_{tp}", btf.TYPEDEF, 0, u64)
    b.add("btf_trace_other", btf.TYPEDEF, 0, u64)
    return b.bytes()


def test_parse_members_enums_typedefs():
    data = kernel_like()
    b = btf.parse(data, {"request", "gendisk"}, {"req_op"}, {"btf_trace_block_rq_complete"})
    assert b.offset("request", "start_time_ns") == 104 and b.size(b.member("request", "start_time_ns").type_id) == 8
    assert b.offset("request", "cmd_flags") == 24 and b.size(b.member("request", "cmd_flags").type_id) == 4
    assert b.offset("request", "rq_next") == 72  # through the anonymous union
    assert b.offset("gendisk", "first_minor") == 4
    assert b.member("gendisk", "flags").bitfield_size == 3 and b.offset("gendisk", "flags") is None
    assert b.offset("request", "nope") is None and b.offset("nostruct", "q") is None
    assert b.enums["REQ_OP_SECURE_ERASE"] == 5
    assert set(b.typedefs) == {"btf_trace_block_rq_complete"} and b.typedefs["btf_trace_block_rq_complete"] > 0
    with pytest.raises(btf.BtfError):
        btf.parse(b"\x00" * 32, {"request"})


def test_request_layout_from_btf():
    defs, ids, why = request_layout(kernel_like())
    assert why == ""
    assert defs["RQ_OFF_START"] == 104 and defs["RQ_OFF_IO_START"] == 112 and defs["RQ_OFF_Q"] == 0
    assert defs["Q_OFF_DISK"] == 104 and defs["DISK_OFF_FIRST_MINOR"] == 4
    assert defs["REQ_OP_SECURE_ERASE_V"] == 5 and defs["RQ_HEAD_LEN"] == 120
    assert all(ids[tp] > 0 for tp in RQ_TRACEPOINTS)


@pytest.mark.parametrize("drop,why", [("io_start_time_ns", "struct request has no member io_start_time_ns"),
                                      ("disk", "struct request_queue has no member disk"),
                                      ("DISCARD", "enum req_op has no REQ_OP_DISCARD")])
def test_request_layout_missing_means_classic(drop, why, tmp_path):
    defs, ids, reason = request_layout(kernel_like(drop))
    assert (defs, ids) == ({}, {}) and reason.startswith(why)
    # the probe then runs in classic mode, saying why (no kernel needed to decide)
    (tmp_path / "kernel" / "btf").mkdir(parents=True)
    (tmp_path / "kernel" / "btf" / "vmlinux").write_bytes(kernel_like(drop))
    p = BlockIoProbe(LoadOptions(paths=HostPaths(sysfs=tmp_path)))
    present = {"block:block_io_start", "block:block_rq_issue", "block:block_rq_complete"}
    assert p._why_not("btf", present).startswith(why) and p._why_not("classic", present) == ""
    assert "-DRQ_OFF_START=104" not in p.extra_cflags(present)


def test_request_mode_needs_block_io_start_and_flags_carry_the_offsets(tmp_path):
    (tmp_path / "kernel" / "btf").mkdir(parents=True)
    (tmp_path / "kernel" / "btf" / "vmlinux").write_bytes(kernel_like())
    p = BlockIoProbe(LoadOptions(paths=HostPaths(sysfs=tmp_path)))
    assert "block_io_start" in p._why_not("btf", {"block:block_rq_complete"})
    p.mode = "btf"
    flags = p.extra_cflags(set())
    assert "-DRQ_OFF_START=104" in flags and "-DRQ_BTF" in flags and "-DREQ_OP_WRITE_V=1" in flags
    assert [(a.kind, a.target, a.btf_id > 0) for a in p.attachments(set())] == [
        ("tp_btf", "block_io_start", True), ("tp_btf", "block_rq_complete", True)]
    p.mode = "raw"
    assert "-DRQ_BTF" not in p.extra_cflags(set()) and p.attachments(set()) == []
    # no BTF file at all: classic, with the reason
    p2 = BlockIoProbe(LoadOptions(paths=HostPaths(sysfs=tmp_path / "none")))
    assert p2._why_not("raw", {"block:block_io_start"}).startswith("cannot read")


def test_request_layout_kept_in_the_object_cache_per_btf(tmp_path, monkeypatch):
    """Read from the BTF once per kernel: the next probe takes it from the cache, another BTF is read again."""
    import agent.ebpf.block_io as block_io

    vmlinux = tmp_path / "kernel" / "btf" / "vmlinux"
    vmlinux.parent.mkdir(parents=True)
    vmlinux.write_bytes(kernel_like())
    opts = lambda: LoadOptions(paths=HostPaths(sysfs=tmp_path), cache_dir=tmp_path / "bpf")  # noqa: E731
    first = BlockIoProbe(opts()).layout()
    assert first[0]["RQ_OFF_START"] == 104 and len(list((tmp_path / "bpf").glob("*.json"))) == 1
    parsed = []
    monkeypatch.setattr(block_io, "request_layout", lambda data: parsed.append(data) or request_layout(data))
    assert BlockIoProbe(opts()).layout() == first and parsed == []
    vmlinux.write_bytes(kernel_like("disk"))  # another kernel
    assert BlockIoProbe(opts()).layout()[2].startswith("struct request_queue has no member disk")
    assert len(parsed) == 1


@pytest.mark.skipif(not Path("/sys/kernel/btf/vmlinux").is_file(), reason="this kernel has no BTF")
def test_running_kernel_has_what_request_mode_reads():
    defs, ids, why = request_layout(Path("/sys/kernel/btf/vmlinux").read_bytes())
    assert why == "" and set(RQ_FIELDS) <= set(defs)
    # struct request begins with its queue pointer; the two start times are adjacent u64s
    assert defs["RQ_OFF_Q"] == 0 and defs["RQ_OFF_IO_START"] == defs["RQ_OFF_START"] + 8
    assert (defs["REQ_OP_READ_V"], defs["REQ_OP_WRITE_V"]) == (0, 1)
