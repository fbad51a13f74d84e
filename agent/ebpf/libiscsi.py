"""iSCSI command latency inside QEMU processes, from uprobes on libiscsi
(probes/libiscsi.bpf.c).

QEMU's own initiator (``<disk type='network'><source protocol='iscsi'>``,
QEMU's block-iscsi module) links ``libiscsi.so.7``; its I/O never reaches
the host's block layer. Uprobes on the library's exported API (1.x ABI,
seen with 1.19 and QEMU 7.2) see every command: ``iscsi_scsi_command_async``
(submission: context, LUN, task; the op from the CDB's opcode),
``scsi_free_scsi_task`` (QEMU frees the task once its completion callback
has woken the request: the end of the measured time),
``iscsi_task_mgmt_abort_task_async`` (QEMU cancelling a command),
``iscsi_reconnect`` (a new login), and, only when a context is opened,
``iscsi_set_targetname`` / ``iscsi_full_connect_{sync,async}`` (target,
portal, LUN of the context). The uprobes are set on the library file for
every process (pid -1), so QEMUs started later are covered too.

Cost: each hit is a breakpoint trap (two per command), much more than a
tracepoint: measured in docs/performance.md (``make bench-uprobes``; ~5-10 us
per hit on this Firecracker guest, where a trap leaves the guest). Sampling
keeps it within ``ebpf.uprobe_budget`` (2 % of one CPU) for every process: at
load the probe measures what one hit costs this machine (its own calls of
``scsi_free_scsi_task(NULL)``, attached and detached); after each cycle with
the command uprobes attached it takes the busiest process's commands per
second; when rate x cost exceeds the budget, the two command uprobes are
detached (the breakpoints removed: the calls cost nothing again) for N cycles,
then attached again for one (:class:`DutyCycle`), so a process pays at most the
budget on average and every disk still gets a histogram each time they are
attached. Aborts, reconnects and logins stay attached (rare calls).

Lost: tasks freed whose submission was not seen (``untimed``: in flight
when the probe attached, or pushed out of the bounded in-flight map).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time

from agent.ebpf import decode, uprobes
from agent.ebpf.bounded import Reuse, Tuples
from agent.ebpf.bpfsys import Attachment
from agent.ebpf.compiler import Attach
from agent.ebpf.loader import Probe, Uprobe
from agent.records.ebpf import SLOT_MAX, LibiscsiContext, LibiscsiData, LibiscsiLatency

log = logging.getLogger(__name__)

# The C side of everything below is probes/libiscsi.h (checked by
# tests/unit/test_probe_layouts.py); ops: decode.BLOCK_OPS (enum iscsi_op).
NSLOTS = SLOT_MAX + 2
TARGET_LEN, PORTAL_LEN = 224, 64
TOT_SUBMITTED, TOT_COMPLETED, TOT_UNTIMED, TOT_ABORTS, TOT_RECONNECTS, TOT_N = 0, 1, 2, 3, 4, 5


class LunKey(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_uint64), ("tgid", ctypes.c_uint32), ("lun", ctypes.c_uint32),
                ("op", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class LunVal(ctypes.Structure):
    _fields_ = [("slots", ctypes.c_uint64 * NSLOTS), ("sum_ns", ctypes.c_uint64)]


class TaskKey(ctypes.Structure):
    _fields_ = [("task", ctypes.c_uint64), ("tgid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class TaskVal(ctypes.Structure):
    _fields_ = [("start_ns", ctypes.c_uint64), ("ctx", ctypes.c_uint64), ("lun", ctypes.c_uint32),
                ("op", ctypes.c_uint32)]


class CtxKey(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_uint64), ("tgid", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class CtxVal(ctypes.Structure):
    _fields_ = [("aborts", ctypes.c_uint64), ("reconnects", ctypes.c_uint64), ("lun", ctypes.c_int32),
                ("pad", ctypes.c_uint32), ("target", ctypes.c_char * TARGET_LEN), ("portal", ctypes.c_char * PORTAL_LEN)]


STRUCTS = {"lun_key": LunKey, "lun_val": LunVal, "task_key": TaskKey, "task_val": TaskVal,
           "ctx_key": CtxKey, "ctx_val": CtxVal}
# maps read through these types (not bcc's own reading of the C)
TABLES = {"lat": (LunKey, LunVal), "inflight": (TaskKey, TaskVal), "ctxs": (CtxKey, CtxVal),
          "totals": (ctypes.c_int, ctypes.c_uint64)}


FALLBACK_HIT_NS = 20_000  # when the calibration cannot run: about what a hit costs on this Firecracker guest


class DutyCycle:
    """How many cycles the command uprobes stay detached after a cycle attached (pure).

    ``load`` = commands/s of the busiest process x CPU seconds one command costs it (two hits): the
    share of one CPU the uprobes take from that process while attached. Attached one cycle in
    ``off + 1`` keeps the average under ``budget``, so a process whose I/O is CPU-bound loses at most
    ``budget`` of its throughput. ``max_off`` bounds the wait (49: attached at least 2 % of the time).
    """

    def __init__(self, budget: float = 0.02, max_off: int = 49):
        self.budget, self.max_off = budget, max_off

    def off_cycles(self, commands_per_second: float, cost_ns_per_command: float) -> int:
        load = commands_per_second * cost_ns_per_command / 1e9
        if load <= self.budget:
            return 0
        return min(self.max_off, math.ceil(load / self.budget) - 1)


def cstr(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


def _latency(k, slots: list[int], total: int) -> LibiscsiLatency:
    sl = {s: int(c) for s, c in enumerate(slots) if c}
    return LibiscsiLatency(int(k.tgid), int(k.ctx), int(k.lun), decode.block_op_name(int(k.op)), sl, sum(sl.values()),
                           int(total))


def _context(k, v) -> LibiscsiContext:
    return LibiscsiContext(int(k.tgid), int(k.ctx), cstr(v.target), cstr(v.portal), None if v.lun < 0 else int(v.lun),
                           int(v.aborts), int(v.reconnects))


class LibiscsiProbe(Probe):
    name = "libiscsi"
    source_file = "libiscsi.bpf.c"
    description = "iSCSI command latency per QEMU process, context, LUN and op (uprobes on libiscsi.so.7)"
    library = "libiscsi.so.7"
    uprobes = (
        Uprobe("iscsi_scsi_command_async", "on_command"),
        Uprobe("scsi_free_scsi_task", "on_free"),
        Uprobe("iscsi_task_mgmt_abort_task_async", "on_abort", required=False),
        Uprobe("iscsi_reconnect", "on_reconnect", required=False),
        Uprobe("iscsi_set_targetname", "on_targetname", required=False),
        Uprobe("iscsi_full_connect_async", "on_full_connect", required=False),
        Uprobe("iscsi_full_connect_sync", "on_full_connect", required=False),
    )

    # the two uprobes every command hits, detached while sampled out (free first in, last out)
    SAMPLED = ("scsi_free_scsi_task", "iscsi_scsi_command_async")
    CALIBRATION_CALLS = 2000

    def __init__(self, opts=None):
        super().__init__(opts)
        self.duty = DutyCycle(self.opts.uprobe_budget)
        self.hit_ns: float | None = None  # what one uprobe hit costs a process here (calibrated at load)
        self._sampled: dict[str, tuple[str, int, int]] = {}  # symbol -> (fn_name, program fd, file offset)
        # records of idle (process, context, LUN, op) and contexts kept from the last read: shared by the history
        self._lats: Reuse[LibiscsiLatency] = Reuse()
        self._ctxs: Reuse[LibiscsiContext] = Reuse()
        self._tuples = Tuples()
        self._pmu = 0
        self._off_left = 0  # cycles still detached
        self._last: tuple[float, dict[int, int]] | None = None  # (time, commands per tgid) at the last read

    def extra_cflags(self, present):
        return [f"-DSLOT_MAX={SLOT_MAX}"]

    def attachments(self, present):
        """The compiler child attaches the rare calls; the two command uprobes are the agent's own
        (:meth:`attach_sampled`), so it can take them off and put them back without a compiler."""
        own = {u.fn_name for u in self.uprobes if u.symbol in self.SAMPLED}
        return ([a for a in super().attachments(present) if a.symbol not in self.SAMPLED]
                + [Attach("load", fn) for fn in sorted(own)])

    def on_loaded(self):
        for name, (key, leaf) in TABLES.items():
            self.bpf[name.encode()] = self.bpf.get_table(name.encode(), key, leaf)
        data = self.library_path.read_bytes()
        by_sym = {u.symbol: u for u in self.uprobes}
        for sym in self.SAMPLED:
            fn = by_sym[sym].fn_name
            self._sampled[sym] = (fn, self.bpf.programs[fn].fd, uprobes.symbol_offset(data, sym))
        self._pmu = uprobes.uprobe_pmu_type(self.opts.paths)
        self.attach_sampled()
        self.uprobes_attached = [u for u in self.uprobes if u in self.uprobes_attached or u.symbol in self.SAMPLED]
        self.report.tracepoints = sorted(u.label(self.library) for u in self.uprobes_attached)
        try:
            self.hit_ns = self.calibrate()
        except (OSError, AttributeError) as e:  # the library would not load here: assume a costly trap
            log.warning("libiscsi probe: cannot time a uprobe hit (%s); assuming %d ns", e, FALLBACK_HIT_NS)
            self.hit_ns = float(FALLBACK_HIT_NS)

    # -- sampling -------------------------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._off_left == 0

    def calibrate(self) -> float:
        """ns one uprobe hit costs the calling thread in wall time: scsi_free_scsi_task(NULL) (returns at once;
        so does the probe) timed with the uprobe attached, then detached. Wall time, not CPU time: on a
        virtual machine the trap may leave the guest, and that time is in no CPU account of the guest but
        still delays the caller. The fastest of a few batches, so another process's time slice is left out.
        Another tracer's breakpoint on the same function makes both alike: then only the probe's own run
        time is its cost (:meth:`cost_ns_per_command` adds it)."""
        fn = ctypes.CDLL(str(self.library_path)).scsi_free_scsi_task
        fn.argtypes, fn.restype = [ctypes.c_void_p], None

        def per_call() -> float:
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter_ns()
                for _ in range(self.CALIBRATION_CALLS // 5):
                    fn(None)
                best = min(best, (time.perf_counter_ns() - t0) / (self.CALIBRATION_CALLS // 5))
            return best

        on = per_call()
        self.detach_sampled()
        off = per_call()
        self.attach_sampled()
        return max(0.0, on - off)

    def detach_sampled(self) -> None:
        """Close the command uprobes' perf events: the kernel removes the breakpoints (submission first)."""
        fns = {fn for fn, _p, _o in self._sampled.values()}
        keep = []
        for a in sorted(self.bpf.attachments, key=lambda a: a.fn_name != "on_command"):
            if a.fn_name in fns:
                os.close(a.fd)
            else:
                keep.append(a)
        self.bpf.attachments = keep

    def attach_sampled(self) -> None:
        """Attach the command uprobes again (free first, so every timed submission's free is seen); tasks left in
        the in-flight table while detached are dropped."""
        inflight = self.bpf[b"inflight"]
        for k in list(inflight.keys()):
            try:
                del inflight[k]
            except OSError:
                pass
        for sym in self.SAMPLED:
            fn, prog, off = self._sampled[sym]
            fd = uprobes.attach(prog, self.library_path, off, self._pmu)
            self.bpf.attachments.append(Attachment("uprobe", f"{self.library}:{sym}", fn, fd))

    def program_fds(self) -> dict[str, int]:
        """Every uprobe's program, attached or sampled out (its run counters stay monotonic), each fd once
        (iscsi_full_connect_sync and _async share one program)."""
        if self.bpf is None:
            return {}
        out, seen = {}, set()
        for u in self.uprobes_attached:
            p = self.bpf.programs.get(u.fn_name)
            if p is not None and p.fd not in seen:
                seen.add(p.fd)
                out[u.label(self.library)] = p.fd
        return out

    def cost_ns_per_command(self, stats) -> float:
        """Two hits, each a trap (calibrated, wall time) plus the program's own run time (BPF stats, else ~600 ns
        here). rate x this = the share of a process's time the uprobes take while attached: the throughput a
        process whose I/O is bound by that time loses (the benchmark's depth-32 run: -56 % measured)."""
        prog = stats.ns_per_event if stats is not None and stats.ns_per_event else 600.0
        return 2 * ((self.hit_ns or 0.0) + prog)

    def _cycle(self, lats, stats) -> dict:
        """After a read: the busiest process's commands/s while attached, and what comes next (one cycle)."""
        now = time.monotonic()
        per_tgid: dict[int, int] = {}
        for x in lats:
            per_tgid[x.tgid] = per_tgid.get(x.tgid, 0) + x.count
        rate = 0.0
        if self.attached and self._last is not None and now > self._last[0]:
            prev = self._last[1]
            rate = max([(n - prev.get(t, 0)) / (now - self._last[0]) for t, n in per_tgid.items()] + [0.0])
        cost = self.cost_ns_per_command(stats)
        if self.attached and self._last is not None:
            off = self.duty.off_cycles(rate, cost)
            if off:
                self.detach_sampled()
                self._off_left = off
        elif not self.attached:
            self._off_left -= 1
            if self._off_left == 0:
                self.attach_sampled()
        self._last = (now, per_tgid)
        return {"attached": self.attached, "cycles_detached_left": self._off_left,
                "busiest_commands_per_second": round(rate, 1), "cost_ns_per_command": round(cost),
                "hit_ns": None if self.hit_ns is None else round(self.hit_ns), "budget": self.duty.budget}

    def events_and_lost(self):
        t = self.percpu_totals("totals", TOT_N)
        return t[TOT_SUBMITTED] + t[TOT_COMPLETED] + t[TOT_UNTIMED] + t[TOT_ABORTS] + t[TOT_RECONNECTS], t[TOT_UNTIMED]

    def read(self) -> LibiscsiData:
        b = self.bpf
        lats = []
        for k, percpu in b[b"lat"].items():
            slots = [0] * NSLOTS
            total = 0
            for v in percpu:
                for s in range(NSLOTS):
                    slots[s] += v.slots[s]
                total += v.sum_ns
            lats.append(self._lats.get((int(k.tgid), int(k.ctx), int(k.lun), int(k.op), tuple(slots), int(total)),
                                       lambda k=k, slots=slots, total=total: _latency(k, slots, total)))
        self._lats.end_cycle()
        lats.sort(key=lambda x: (x.tgid, x.ctx, x.lun, decode.BLOCK_OPS.index(x.op)))
        ctxs = [self._ctxs.get(bytes(k) + bytes(v), lambda k=k, v=v: _context(k, v)) for k, v in b[b"ctxs"].items()]
        self._ctxs.end_cycle()
        ctxs.sort(key=lambda c: (c.tgid, c.ctx))
        inflight: dict[tuple[int, int, int], int] = {}
        if self.attached:  # detached, the table holds what was in flight when sampling paused
            for k, v in b[b"inflight"].items():
                key = (int(k.tgid), int(v.ctx), int(v.lun))
                inflight[key] = inflight.get(key, 0) + 1
        t = self.percpu_totals("totals", TOT_N)
        totals = {"submitted": t[TOT_SUBMITTED], "completed": t[TOT_COMPLETED], "untimed": t[TOT_UNTIMED],
                  "aborts": t[TOT_ABORTS], "reconnects": t[TOT_RECONNECTS]}
        stats = self.stats()
        sampling = self._cycle(lats, stats)
        return LibiscsiData(self._tuples.same("latencies", lats), self._tuples.same("contexts", ctxs), inflight, totals,
                            SLOT_MAX, stats, self._tuples.same("tracepoints", self.report.tracepoints), sampling)
