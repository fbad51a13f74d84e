"""Struct member offsets and enum values from the running kernel's BTF.

The probes must never take a kernel struct layout from the kernel headers
bcc compiles against: on this kind of host they are another kernel's
(Debian's 6.1 headers for a 6.18 kernel). The running kernel describes its
own types in ``/sys/kernel/btf/vmlinux`` (BTF, the BPF Type Format); this
module reads just enough of it to answer "at which byte offset is member M
of struct S" and "what is the value of enumerator E", so that a probe can
be compiled with those numbers as ``-D`` constants.

Format (include/uapi/linux/btf.h): a header (magic 0xeB9F, hdr_len,
type_off/type_len, str_off/str_len), then the type section (records of
``name_off, info, size_or_type`` plus a kind-specific tail; type ids count
from 1 in order), then the string section. Only the names asked for are
decoded; every other record is stepped over by its size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

VMLINUX = Path("/sys/kernel/btf/vmlinux")
MAGIC = 0xEB9F

# kinds (BTF_KIND_*)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
# bytes after the 12-byte common record: fixed, and per vlen item
_TAIL = {INT: (4, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12), ENUM: (0, 8), FUNC_PROTO: (0, 8),
         VAR: (4, 0), DATASEC: (0, 12), DECL_TAG: (4, 0), ENUM64: (0, 12)}
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


class BtfError(Exception):
    pass


@dataclass
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0

    @property
    def offset(self) -> int:
        return self.bit_offset // 8


@dataclass
class Btf:
    """The named structs/unions and enums asked for, and every type's (kind, size_or_type) to resolve sizes."""

    structs: dict[str, list[Member]] = field(default_factory=dict)
    enums: dict[str, int] = field(default_factory=dict)  # enumerator -> value (only of the enums asked for)
    typedefs: dict[str, int] = field(default_factory=dict)  # name -> type id (only the typedefs asked for)
    kinds: list[tuple[int, int, int]] = field(default_factory=list)  # type id -> (kind, size_or_type, array elem|nelems)

    def member(self, struct_name: str, member: str) -> Member | None:
        """A member of a struct, looking into anonymous struct/union members."""
        return _find(self, self.structs.get(struct_name, []), member, 0)

    def offset(self, struct_name: str, member: str) -> int | None:
        m = self.member(struct_name, member)
        if m is None or m.bitfield_size or m.bit_offset % 8:
            return None
        return m.offset

    def size(self, type_id: int) -> int | None:
        """Byte size of a type (through typedefs and qualifiers); None when unknown."""
        for _ in range(32):
            if type_id <= 0 or type_id >= len(self.kinds):
                return None
            kind, size_or_type, extra = self.kinds[type_id]
            if kind in _MODIFIERS:
                type_id = size_or_type
                continue
            if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT):
                return size_or_type
            if kind == PTR:
                return 8
            if kind == ARRAY:
                elem, nelems = extra >> 32, extra & 0xFFFFFFFF
                es = self.size(elem)
                return None if es is None else es * nelems
            return None
        return None


def _find(btf: Btf, members: list[Member], name: str, base_bits: int) -> Member | None:
    for m in members:
        if m.name == name:
            return Member(m.name, m.type_id, base_bits + m.bit_offset, m.bitfield_size)
    for m in members:  # anonymous struct/union members: their members belong to the outer struct
        if not m.name:
            inner = btf.structs.get(f"#anon{m.type_id}")
            if inner is not None:
                found = _find(btf, inner, name, base_bits + m.bit_offset)
                if found is not None:
                    return found
    return None


