"""BPF maps and programs held by file descriptor, read with plain bpf(2) calls (ctypes; no bcc, no LLVM).

The probes are compiled, loaded and attached by a short-lived child process
(:mod:`agent.ebpf.compiler`, which uses bcc) that hands the program, map and
attachment file descriptors over. The agent keeps them in a :class:`BpfObject`
and reads the maps here:

* hash and array maps (plain, per-CPU, LRU): ``items()``, ``keys()``,
  ``getvalue(key)``, ``Key``/``Leaf`` types (the subset of bcc's ``Table`` the
  probes use); per-CPU values come back as one value per possible CPU;
* ring buffers: mapped with mmap(2) and drained by polling
  (:meth:`RingBuf.consume`), records handed to a callback as bcc does
  (``callback(ctx, data_pointer, size)``);
* key and value types: the probe's own ctypes mirrors
  (:meth:`BpfObject.get_table`), or else built from bcc's JSON type
  description, which the child sends along (:func:`ctype_from_desc`).

Closing the object closes every attachment fd (the programs detach), then
the programs and the maps: nothing stays in the kernel after the agent
stops or dies.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

_SYS_bpf = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

# bpf(2) commands and map types (include/uapi/linux/bpf.h)
MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY, PROG_LOAD = 0, 1, 2, 3, 4, 5
OBJ_GET_INFO_BY_FD, RAW_TRACEPOINT_OPEN, MAP_LOOKUP_BATCH = 15, 17, 24
PROG_TYPE_TRACING, TRACE_RAW_TP = 26, 23  # a BTF-typed raw tracepoint ("tp_btf")
HASH, ARRAY, PERF_EVENT_ARRAY, PERCPU_HASH, PERCPU_ARRAY = 1, 2, 4, 5, 6
LRU_HASH, LRU_PERCPU_HASH, RINGBUF = 9, 10, 27
PERCPU_TYPES = {PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH}
ARRAY_TYPES = {ARRAY, PERCPU_ARRAY}


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _BatchAttr(ctypes.Structure):
    _fields_ = [("in_batch", ctypes.c_uint64), ("out_batch", ctypes.c_uint64), ("keys", ctypes.c_uint64),
                ("values", ctypes.c_uint64), ("count", ctypes.c_uint32), ("map_fd", ctypes.c_uint32),
                ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ProgLoadAttr(ctypes.Structure):
    """The head of union bpf_attr for BPF_PROG_LOAD, up to attach_btf_id / attach_prog_fd."""

    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32), ("prog_btf_fd", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("func_info", ctypes.c_uint64),
                ("func_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("line_info", ctypes.c_uint64), ("line_info_cnt", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _RawTpAttr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _MapCreateAttr(ctypes.Structure):
    """The head of union bpf_attr for BPF_MAP_CREATE, up to map_name (no BTF)."""

    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * 16)]


def _obj_name(name: str) -> bytes:
    """A name the kernel takes for a map or program (BPF_OBJ_NAME_LEN 16: 15 characters of [A-Za-z0-9_.])."""
    return bytes(c if chr(c).isalnum() or c in b"_." else ord("_") for c in name.encode()[:15])


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = "") -> int:
    """A new map (BPF_MAP_CREATE, without BTF); returns its fd."""
    attr = _MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries,
                          map_flags=flags, map_name=_obj_name(name))
    try:
        return bpf(MAP_CREATE, attr)
    except OSError as e:
        raise OSError(e.errno, f"creating map {name} (type {map_type}): {e.strerror}") from None


def load_program(insns: bytes, name: str, prog_type: int, expected_attach_type: int = 0, attach_btf_id: int = 0,
                 license: bytes = b"GPL", kern_version: int = 0) -> int:
    """BPF_PROG_LOAD of already relocated instructions; returns the program fd. OSError carries the
    verifier's log when the kernel refuses the program."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license)
    attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                         license=ctypes.addressof(lic), log_level=0, log_size=0, log_buf=0, kern_version=kern_version,
                         prog_name=_obj_name(name), expected_attach_type=expected_attach_type,
                         attach_btf_id=attach_btf_id)
    try:
        return bpf(PROG_LOAD, attr)
    except OSError:
        log = ctypes.create_string_buffer(1 << 18)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(log), ctypes.addressof(log)
        try:
            return bpf(PROG_LOAD, attr)  # again, for the verifier's reason
        except OSError as e:
            tail = log.value.decode(errors="replace").strip().splitlines()[-12:]
            raise OSError(e.errno, f"loading {name}: {e.strerror}: {' | '.join(tail)}") from None


