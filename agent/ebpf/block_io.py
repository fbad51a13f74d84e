"""Block I/O latency per device and operation, and per issuing process
(probes/block_io.bpf.c).

Tracepoints: block:block_rq_issue and block:block_rq_complete (required),
block:block_rq_insert (optional; splits queue time from device time).
Kernel 5.x+ field layout (dev, sector, rwbs); the argument structs come from
the running kernel's tracefs format files.

Latency kinds: ``total`` = first sight (insert, else issue) → complete,
``queue`` = insert → issue (only requests that were inserted), ``device`` =
issue → complete. log2 histograms in ns (slot s = [2^(s-1), 2^s) ns).

Device names: the probe's dev is the kernel-internal dev_t; its MAJ:MIN is
looked up in ``/sys/dev/block/MAJ:MIN/uevent`` (DEVNAME) through HostPaths,
cached while the device exists.

Events lost: completions whose issue was not seen (issued before the probe
was attached, or evicted from the bounded in-flight map) plus issues that
overwrote another in-flight request with the same (dev, op, sector).
"""

from __future__ import annotations

import ctypes

from agent.ebpf import decode
from agent.ebpf.bounded import AgingTable
from agent.ebpf.loader import Probe
from agent.hostpaths import HostPaths
from agent.records.ebpf import SLOT_MAX, BlockHistogram, BlockIoData, BlockProcess

# The C side of everything below is probes/block_io.h (checked by
# tests/unit/test_probe_layouts.py). SLOT_MAX (agent/records/ebpf.py) is
# passed to the C as -DSLOT_MAX; KINDS: enum kind, in order; ops:
# decode.BLOCK_OPS.
NSLOTS = SLOT_MAX + 2
KINDS = ("total", "queue", "device")
TOT_INSERTED, TOT_ISSUED, TOT_COMPLETED, TOT_UNMATCHED, TOT_OVERWRITTEN, TOT_N = 0, 1, 2, 3, 4, 5


class LatKey(ctypes.Structure):
    _fields_ = [("dev", ctypes.c_uint32), ("op", ctypes.c_uint32)]


class LatVal(ctypes.Structure):
    _fields_ = [
        ("slots", ctypes.c_uint64 * (len(KINDS) * NSLOTS)),  # [kind * NSLOTS + slot]
        ("sum_ns", ctypes.c_uint64 * len(KINDS)),
        ("bytes", ctypes.c_uint64),
    ]


