"""Block I/O latency per device and operation, and per submitting process
(probes/block_io.bpf.c).

Three ways to run it, the first the kernel allows (:attr:`BlockIoProbe.mode`):

* ``btf``: request mode on BTF-typed raw tracepoints (tp_btf)
  block_io_start + block_rq_complete. The kernel's own per-request times
  (struct request start_time_ns, io_start_time_ns) give the latencies, so a
  request costs one clock read and no hash map; the submitter's tgid is kept
  per request address in an array of 4-way sets. The struct offsets and
  enum values come from the running kernel's BTF (``/sys/kernel/btf/vmlinux``,
  :mod:`agent.ebpf.btf`), never from the kernel headers bcc compiles with.
* ``raw``: the same on raw tracepoints (fields read with
  bpf_probe_read_kernel), when the kernel refuses tp_btf programs.
* ``classic``: block:block_rq_insert/issue/complete with their tracefs
  arguments, requests keyed by (dev, op, sector), when BTF lacks what
  request mode needs (or block_io_start does not exist, before 6.5).

Latency kinds: ``total`` = start → complete (request mode: the kernel's
accounting start, as /sys/block/<dev>/stat; classic: first sight at insert,
else issue), ``device`` = dispatch to the driver → complete, ``queue`` =
start → dispatch (request mode: only where the queue keeps I/O statistics,
which sets io_start_time_ns; classic: only requests that were inserted).
log2 histograms in ns (slot s = [2^(s-1), 2^s) ns).

Device names: the probe's dev is the kernel-internal dev_t of the whole
disk; its MAJ:MIN is looked up in ``/sys/dev/block/MAJ:MIN/uevent`` (DEVNAME)
through HostPaths, cached while the device exists.

Events lost: completions not in the histograms — classic: whose issue was
not seen (issued before the probe was attached, or evicted) plus issues that
overwrote another request with the same (dev, op, sector); request mode:
requests the kernel kept no start time for (``untimed``); both: a (dev, op)
the lat table had no room for (``full``).
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import logging
import sys

from agent.ebpf import btf, decode
from agent.ebpf.bounded import AgingTable, Reuse, Tuples
from agent.ebpf.compiler import Attach
from agent.ebpf.loader import FAILED, Probe, ProbeReport
from agent.ebpf.objcache import FORMAT as OBJCACHE_FORMAT
from agent.ebpf.objcache import CacheMiss, ObjCache, file_digest
from agent.ebpf.requirements import Check
from agent.hostpaths import HostPaths
from agent.records.ebpf import SLOT_MAX, BlockHistogram, BlockIoData, BlockProcess

log = logging.getLogger(__name__)

# The C side of everything below is probes/block_io.h (checked by
# tests/unit/test_probe_layouts.py). SLOT_MAX (agent/records/ebpf.py) is
# passed to the C as -DSLOT_MAX; KINDS: enum kind, in order; ops:
# decode.BLOCK_OPS.
NSLOTS = SLOT_MAX + 2
KINDS = ("total", "queue", "device")
TOT_INSERTED, TOT_ISSUED, TOT_COMPLETED, TOT_UNMATCHED, TOT_OVERWRITTEN = 0, 1, 2, 3, 4
TOT_UNTIMED, TOT_PARTIAL, TOT_UNATTRIBUTED, TOT_FULL, TOT_PROC_EVICTED, TOT_N = 5, 6, 7, 8, 9, 10
TOTALS = ("inserted", "issued", "completed", "unmatched", "overwritten", "untimed", "partial", "unattributed", "full",
          "proc_evicted")


class LatVal(ctypes.Structure):
    _fields_ = [
        ("dev", ctypes.c_uint32),
        ("op", ctypes.c_uint32),
        ("used", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("slots", ctypes.c_uint64 * (len(KINDS) * NSLOTS)),  # [kind * NSLOTS + slot]
        ("sum_ns", ctypes.c_uint64 * len(KINDS)),
        ("bytes", ctypes.c_uint64),
    ]


class ProcVal(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("dev", ctypes.c_uint32), ("op", ctypes.c_uint32), ("gen", ctypes.c_uint32),
                ("last_ns", ctypes.c_uint64), ("slots", ctypes.c_uint64 * NSLOTS), ("sum_ns", ctypes.c_uint64),
                ("bytes", ctypes.c_uint64)]


STRUCTS = {"lat_val": LatVal, "proc_val": ProcVal}
# maps read through these types (not bcc's own reading of the C)
TABLES = {"lat": (ctypes.c_int, LatVal), "procs": (ctypes.c_int, ProcVal), "totals": (ctypes.c_int, ctypes.c_uint64)}

# per-process running totals kept by the agent: at most MAX_PROCESSES (tgid, dev, op) (the least
# recently active is dropped), and one without new I/O for PROCESS_EXPIRE_CYCLES reads is forgotten
MAX_PROCESSES = 1024
PROCESS_EXPIRE_CYCLES = 720  # an hour at 5 s

MODES = ("btf", "raw", "classic")
# what request mode reads, and the size each must have in the running kernel
RQ_FIELDS = {  # -D name: (struct, member, size)
    "RQ_OFF_Q": ("request", "q", 8),
    "RQ_OFF_CMD_FLAGS": ("request", "cmd_flags", 4),
    "RQ_OFF_DATA_LEN": ("request", "__data_len", 4),
    "RQ_OFF_START": ("request", "start_time_ns", 8),
    "RQ_OFF_IO_START": ("request", "io_start_time_ns", 8),
    "Q_OFF_DISK": ("request_queue", "disk", 8),
    "DISK_OFF_MAJOR": ("gendisk", "major", 4),
    "DISK_OFF_FIRST_MINOR": ("gendisk", "first_minor", 4),
}
RQ_OPS = ("READ", "WRITE", "FLUSH", "DISCARD", "SECURE_ERASE")  # enum req_op -> -DREQ_OP_<name>_V
RQ_TRACEPOINTS = ("block_io_start", "block_rq_complete")
RQ_HEAD_MAX = 256  # raw mode reads the request's first bytes in one go, at most this many


def request_layout(data: bytes) -> tuple[dict[str, int], dict[str, int], str]:
    """The -D constants of request mode from raw BTF ``data`` (struct offsets, enum req_op values, the
    head length raw mode reads) and the BTF ids of the tracepoints' ``btf_trace_*`` typedefs; or ({}, {},
    why) when the BTF lacks any of them (the caller falls back to classic mode)."""
    structs = {s for s, _, _ in RQ_FIELDS.values()}
    b = btf.parse(data, structs, {"req_op"}, {f"btf_trace_{tp}" for tp in RQ_TRACEPOINTS})
    defs: dict[str, int] = {}
    for name, (st, member, size) in RQ_FIELDS.items():
        m = b.member(st, member)
        if m is None:
            return {}, {}, f"struct {st} has no member {member} in the kernel's BTF"
        off, msize = b.offset(st, member), b.size(m.type_id)
        if off is None or msize != size:
            return {}, {}, f"struct {st}.{member}: {msize} bytes at bit {m.bit_offset}, expected {size} bytes"
        defs[name] = off
    for op in RQ_OPS:
        v = b.enums.get(f"REQ_OP_{op}")
        if v is None:
            return {}, {}, f"enum req_op has no REQ_OP_{op} in the kernel's BTF"
        defs[f"REQ_OP_{op}_V"] = v
    head = max(defs[n] + RQ_FIELDS[n][2] for n in RQ_FIELDS if RQ_FIELDS[n][0] == "request")
    head = (head + 7) & ~7
    if head > RQ_HEAD_MAX:
        return {}, {}, f"struct request fields end at byte {head}, past the {RQ_HEAD_MAX} bytes raw mode reads"
    defs["RQ_HEAD_LEN"] = head
    ids = {tp: b.typedefs.get(f"btf_trace_{tp}", 0) for tp in RQ_TRACEPOINTS}
    return defs, ids, ""


class _ProcTotals:
    """Running totals of one (tgid, dev, op), and the record last built from them (shared by the
    snapshots while nothing changes)."""

    __slots__ = ("comm", "slots", "sum_ns", "bytes", "record", "stale")

    def __init__(self, comm: str):
        self.comm = comm
        self.slots = [0] * NSLOTS
        self.sum_ns = 0
        self.bytes = 0
        self.record: BlockProcess | None = None
        self.stale = True  # the totals moved since the record was built


class DeviceNames:
    """dev_t → name through /sys/dev/block/MAJ:MIN/uevent, cached.

    Bounded: at most ``cap`` devices, and a device not named for
    ``expire_cycles`` reads (:meth:`end_cycle`) is forgotten, so a dev_t
    reused by another device is looked up again and a host that churns
    through devices does not grow the cache.
    """

    def __init__(self, paths: HostPaths, cap: int = 4096, expire_cycles: int = 60):
        self.paths = paths
        self._cache: AgingTable[int, str] = AgingTable(cap, expire_cycles)

    def end_cycle(self) -> None:
        self._cache.end_cycle()

    def counts(self) -> dict[str, int]:
        return self._cache.counts()

    def name(self, dev: int) -> str:
        cached = self._cache.get(dev)
        if cached is not None:
            return cached
        major, minor = decode.dev_major_minor(dev)
        try:
            text = self.paths.read_text(self.paths.sys("dev", "block", f"{major}:{minor}", "uevent"))
            name = decode.parse_uevent(text).get("DEVNAME") or f"{major}:{minor}"
        except OSError:
            return f"{major}:{minor}"  # gone, or not yet: do not cache
        self._cache.put(dev, name)
        return name


def _slots(counts: list[int], prev: dict[int, int] | None) -> dict[int, int]:
    """log2 slot -> count of the nonzero ``counts``; a count equal to the same slot's in ``prev`` (the last
    record of the same histogram) is that int object: the history holds an unchanged slot's count once."""
    if not prev:
        return {s: c for s, c in enumerate(counts) if c}
    return {s: (p if (p := prev.get(s)) == c else c) for s, c in enumerate(counts) if c}