def raw_tracepoint_open(prog_fd: int, name: str | None) -> int:
    """Attach a raw tracepoint program to tracepoint ``name``, or a BTF-typed one (``name`` None: the
    tracepoint it was loaded for); returns the fd that keeps it attached."""
    buf = ctypes.create_string_buffer(name.encode()) if name else None
    try:
        return bpf(RAW_TRACEPOINT_OPEN, _RawTpAttr(ctypes.addressof(buf) if buf is not None else 0, prog_fd, 0))
    except OSError as e:
        raise OSError(e.errno, f"raw tracepoint {name or '(BTF)'}: {e.strerror}") from None


def load_tp_btf(insns: bytes, name: str, btf_id: int, license: bytes = b"GPL") -> tuple[int, int]:
    """Load ``insns`` (an already relocated program, e.g. bcc's ``dump_func``) as a BTF-typed raw
    tracepoint program on the tracepoint whose ``btf_trace_<name>`` typedef has id ``btf_id`` in the
    kernel's BTF, and attach it; returns (program fd, link fd: closing it detaches). OSError carries
    the verifier's log when the kernel refuses the program."""
    prog_fd = load_program(insns, name, PROG_TYPE_TRACING, TRACE_RAW_TP, btf_id, license)
    try:
        link_fd = raw_tracepoint_open(prog_fd, None)
    except BaseException:
        os.close(prog_fd)
        raise
    return prog_fd, link_fd


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * 16)]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (type, id, tag)."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """One bpf(2) call; raises OSError with the kernel's errno."""
    r = _libc.syscall(_SYS_bpf, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def obj_info(fd: int, info: ctypes.Structure) -> ctypes.Structure:
    attr = _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info))
    bpf(OBJ_GET_INFO_BY_FD, attr)
    return info


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """Number of possible CPUs (per-CPU map values have one slot each), from a range list like ``0-3,5``."""
    with open(path) as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


# -- types from bcc's JSON description ------------------------------------------------

_SCALARS: dict[str, Any] = {
    "_Bool": ctypes.c_bool, "char": ctypes.c_char, "signed char": ctypes.c_byte, "unsigned char": ctypes.c_ubyte,
    "short": ctypes.c_short, "unsigned short": ctypes.c_ushort, "int": ctypes.c_int, "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long, "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong, "float": ctypes.c_float, "double": ctypes.c_double,
    "long double": ctypes.c_longdouble, "__int128": ctypes.c_int64 * 2, "unsigned __int128": ctypes.c_uint64 * 2,
    "void *": ctypes.c_void_p,
}


def ctype_from_desc(desc: Any) -> Any:
    """A ctypes type from bcc's description of a map's key or value type: a C scalar name, or
    ``[name, [[field, type], [field, type, [n]] (array), [field, type, bits] (bit field), ...], kind]``
    with kind ``struct``, ``struct_packed`` or ``union``."""
    if isinstance(desc, str):
        if desc not in _SCALARS:
            raise ValueError(f"unknown C type {desc!r} in a map description")
        return _SCALARS[desc]
    name, members = desc[0], desc[1]
    kind = desc[2] if len(desc) > 2 else "struct"
    fields: list[tuple] = []
    anonymous: list[str] = []
    for m in members:
        if len(m) == 2:
            fields.append((m[0], ctype_from_desc(m[1])))
        elif isinstance(m[2], list):
            fields.append((m[0], ctype_from_desc(m[1]) * m[2][0]))
        elif isinstance(m[2], int):
            fields.append((m[0], ctype_from_desc(m[1]), m[2]))
        elif m[2] in ("struct", "struct_packed", "union"):  # a nested type, possibly anonymous
            fname = m[0] or f"__anon{len(anonymous)}"
            if not m[0]:
                anonymous.append(fname)
            fields.append((fname, ctype_from_desc(m)))
        else:
            raise ValueError(f"cannot read member {m!r} of {name}")
    body: dict[str, Any] = {"_fields_": fields, "_anonymous_": anonymous}
    if kind == "struct_packed":
        body["_pack_"] = 1
    return type(str(name) or "anon", (ctypes.Union if kind == "union" else ctypes.Structure,), body)


# -- maps ---------------------------------------------------------------------------------