class ProcVal(ctypes.Structure):
    _fields_ = [("slots", ctypes.c_uint64 * NSLOTS), ("sum_ns", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class ProcKey(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("dev", ctypes.c_uint32), ("op", ctypes.c_uint32)]


STRUCTS = {"lat_key": LatKey, "lat_val": LatVal, "proc_val": ProcVal, "proc_key": ProcKey}
# maps read through these types (not bcc's own reading of the C)
TABLES = {"lat": (LatKey, LatVal), "procs": (ProcKey, ProcVal), "totals": (ctypes.c_int, ctypes.c_uint64)}

# per-process running totals kept by the agent: at most MAX_PROCESSES (tgid, dev, op) (the least
# recently active is dropped), and one without new I/O for PROCESS_EXPIRE_CYCLES reads is forgotten
MAX_PROCESSES = 1024
PROCESS_EXPIRE_CYCLES = 720  # an hour at 5 s


class _ProcTotals:
    """Running totals of one (tgid, dev, op), and the record last built from them (shared by the
    snapshots while nothing changes)."""

    __slots__ = ("comm", "slots", "sum_ns", "bytes", "record")

    def __init__(self, comm: str):
        self.comm = comm
        self.slots = [0] * NSLOTS
        self.sum_ns = 0
        self.bytes = 0
        self.record: BlockProcess | None = None


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


class BlockIoProbe(Probe):
    name = "block_io"
    source_file = "block_io.bpf.c"
    required = ("block:block_rq_issue", "block:block_rq_complete")
    optional = ("block:block_rq_insert",)
    description = "block I/O latency per device/op and per issuing process"

    def __init__(self, opts=None, max_processes: int = MAX_PROCESSES, process_expire_cycles: int = PROCESS_EXPIRE_CYCLES):
        super().__init__(opts)
        self.devices = DeviceNames(self.opts.paths)
        # per (tgid, dev, op): bounded running totals; the kernel's LRU map may drop and restart an entry
        self._procs: AgingTable[tuple[int, int, int], _ProcTotals] = AgingTable(max_processes, process_expire_cycles)
        self._procs_prev: dict[tuple[int, int, int], tuple[int, ...]] = {}  # last kernel values (slots, sum, bytes)

    @property
    def dropped(self) -> dict[str, int]:
        """Device names and per-process totals forgotten (evicted over their caps, or expired)."""
        d, p = self.devices.counts(), self._procs.counts()
        return {k: d[k] + p[k] for k in d}

    def _comm(self, tgid: int) -> str:
        try:
            return self.opts.paths.read_text(self.opts.paths.proc(str(tgid), "comm")).strip()
        except OSError:
            return ""  # ended before the agent saw it

    def accumulate_processes(self, rows) -> tuple[BlockProcess, ...]:
        """One read of the kernel's per-process map, ``rows`` of ((tgid, dev, op), values) with values =
        (slot 0..NSLOTS-1 counts, sum_ns, bytes) summed over the CPUs, into the running totals; returns
        the records of every (tgid, dev, op) kept."""
        seen = {}
        for key, vals in rows:
            prev = self._procs_prev.get(key)
            if prev is None or any(v < p for v, p in zip(vals, prev)):
                deltas = vals  # new, or the kernel's LRU map dropped and restarted it
            else:
                deltas = [v - p for v, p in zip(vals, prev)]
            seen[key] = vals
            if any(deltas):  # activity marks an entry seen: idle ones are the first to go
                cum = self._procs.setdefault(key, lambda: _ProcTotals(self._comm(key[0])))
                for i in range(NSLOTS):
                    cum.slots[i] += deltas[i]
                cum.sum_ns += deltas[NSLOTS]
                cum.bytes += deltas[NSLOTS + 1]
                cum.record = None
        self._procs_prev = seen
        self._procs.end_cycle()
        out = []
        for (tgid, dev, op), cum in self._procs.items():
            if cum.record is None:
                major, minor = decode.dev_major_minor(dev)
                sl = {s: c for s, c in enumerate(cum.slots) if c}
                cum.record = BlockProcess(tgid, cum.comm, self.devices.name(dev), decode.block_op_name(op),
                                          sum(sl.values()), cum.sum_ns, cum.bytes, major, minor, sl)
            out.append(cum.record)
        out.sort(key=lambda p: (p.tgid, p.major, p.minor, p.op))
        return tuple(out)

    def extra_cflags(self, present):
        return [f"-DSLOT_MAX={SLOT_MAX}"]

    def on_loaded(self):
        for name, (key, leaf) in TABLES.items():
            self.bpf[name.encode()] = self.bpf.get_table(name.encode(), key, leaf)

    def events_and_lost(self):
        t = self.percpu_totals("totals", TOT_N)
        return t[TOT_INSERTED] + t[TOT_ISSUED] + t[TOT_COMPLETED] + t[TOT_UNMATCHED], t[TOT_UNMATCHED] + t[TOT_OVERWRITTEN]

    def read(self) -> BlockIoData:
        b = self.bpf
        hists = []
        # lat: per-CPU (dev, op) -> slots/sum_ns per kind + bytes; summed here
        for k, percpu in b[b"lat"].items():
            dev, op = int(k.dev), int(k.op)
            slots = [[0] * NSLOTS for _ in KINDS]
            sums = [0] * len(KINDS)
            nbytes = 0
            for v in percpu:
                flat = v.slots  # [kind * NSLOTS + slot]
                for kind in range(len(KINDS)):
                    acc, base = slots[kind], kind * NSLOTS
                    for s in range(NSLOTS):
                        acc[s] += flat[base + s]
                    sums[kind] += v.sum_ns[kind]
                nbytes += v.bytes
            major, minor = decode.dev_major_minor(dev)
            for kind, name in enumerate(KINDS):
                sl = {s: c for s, c in enumerate(slots[kind]) if c}
                if not sl and kind != 0:
                    continue  # queue time only where insert was seen
                # buckets and _count from the same numbers
                hists.append(BlockHistogram(self.devices.name(dev), major, minor, decode.block_op_name(op), name, sl,
                                            sum(sl.values()), sums[kind], nbytes if kind == 0 else 0))
        hists.sort(key=lambda h: (h.major, h.minor, h.op, KINDS.index(h.kind)))
        rows = []
        for k, percpu in b[b"procs"].items():
            vals = [0] * (NSLOTS + 2)
            for v in percpu:
                sl = v.slots
                for s in range(NSLOTS):
                    vals[s] += sl[s]
                vals[NSLOTS] += v.sum_ns
                vals[NSLOTS + 1] += v.bytes
            rows.append(((int(k.tgid), int(k.dev), int(k.op)), tuple(vals)))
        procs = self.accumulate_processes(rows)
        t = self.percpu_totals("totals", TOT_N)
        totals = {"inserted": t[TOT_INSERTED], "issued": t[TOT_ISSUED], "completed": t[TOT_COMPLETED],
                  "unmatched": t[TOT_UNMATCHED], "overwritten": t[TOT_OVERWRITTEN]}
        self.devices.end_cycle()
        return BlockIoData(tuple(hists), procs, totals, SLOT_MAX, self.stats(), tuple(self.report.tracepoints))