def parse(data: bytes, structs: set[str], enums: set[str] = frozenset(), typedefs: set[str] = frozenset()) -> Btf:
    """Read the structs/unions named in ``structs`` (with their anonymous members), the enumerators of the
    enums named in ``enums`` and the type ids of the typedefs named in ``typedefs`` (e.g.
    ``btf_trace_block_rq_complete``, what a BTF-typed raw tracepoint program attaches to) from raw BTF
    ``data``."""
    if len(data) < 24:
        raise BtfError("too short for a BTF header")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != MAGIC:
        raise BtfError(f"bad magic {magic:#x} (not little-endian BTF)")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    t0, s0 = hdr_len + type_off, hdr_len + str_off
    if t0 + type_len > len(data) or s0 + str_len > len(data):
        raise BtfError("sections run past the end of the data")
    strings = data[s0:s0 + str_len]

    def name(off: int) -> str:
        end = strings.find(b"\0", off)
        return strings[off:end].decode(errors="replace")

    wanted = {n.encode() for n in set(structs) | set(enums)}
    wanted_typedefs = {n.encode() for n in typedefs}
    btf = Btf(kinds=[(0, 0, 0)])
    anon_needed: set[int] = set()
    pending: dict[int, list[Member]] = {}  # anonymous structs/unions, by type id (kept while not known to be needed)
    unpack = struct.unpack_from
    pos, end, tid = t0, t0 + type_len, 1
    while pos < end:
        name_off, info, size_or_type = unpack("<III", data, pos)
        kind = (info >> 24) & 0x1F
        vlen = info & 0xFFFF
        fixed, per = _TAIL.get(kind, (0, 0))
        body = pos + 12
        extra = 0
        if kind == ARRAY:
            elem, _index, nelems = unpack("<III", data, body)
            extra = elem << 32 | nelems
        btf.kinds.append((kind, size_or_type, extra))
        if kind in (STRUCT, UNION) and (name_off == 0 or strings[name_off:name_off + 64].split(b"\0", 1)[0] in wanted):
            kflag = info >> 31
            members = []
            for i in range(vlen):
                m_name, m_type, m_off = unpack("<III", data, body + 12 * i)
                bits, bsize = (m_off & 0xFFFFFF, m_off >> 24) if kflag else (m_off, 0)
                members.append(Member(name(m_name) if m_name else "", m_type, bits, bsize))
            if name_off:
                btf.structs[name(name_off)] = members
            else:
                pending[tid] = members
        elif kind in (ENUM, ENUM64) and name_off and strings[name_off:name_off + 64].split(b"\0", 1)[0] in wanted:
            for i in range(vlen):
                if kind == ENUM:
                    e_name, val = unpack("<Ii", data, body + 8 * i)
                else:
                    e_name, lo, hi = unpack("<IIi", data, body + 12 * i)
                    val = hi << 32 | lo
                btf.enums[name(e_name)] = val
        elif kind == TYPEDEF and wanted_typedefs and strings[name_off:name_off + 80].split(b"\0", 1)[0] in wanted_typedefs:
            btf.typedefs[name(name_off)] = tid
        pos = body + fixed + per * vlen
        tid += 1
    # keep the anonymous members reachable from the named structs asked for
    todo = [m.type_id for ms in btf.structs.values() for m in ms if not m.name]
    while todo:
        t = todo.pop()
        for _ in range(8):  # through typedefs/qualifiers
            if 0 < t < len(btf.kinds) and btf.kinds[t][0] in _MODIFIERS:
                t = btf.kinds[t][1]
        if t in pending and t not in anon_needed:
            anon_needed.add(t)
            btf.structs[f"#anon{t}"] = pending[t]
            todo += [m.type_id for m in pending[t] if not m.name]
    # anonymous members may be reached through a qualifier: point them at the struct itself
    for ms in list(btf.structs.values()):
        for m in ms:
            if not m.name:
                t = m.type_id
                while 0 < t < len(btf.kinds) and btf.kinds[t][0] in _MODIFIERS:
                    t = btf.kinds[t][1]
                m.type_id = t
    return btf


def load(structs: set[str], enums: set[str] = frozenset(), typedefs: set[str] = frozenset(),
         path: Path = VMLINUX) -> Btf:
    return parse(path.read_bytes(), structs, enums, typedefs)