def _histogram(devname: str, major: int, minor: int, op: int, kind: str, slots: list[int], sum_ns: int,
               nbytes: int, prev: BlockHistogram | None = None) -> BlockHistogram:
    sl = _slots(slots, prev.slots if prev is not None else None)
    return BlockHistogram(devname, major, minor, decode.block_op_name(op), kind, sl, sum(sl.values()), sum_ns, nbytes)


class BlockIoProbe(Probe):
    name = "block_io"
    source_file = "block_io.bpf.c"
    required = ("block:block_rq_issue", "block:block_rq_complete")
    optional = ("block:block_rq_insert", "block:block_io_start")
    description = "block I/O latency per device/op and per submitting process"

    def __init__(self, opts=None, max_processes: int = MAX_PROCESSES, process_expire_cycles: int = PROCESS_EXPIRE_CYCLES,
                 modes: tuple[str, ...] = MODES):
        super().__init__(opts)
        self.devices = DeviceNames(self.opts.paths)
        self._hists: Reuse[BlockHistogram] = Reuse()  # records of idle (dev, op, kind) kept from the last read
        self._tuples = Tuples()
        self._last_hists: dict[tuple, BlockHistogram] = {}  # the last read's: its slot counts are shared
        self.modes = tuple(m for m in modes if m in MODES)
        self.mode = self.modes[0] if self.modes else "classic"
        self.fallbacks: list[str] = []  # modes tried before the one attached, with the reason
        self._layout: tuple[dict[str, int], dict[str, int], str] | None = None
        # per (tgid, dev, op): bounded running totals, fed by the increase of each CPU's kernel entry
        self._procs: AgingTable[tuple[int, int, int], _ProcTotals] = AgingTable(max_processes, process_expire_cycles)
        self._procs_prev: dict[tuple[int, int], tuple] = {}  # (cpu, index) -> (gen, key, values) of the last read

    @property
    def dropped(self) -> dict[str, int]:
        """Device names and per-process totals forgotten (evicted over their caps, or expired)."""
        d, p = self.devices.counts(), self._procs.counts()
        return {k: d[k] + p[k] for k in d}

    # -- choosing the mode -----------------------------------------------------------
    def layout(self) -> tuple[dict[str, int], dict[str, int], str]:
        """Request mode's constants from the running kernel's BTF (read once; kept in the object cache
        under the BTF's digest, as the compiled programs are: parsing the BTF is ~0.2 s of CPU)."""
        if self._layout is None:
            path = self.opts.paths.sys("kernel", "btf", "vmlinux")
            cache = ObjCache(self.opts.cache_dir) if self.opts.cache_dir else None
            asked = (RQ_FIELDS, RQ_OPS, RQ_TRACEPOINTS, RQ_HEAD_MAX)  # what request_layout looks for: another key
            key = hashlib.sha256(f"block_io layout {asked!r} {file_digest(path)}".encode()).hexdigest()
            if cache is not None:
                try:
                    got = cache.get(key)["layout"]
                    self._layout = ({k: int(v) for k, v in got[0].items()}, {k: int(v) for k, v in got[1].items()},
                                    str(got[2]))
                    return self._layout
                except (CacheMiss, KeyError, TypeError, ValueError, AttributeError, IndexError):
                    pass
            try:
                self._layout = request_layout(path.read_bytes())
            except (OSError, btf.BtfError) as e:
                self._layout = ({}, {}, f"cannot read {path}: {e}")
                return self._layout
            if cache is not None:
                cache.put(key, {"format": OBJCACHE_FORMAT, "layout": list(self._layout)})
        return self._layout

    def _why_not(self, mode: str, present: set[str]) -> str:
        if mode == "classic":
            return ""
        if "block:block_io_start" not in present:
            return "no block:block_io_start tracepoint (kernel before 6.5)"
        defs, ids, why = self.layout()
        if why:
            return why
        if mode == "btf" and not all(ids.values()):
            return "no btf_trace_* typedef for " + ", ".join(tp for tp, i in ids.items() if not i)
        return ""

    def load(self):
        """The first mode of :attr:`modes` that the kernel's BTF allows and that compiles and attaches."""
        self.fallbacks = []
        try:
            _, present = self.check()  # mounts tracefs if needed; super().load() checks again and reports
        except Exception:
            present = set()
        rep = None
        for i, mode in enumerate(self.modes):
            self.mode = mode
            why = self._why_not(mode, present)
            if why:
                self.fallbacks.append(f"{mode}: {why}")
                continue
            rep = super().load()
            if rep.state != FAILED or i == len(self.modes) - 1:
                break
            self.fallbacks.append(f"{mode}: {rep.reason.splitlines()[0] if rep.reason else 'failed'}")
            log.info("block_io: %s mode failed, falling back: %s", mode, rep.reason)
        if rep is None:
            rep = self.report = ProbeReport(self.name, FAILED, reason="no mode possible: " + "; ".join(self.fallbacks))
            return rep
        done = [f for f in self.fallbacks if not f.startswith(self.mode + ":")]
        how = {"btf": "request mode on BTF tracepoints, struct offsets from the running kernel's BTF",
               "raw": "request mode on raw tracepoints, struct offsets from the running kernel's BTF",
               "classic": "block:block_rq_* tracepoint arguments"}.get(self.mode, "")
        rep.checks.append(Check("block_io mode", True, f"{self.mode} mode ({how})" +
                                (f"; not {'; not '.join(done)}" if done else "")))
        return rep

    def extra_cflags(self, present):
        flags = [f"-DSLOT_MAX={SLOT_MAX}"]
        if self.mode in ("btf", "raw"):
            defs, _, _ = self.layout()
            flags += [f"-D{k}={v}" for k, v in sorted(defs.items())]
            if self.mode == "btf":
                flags.append("-DRQ_BTF")
        return flags

    def attachments(self, present):
        if self.mode != "btf":
            return []  # bcc attaches raw_tracepoint__* and tracepoint__* functions itself
        _, ids, _ = self.layout()
        return [Attach("tp_btf", f"ks_btf__{tp}", target=tp, btf_id=ids[tp]) for tp in RQ_TRACEPOINTS]

    def on_loaded(self):
        for name, (key, leaf) in TABLES.items():
            self.bpf[name.encode()] = self.bpf.get_table(name.encode(), key, leaf)

    # -- reading -----------------------------------------------------------------------
    def events_and_lost(self):
        t = self.percpu_totals("totals", TOT_N)
        events = sum(t[i] for i in (TOT_INSERTED, TOT_ISSUED, TOT_COMPLETED, TOT_UNMATCHED, TOT_UNTIMED, TOT_PARTIAL,
                                    TOT_FULL))
        return events, t[TOT_UNMATCHED] + t[TOT_OVERWRITTEN] + t[TOT_UNTIMED] + t[TOT_FULL]

    def _comm(self, tgid: int) -> str:
        if tgid <= 0:
            return ""  # not known: the submitter was not in the owner table
        try:
            return sys.intern(self.opts.paths.read_text(self.opts.paths.proc(str(tgid), "comm")).strip())
        except OSError:
            return ""  # ended before the agent saw it

    @staticmethod
    def _entries(table, leaf, used_at: int):
        """(cpu, index, value) of every used per-CPU array entry (a nonzero u32 at ``used_at``), read in batches;
        the used ones are found by slicing the u32 words (C speed), only they are decoded."""
        stride, ncpus = table.stride, table.ncpus
        if stride % 4:
            return
        base = 0  # entries (index x CPU) before this batch
        for n, raw in table.batch_chunks():
            flags = array.array("I", raw[: n * ncpus * stride])[used_at // 4::stride // 4]
            for j, flag in enumerate(flags):
                if flag:
                    i, cpu = divmod(base + j, ncpus)
                    yield cpu, i, leaf.from_buffer_copy(raw, j * stride)
            base += n * ncpus

    def accumulate_processes(self, rows) -> tuple[BlockProcess, ...]:
        """One read of the kernel's per-CPU process table, ``rows`` of ((cpu, index), gen, (tgid, dev, op),
        values) with values = (slot 0..NSLOTS-1 counts, sum_ns, bytes), into the running totals: what each
        CPU's entry gained since the last read (all of it when the entry restarted: another gen, or
        another key); returns the records of every (tgid, dev, op) kept."""
        seen = {}
        for where, gen, key, vals in rows:
            prev = self._procs_prev.get(where)
            if prev is not None and prev[2] == vals and prev[0] == gen and prev[1] == key:
                seen[where] = prev  # idle since the last read (the usual case): nothing to add
                continue
            if prev is None or prev[0] != gen or prev[1] != key or any(v < p for v, p in zip(vals, prev[2])):
                deltas = vals
            else:
                deltas = [v - p for v, p in zip(vals, prev[2])]
            seen[where] = (gen, key, vals)
            if any(deltas):  # activity marks an entry seen: idle ones are the first to go
                cum = self._procs.setdefault(key, lambda: _ProcTotals(self._comm(key[0])))
                for i in range(NSLOTS):
                    cum.slots[i] += deltas[i]
                cum.sum_ns += deltas[NSLOTS]
                cum.bytes += deltas[NSLOTS + 1]
                cum.stale = True
        self._procs_prev = seen
        self._procs.end_cycle()
        out = []
        for (tgid, dev, op), cum in self._procs.items():
            if cum.stale:
                cum.stale = False
                major, minor = decode.dev_major_minor(dev)
                sl = _slots(cum.slots, cum.record.slots if cum.record is not None else None)
                cum.record = BlockProcess(tgid, cum.comm, self.devices.name(dev), decode.block_op_name(op),
                                          sum(sl.values()), cum.sum_ns, cum.bytes, major, minor, sl)
            out.append(cum.record)
        out.sort(key=lambda p: (p.tgid, p.major, p.minor, p.op))
        return self._tuples.same("processes", out)

    def read(self) -> BlockIoData:
        b = self.bpf
        # lat: per-CPU entries of (dev, op) -> slots/sum_ns per kind + bytes; summed here by their own key
        acc: dict[tuple[int, int], tuple[list[list[int]], list[int], list[int]]] = {}
        for _cpu, _i, v in self._entries(b[b"lat"], LatVal, LatVal.used.offset):
            key = (int(v.dev), int(v.op))
            slots, sums, nbytes = acc.setdefault(key, ([[0] * NSLOTS for _ in KINDS], [0] * len(KINDS), [0]))
            flat = list(v.slots)  # [kind * NSLOTS + slot]
            for kind in range(len(KINDS)):
                a, base = slots[kind], kind * NSLOTS
                for s in range(NSLOTS):
                    a[s] += flat[base + s]
                sums[kind] += v.sum_ns[kind]
            nbytes[0] += v.bytes
        hists = []
        last = self._last_hists
        for (dev, op), (slots, sums, nbytes) in acc.items():
            major, minor = decode.dev_major_minor(dev)
            devname = self.devices.name(dev)
            for kind, name in enumerate(KINDS):
                if kind != 0 and not any(slots[kind]):
                    continue  # queue/device time only where the kernel (or insert) gave it
                # buckets and _count from the same numbers; an idle device's record is last read's (shared by the
                # history, not rebuilt)
                hists.append(self._hists.get(
                    (devname, dev, op, kind, tuple(slots[kind]), sums[kind], nbytes[0]),
                    lambda dn=devname, mj=major, mn=minor, op=op, kind=kind, name=name, sc=slots[kind], sm=sums[kind],
                    nb=nbytes[0]: _histogram(dn, mj, mn, op, name, sc, sm, nb if kind == 0 else 0,
                                             last.get((dn, mj, mn, decode.block_op_name(op), name)))))
        self._hists.end_cycle()
        self._last_hists = {(h.device, h.major, h.minor, h.op, h.kind): h for h in hists}
        hists.sort(key=lambda h: (h.major, h.minor, h.op, KINDS.index(h.kind)))
        rows = []
        for cpu, i, v in self._entries(b[b"procs"], ProcVal, ProcVal.gen.offset):
            rows.append(((cpu, i), int(v.gen), (int(v.tgid), int(v.dev), int(v.op)),
                         tuple(v.slots) + (int(v.sum_ns), int(v.bytes))))
        procs = self.accumulate_processes(rows)
        t = self.percpu_totals("totals", TOT_N)
        totals = dict(zip(TOTALS, t))
        self.devices.end_cycle()
        return BlockIoData(self._tuples.same("histograms", hists), procs, totals, SLOT_MAX, self.stats(),
                           self._tuples.same("tracepoints", self.report.tracepoints))