class Table:
    """A hash or array map read by fd, with the subset of bcc's Table API the probes use."""

    def __init__(self, name: str, fd: int, info: MapInfo, key_type: Any, leaf_type: Any, ncpus: int):
        self.name, self.fd, self.info = name, fd, info
        self.map_type = int(info.type)
        self.Key, self.Leaf = key_type, leaf_type
        self.percpu = self.map_type in PERCPU_TYPES
        self.ncpus = ncpus if self.percpu else 1
        if ctypes.sizeof(key_type) != info.key_size or ctypes.sizeof(leaf_type) != info.value_size:
            raise ValueError(f"map {name}: key/value types of {ctypes.sizeof(key_type)}/{ctypes.sizeof(leaf_type)} "
                             f"bytes, the kernel's map has {info.key_size}/{info.value_size}")
        self._stride = (info.value_size + 7) & ~7 if self.percpu else info.value_size
        self._vbuf = ctypes.create_string_buffer(self._stride * self.ncpus)
        self._chunk_bufs: tuple | None = None  # batch_chunks' key and value buffers

    def _lookup_raw(self, key) -> bool:
        attr = _ElemAttr(self.fd, 0, ctypes.addressof(key), ctypes.addressof(self._vbuf), 0)
        try:
            bpf(MAP_LOOKUP_ELEM, attr)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def _decode(self) -> Any:
        raw = self._vbuf.raw
        if not self.percpu:
            return self._leaf(raw, 0)
        return [self._leaf(raw, i * self._stride) for i in range(self.ncpus)]

    def _leaf(self, raw: bytes, off: int) -> Any:
        v = self.Leaf.from_buffer_copy(raw, off)
        return v.value if isinstance(v, ctypes._SimpleCData) else v

    def _key(self, key) -> Any:
        return key if isinstance(key, self.Key) else self.Key(key)

    def getvalue(self, key) -> Any:
        """The value (a list, one per possible CPU, for a per-CPU map); KeyError when absent."""
        k = self._key(key)
        if not self._lookup_raw(k):
            raise KeyError(key)
        return self._decode()

    __getitem__ = getvalue

    def __setitem__(self, key, value) -> None:
        k = self._key(key)
        attr = _ElemAttr(self.fd, 0, ctypes.addressof(k), ctypes.addressof(value), 0)
        bpf(MAP_UPDATE_ELEM, attr)

    def __delitem__(self, key) -> None:
        k = self._key(key)
        bpf(MAP_DELETE_ELEM, _ElemAttr(self.fd, 0, ctypes.addressof(k), 0, 0))

    def keys(self) -> Iterator:
        if self.map_type in ARRAY_TYPES:
            yield from (self.Key(i) for i in range(self.info.max_entries))
            return
        cur = None
        while True:
            nxt = self.Key()
            attr = _ElemAttr(self.fd, 0, 0 if cur is None else ctypes.addressof(cur), ctypes.addressof(nxt), 0)
            try:
                bpf(MAP_GET_NEXT_KEY, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                raise
            yield nxt
            cur = nxt

    def batch_chunks(self, chunk: int = 64) -> Iterator[tuple[int, bytes]]:
        """Every value of an array map, ``chunk`` entries per BPF_MAP_LOOKUP_BATCH call, in index order: yields
        (entries, raw values) per call (a per-CPU array's entry is ``ncpus`` values of ``stride`` bytes each, in
        CPU order). The call's buffers are small and kept: a whole per-CPU array at once is ~0.5-0.7 MB here,
        either resident for good when kept or zeroed and faulted in again every cycle when not. Falls back to
        one lookup per index on kernels without batch operations."""
        n = int(self.info.max_entries)
        if self.map_type not in ARRAY_TYPES:
            raise ValueError(f"map {self.name}: batch_chunks reads array maps")
        size = self._stride * self.ncpus
        chunk = max(1, min(chunk, n))
        if self._chunk_bufs is None or len(self._chunk_bufs[0]) != chunk:
            self._chunk_bufs = ((ctypes.c_uint32 * chunk)(), ctypes.create_string_buffer(size * chunk))
        keys, vals = self._chunk_bufs
        tok_in, tok_out = ctypes.c_uint32(0), ctypes.c_uint32(0)
        first, total = True, 0
        while total < n:
            attr = _BatchAttr(0 if first else ctypes.addressof(tok_in), ctypes.addressof(tok_out),
                              ctypes.addressof(keys), ctypes.addressof(vals), chunk, self.fd, 0, 0)
            done = False
            try:
                bpf(MAP_LOOKUP_BATCH, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:  # the rest of the map came back in this call
                    done = True
                elif e.errno in (errno.EINVAL, 524) and first:  # 524: ENOTSUPP, no batch operations on this kernel
                    for i in range(n):
                        self._lookup_raw(ctypes.c_uint32(i))
                        yield 1, self._vbuf.raw
                    return
                else:
                    raise
            got = int(attr.count)
            if got:
                yield got, ctypes.string_at(vals, got * size)
            total += got
            if done or not got:
                return
            tok_in.value, first = tok_out.value, False

    @property
    def stride(self) -> int:
        return self._stride

    def items(self) -> list[tuple[Any, Any]]:
        """Every (key, value) of the map. A hash map is read in batches (BPF_MAP_LOOKUP_BATCH: one bpf(2) call
        per ``BATCH`` entries instead of two per entry); an array map, or a kernel without batch lookups of
        hash maps, one key at a time."""
        if self.map_type not in ARRAY_TYPES and self._batch_ok:
            got = self._items_batched()
            if got is not None:
                return got
        out = []
        for k in self.keys():
            if self._lookup_raw(k):  # a hash entry may go between next_key and lookup
                out.append((k, self._decode()))
        return out

    BATCH = 256  # entries per BPF_MAP_LOOKUP_BATCH call (doubled when one hash bucket holds more)
    _batch_ok = True  # False once the kernel refused a batch lookup of this map

    def _items_batched(self) -> list[tuple[Any, Any]] | None:
        """items() of a hash map in batches; None when the kernel has no batch lookup for it. The kernel walks
        the map bucket by bucket and hands back a whole bucket or none of it: a batch never splits one, so an
        entry is read once, as in one get_next_key walk (entries added or removed meanwhile may or may not be
        seen, as there)."""
        ks, vs = int(self.info.key_size), self._stride * self.ncpus
        n = min(self.BATCH, max(1, int(self.info.max_entries)))
        tok_in, tok_out = ctypes.create_string_buffer(max(8, ks)), ctypes.create_string_buffer(max(8, ks))
        kbuf, vbuf = ctypes.create_string_buffer(ks * n), ctypes.create_string_buffer(vs * n)
        out: list[tuple[Any, Any]] = []
        first = True
        while True:
            attr = _BatchAttr(0 if first else ctypes.addressof(tok_in), ctypes.addressof(tok_out),
                              ctypes.addressof(kbuf), ctypes.addressof(vbuf), n, self.fd, 0, 0)
            done = False
            try:
                bpf(MAP_LOOKUP_BATCH, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:  # the walk reached the end (this call's entries are still in count)
                    done = True
                elif e.errno == errno.ENOSPC:  # one bucket holds more than n entries: again, with more room
                    n *= 2
                    kbuf, vbuf = ctypes.create_string_buffer(ks * n), ctypes.create_string_buffer(vs * n)
                    continue
                elif e.errno in (errno.EINVAL, errno.EPERM, 524) and first and not out:  # 524: ENOTSUPP
                    self._batch_ok = False
                    return None
                else:
                    raise
            got = int(attr.count)
            if got:
                kraw, vraw = kbuf.raw[: got * ks], vbuf.raw[: got * vs]
                key, leaf, stride, ncpus = self.Key.from_buffer_copy, self._leaf, self._stride, self.ncpus
                for i in range(got):
                    off = i * vs
                    v = leaf(vraw, off) if not self.percpu else [leaf(vraw, off + c * stride) for c in range(ncpus)]
                    out.append((key(kraw, i * ks), v))
            if done:
                return out
            ctypes.memmove(tok_in, tok_out, len(tok_out))
            first = False

    def values(self) -> list[Any]:
        return [v for _, v in self.items()]

    def __iter__(self):
        return self.keys()

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())


class RingBuf:
    """A BPF ring buffer mapped into the agent, drained by polling (no epoll, no reader wakeup needed)."""

    BUSY, DISCARD, HDR = 1 << 31, 1 << 30, 8

    def __init__(self, name: str, fd: int, info: MapInfo):
        self.name, self.fd, self.info = name, fd, info
        self.size = int(info.max_entries)
        self.page = mmap.PAGESIZE
        self._cb: Callable | None = None
        prot_rw, prot_r, shared = mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ, mmap.MAP_SHARED
        self._cons = _libc.mmap(None, self.page, prot_rw, shared, fd, 0)
        if self._cons in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            raise OSError(e, f"mmap of ring buffer {name} (consumer page): {os.strerror(e)}")
        self._prod_len = self.page + 2 * self.size  # the data pages are mapped twice: a record never wraps
        self._prod = _libc.mmap(None, self._prod_len, prot_r, shared, fd, self.page)
        if self._prod in (None, ctypes.c_void_p(-1).value):
            e = ctypes.get_errno()
            _libc.munmap(self._cons, self.page)
            raise OSError(e, f"mmap of ring buffer {name} (data pages): {os.strerror(e)}")
        self._cons_pos = ctypes.c_uint64.from_address(self._cons)
        self._prod_pos = ctypes.c_uint64.from_address(self._prod)
        self._data = self._prod + self.page

    def open_ring_buffer(self, callback: Callable) -> None:
        self._cb = callback

    def consume(self) -> int:
        """Hand every committed record to the callback; returns how many."""
        if self._prod is None:
            return 0
        n, mask = 0, self.size - 1
        cons = self._cons_pos.value
        while True:
            prod = self._prod_pos.value
            if cons >= prod:
                break
            while cons < prod:
                hdr = self._data + (cons & mask)
                length = ctypes.c_uint32.from_address(hdr).value
                if length & self.BUSY:  # being written: the rest next time
                    self._cons_pos.value = cons
                    return n
                cons += (((length & ~(self.BUSY | self.DISCARD)) + self.HDR) + 7) & ~7
                if not length & self.DISCARD and self._cb is not None:
                    n += 1
                    self._cb(None, hdr + self.HDR, length & ~(self.BUSY | self.DISCARD))
                self._cons_pos.value = cons  # records are given back one by one, as libbpf does
        return n

    def close(self) -> None:
        if self._prod is not None:
            _libc.munmap(self._prod, self._prod_len)
            _libc.munmap(self._cons, self.page)
            self._prod = self._cons = None


@dataclass
class Program:
    name: str
    fd: int


@dataclass
class Attachment:
    """One attached program: ``kind`` (tracepoint, raw_tracepoint, uprobe, uretprobe, ...), ``target``
    (``cat:name`` for a tracepoint, the raw tracepoint's name, ``binary:symbol`` for a uprobe), the
    program's function name, and the fd that keeps it attached (a perf event or a BPF link)."""

    kind: str
    target: str
    fn_name: str
    fd: int

    @property
    def label(self) -> str:
        return self.target if self.kind == "tracepoint" else f"{self.kind}:{self.target}"


@dataclass
class MapSpec:
    name: str
    fd: int
    key_desc: Any = None
    leaf_desc: Any = None


@dataclass
class BpfObject:
    """A probe's loaded programs, maps and attachments, by fd (bcc-like access: ``obj[b"name"]``)."""

    programs: dict[str, Program] = field(default_factory=dict)
    maps: dict[str, MapSpec] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)

    def __post_init__(self):
        self._tables: dict[str, Any] = {}
        self._ncpus = possible_cpus()

    @staticmethod
    def _name(name) -> str:
        return name.decode() if isinstance(name, bytes) else name

    @property
    def funcs(self) -> dict[str, Program]:
        return self.programs

    def get_table(self, name, key_type=None, leaf_type=None):
        name = self._name(name)
        spec = self.maps.get(name)
        if spec is None:
            raise KeyError(name)
        info = obj_info(spec.fd, MapInfo())
        if info.type == RINGBUF:
            return RingBuf(name, spec.fd, info)
        if info.type == PERF_EVENT_ARRAY:
            raise ValueError(f"map {name}: perf buffers are not read by the agent; use a BPF ring buffer")
        key_type = key_type or ctype_from_desc(spec.key_desc)
        leaf_type = leaf_type or ctype_from_desc(spec.leaf_desc)
        return Table(name, spec.fd, info, key_type, leaf_type, self._ncpus)

    def __getitem__(self, name):
        name = self._name(name)
        if name not in self._tables:
            self._tables[name] = self.get_table(name)
        return self._tables[name]

    def __setitem__(self, name, table) -> None:
        self._tables[self._name(name)] = table

    def __contains__(self, name) -> bool:
        return self._name(name) in self.maps

    def ring_buffer_consume(self) -> int:
        return sum(t.consume() for t in self._tables.values() if isinstance(t, RingBuf))

    def program_fds(self) -> dict[str, int]:
        """Attachment label → fd of the program attached there."""
        out = {}
        for a in self.attachments:
            p = self.programs.get(a.fn_name)
            if p is not None:
                out[a.label] = p.fd
        return out

    def cleanup(self) -> None:
        """Detach (close the attachment fds first), then close programs and maps."""
        for t in self._tables.values():
            if isinstance(t, RingBuf):
                t.close()
        self._tables.clear()
        fds = [a.fd for a in self.attachments] + [p.fd for p in self.programs.values()] + [m.fd for m in self.maps.values()]
        self.attachments, self.programs, self.maps = [], {}, {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
