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
tracepoint: measured in docs/performance.md (``make bench-uprobes``).

Lost: tasks freed whose submission was not seen (``untimed``: in flight
when the probe attached, or pushed out of the bounded in-flight map).
"""

from __future__ import annotations

import ctypes

from agent.ebpf import decode
from agent.ebpf.loader import Probe, Uprobe
from agent.records.ebpf import SLOT_MAX, LibiscsiContext, LibiscsiData, LibiscsiLatency

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


def cstr(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


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

    def extra_cflags(self, present):
        return [f"-DSLOT_MAX={SLOT_MAX}"]

    def on_loaded(self):
        for name, (key, leaf) in TABLES.items():
            self.bpf[name.encode()] = self.bpf.get_table(name.encode(), key, leaf)

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
            sl = {s: int(c) for s, c in enumerate(slots) if c}
            lats.append(LibiscsiLatency(int(k.tgid), int(k.ctx), int(k.lun), decode.block_op_name(int(k.op)), sl,
                                        sum(sl.values()), int(total)))
        lats.sort(key=lambda x: (x.tgid, x.ctx, x.lun, decode.BLOCK_OPS.index(x.op)))
        ctxs = [LibiscsiContext(int(k.tgid), int(k.ctx), cstr(v.target), cstr(v.portal), None if v.lun < 0 else int(v.lun),
                                int(v.aborts), int(v.reconnects)) for k, v in b[b"ctxs"].items()]
        ctxs.sort(key=lambda c: (c.tgid, c.ctx))
        inflight: dict[tuple[int, int, int], int] = {}
        for k, v in b[b"inflight"].items():
            key = (int(k.tgid), int(v.ctx), int(v.lun))
            inflight[key] = inflight.get(key, 0) + 1
        t = self.percpu_totals("totals", TOT_N)
        totals = {"submitted": t[TOT_SUBMITTED], "completed": t[TOT_COMPLETED], "untimed": t[TOT_UNTIMED],
                  "aborts": t[TOT_ABORTS], "reconnects": t[TOT_RECONNECTS]}
        return LibiscsiData(tuple(lats), tuple(ctxs), inflight, totals, SLOT_MAX, self.stats(),
                            tuple(self.report.tracepoints))
