"""Per-VM-disk latency histograms: every VM disk joined to the histogram
that measures it (a pure join over one snapshot's records, no I/O).

Sources, by the disk's backend:

* ``libiscsi``: QEMU's own iSCSI initiator (``<disk type='network'
  protocol='iscsi'>``). The ``ebpf_libiscsi`` probe keys its histograms by
  (QEMU pid, iSCSI context, LUN, op). pid -> VM through ``snap.vm_by_pid``;
  context -> disk: when the probe saw the context log in
  (``iscsi_set_targetname``), its target IQN and the command's LUN pick the
  VM's disk with that IQN and LUN; a VM started before the probe has no such
  record, and the LUN alone picks the VM's only libiscsi disk with that LUN.
  Two disks of one VM that the available facts cannot tell apart (same LUN
  on different targets, login not seen) are reported as ambiguous, never
  guessed. Time = ``iscsi_scsi_command_async`` -> ``scsi_free_scsi_task``
  (the command as QEMU's iscsi driver sees it, without QEMU's own queueing
  above it).
* ``block``: a file or block device under the host block layer. The
  ``ebpf_block_io`` probe's per-process histograms (``BlockIoData.processes``:
  tgid, device, op; total latency, insert or issue -> completion) of the
  VM's QEMU pid (its I/O threads are the same tgid) on the device under the
  disk (``host_devno``; a partition's I/O is counted on its whole disk).
  Two disks of one VM on one host device share that process histogram:
  reported as ambiguous for both.
* ``qmp``: QEMU's own block latency histograms (``block-latency-histogram-set``,
  opt-in, stand-alone QEMU through QMP): the guest-visible time.

Each histogram is cumulative since its process (or probe) started, with its
finite bucket bounds in ns (log2 for the eBPF sources, QEMU's own for QMP)
and one overflow bucket. A disk without a histogram is listed in
``missing`` with the reason; a probe histogram no disk claims is listed in
``unattributed`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from agent.records.ebpf import SLOT_MAX
from agent.records.vms import Vm, VmDisk

if TYPE_CHECKING:
    from agent.records.snapshot import Snapshot

LIBISCSI, BLOCK, QMP = "libiscsi", "block", "qmp"
SOURCES = (LIBISCSI, BLOCK, QMP)
OP_ORDER = ("read", "write", "flush", "discard", "other")


@lru_cache(maxsize=8)
def log2_bounds_ns(slot_max: int = SLOT_MAX) -> tuple[int, ...]:
    """Upper bounds of log2 slots 0..slot_max (bpf_log2l: slot s = [2^(s-1), 2^s) ns); one tuple shared by every
    histogram of every snapshot in the history."""
    return tuple(1 << s for s in range(slot_max + 1))


def slots_to_counts(slots: dict[int, int], slot_max: int = SLOT_MAX) -> tuple[int, ...]:
    """log2 slot counts -> per-bucket counts over :func:`log2_bounds_ns` + the overflow bucket."""
    out = [0] * (slot_max + 2)
    for s, c in slots.items():
        out[min(int(s), slot_max + 1)] += int(c)
    return tuple(out)


@dataclass(frozen=True)
class DiskLatency:
    """One VM disk's latency histogram for one op, from one source (cumulative)."""

    vm: str
    disk: str
    op: str  # read | write | flush | discard | other
    source: str  # libiscsi | block | qmp
    bounds_ns: tuple[int, ...]  # upper bounds of the finite buckets, increasing
    counts: tuple[int, ...]  # per bucket (not cumulative): len(bounds_ns) + 1, the last is the overflow
    count: int
    sum_ns: int | None  # None: the source keeps no sum
    pid: int | None = None

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in seconds, cumulative count) for each finite bucket, then (inf, count)."""
        out, acc = [], 0
        for b, c in zip(self.bounds_ns, self.counts):
            acc += c
            out.append((b / 1e9, acc))
        out.append((float("inf"), acc + sum(self.counts[len(self.bounds_ns):])))
        return out


@dataclass(frozen=True)
class DiskIscsi:
    """A libiscsi disk's command-level state from the probe (cumulative counts)."""

    vm: str
    disk: str
    pid: int
    inflight: int  # commands submitted and not yet freed, now
    aborts: int  # iscsi_task_mgmt_abort_task_async calls (QEMU giving up on a command)
    reconnects: int  # iscsi_reconnect calls
    target: str = ""  # from the login, when the probe saw it
    portal: str = ""


@dataclass(frozen=True)
class Unattributed:
    source: str
    pid: int
    detail: str  # what the probe keyed it by (context, LUN, device)
    reason: str


@dataclass(frozen=True)
class VmDiskLatencies:
    histograms: tuple[DiskLatency, ...] = ()
    iscsi: tuple[DiskIscsi, ...] = ()
    missing: tuple[tuple[str, str, str], ...] = ()  # (vm, disk, why no histogram)
    unattributed: tuple[Unattributed, ...] = ()

    def for_disk(self, vm: str, disk: str) -> tuple[DiskLatency, ...]:
        return tuple(h for h in self.histograms if (h.vm, h.disk) == (vm, disk))


@dataclass
class _Acc:
    counts: list[int]
    count: int = 0
    sum_ns: int = 0


def _merge(acc: dict, key, counts: tuple[int, ...], count: int, sum_ns: int) -> None:
    a = acc.get(key)
    if a is None:
        a = acc[key] = _Acc([0] * len(counts))
    for i, c in enumerate(counts):
        a.counts[i] += c
    a.count += count
    a.sum_ns += sum_ns


def _libiscsi_disk(vm: Vm, lun: int, target: str) -> tuple[VmDisk | None, str]:
    disks = [d for d in vm.disks if d.backend == "libiscsi"]
    if not disks:
        return None, f"VM {vm.name} has no libiscsi disk"
    by_lun = [d for d in disks if d.lun == lun]
    if target:
        hit = [d for d in by_lun if d.iqn == target]
        if len(hit) == 1:
            return hit[0], ""
        if not hit:
            return None, f"VM {vm.name} has no libiscsi disk {target} LUN {lun}"
        return None, f"ambiguous: disks {', '.join(d.target for d in hit)} of VM {vm.name} are all {target} LUN {lun}"
    if len(by_lun) == 1:
        return by_lun[0], ""
    if not by_lun:
        return None, f"VM {vm.name} has no libiscsi disk with LUN {lun}"
    return None, (f"ambiguous: disks {', '.join(d.target for d in by_lun)} of VM {vm.name} all have LUN {lun} and "
                  "the probe did not see this context log in (VM started before the probe)")


def _join_libiscsi(snap: "Snapshot", vms: dict[str, Vm], hists: dict, iscsi: list, unattr: list) -> None:
    data = snap.libiscsi
    if data is None:
        return
    ctx_info = {(c.tgid, c.ctx): c for c in data.contexts}
    claimed: dict[tuple[int, int, int], tuple[Vm, VmDisk] | None] = {}
    keys = {(x.tgid, x.ctx, x.lun) for x in data.latencies} | set(data.inflight)
    for tgid, ctx, lun in sorted(keys):
        name = snap.vm_by_pid.get(tgid)
        detail = f"context {ctx:#x} LUN {lun}"
        if name is None:
            unattr.append(Unattributed(LIBISCSI, tgid, detail, f"pid {tgid} is not a known VM's QEMU"))
            claimed[(tgid, ctx, lun)] = None
            continue
        c = ctx_info.get((tgid, ctx))
        disk, why = _libiscsi_disk(vms[name], lun, c.target if c else "")
        if disk is None:
            unattr.append(Unattributed(LIBISCSI, tgid, detail, why))
        claimed[(tgid, ctx, lun)] = (vms[name], disk) if disk else None
    bounds = log2_bounds_ns(data.slot_max)
    for x in data.latencies:
        hit = claimed.get((x.tgid, x.ctx, x.lun))
        if hit:
            _merge(hists, (hit[0].name, hit[1].target, x.op, LIBISCSI, bounds, x.tgid),
                   slots_to_counts(x.slots, data.slot_max), x.count, x.sum_ns)
    per_disk: dict[tuple[str, str], dict] = {}
    for key, hit in claimed.items():
        if not hit:
            continue
        vm, disk = hit
        d = per_disk.setdefault((vm.name, disk.target), {"pid": key[0], "inflight": 0, "aborts": 0, "reconnects": 0,
                                                          "target": "", "portal": ""})
        d["inflight"] += data.inflight.get(key, 0)
        c = ctx_info.get((key[0], key[1]))
        if c is not None and not d.get(("ctx", key[1])):
            d[("ctx", key[1])] = True  # one context's counts once, even when it serves several ops
            d["aborts"] += c.aborts
            d["reconnects"] += c.reconnects
            d["target"] = d["target"] or c.target
            d["portal"] = d["portal"] or c.portal
    for (vm, disk), d in sorted(per_disk.items()):
        iscsi.append(DiskIscsi(vm, disk, d["pid"], d["inflight"], d["aborts"], d["reconnects"], d["target"], d["portal"]))


def _join_block(snap: "Snapshot", vms: dict[str, Vm], hists: dict, unattr: list, missing_why: dict) -> None:
    bio = snap.block_io
    if bio is None:
        return
    # per (tgid, device, op) histograms (BlockProcess.slots); records of older agents have none
    per_proc = tuple(p for p in bio.processes if p.slots) or None
    blockdevs = snap.block_devices
    for vm in vms.values():
        host_disks = [d for d in vm.disks if d.backend == "host"]
        if not host_disks or not vm.pid:
            continue
        by_dev: dict[str, list[VmDisk]] = {}
        for d in host_disks:
            name = _device_name(d.host_devno, blockdevs, bio)
            if name is None:
                missing_why[(vm.name, d.target)] = (f"host device {d.host_devno} under {d.source} not named"
                                                    if d.host_devno else f"no host device known under {d.source}")
                continue
            by_dev.setdefault(name, []).append(d)
        for dev, disks in by_dev.items():
            if len(disks) > 1:
                why = (f"ambiguous: disks {', '.join(d.target for d in disks)} of VM {vm.name} are all on host device "
                       f"{dev}; the block probe keys by (process, device)")
                for d in disks:
                    missing_why[(vm.name, d.target)] = why
                continue
            if per_proc is None:
                missing_why[(vm.name, disks[0].target)] = ("no per-process histograms from the block_io probe (no "
                                                           "block I/O seen yet, or an agent that keeps none)")
                continue
            for h in per_proc:
                if h.tgid == vm.pid and h.device == dev:
                    _merge(hists, (vm.name, disks[0].target, h.op, BLOCK, log2_bounds_ns(bio.slot_max), vm.pid),
                           slots_to_counts(h.slots, bio.slot_max), h.count, h.sum_ns)


def _device_name(devno: str | None, blockdevs, bio) -> str | None:
    if not devno:
        return None
    if blockdevs is not None:
        name = blockdevs.by_devno(devno)
        if name:
            return name
    for h in bio.histograms:
        if f"{h.major}:{h.minor}" == devno:
            return h.device
    return None


def _join_qmp(vms: dict[str, Vm], out: list) -> None:
    for vm in vms.values():
        for d in vm.disks:
            s = d.stats
            for op, h in ((s.histograms or {}) if s else {}).items():
                bounds = tuple(int(b) for b in h["boundaries_ns"])
                bins = [int(n) for n in h["bins"]]
                counts = tuple(bins + [0] * (len(bounds) + 1 - len(bins)))[: len(bounds) + 1]
                total = {"rd": s.rd_time_ns, "wr": s.wr_time_ns, "flush": s.fl_time_ns}.get(op)
                out.append(DiskLatency(vm.name, d.target, {"rd": "read", "wr": "write"}.get(op, op), QMP, bounds, counts,
                                       sum(counts), total, vm.pid))


def build_disk_latency(snap: "Snapshot") -> VmDiskLatencies:
    vms = {vm.name: vm for vm in snap.vms}
    hists: dict = {}
    iscsi: list[DiskIscsi] = []
    unattr: list[Unattributed] = []
    missing_why: dict[tuple[str, str], str] = {}
    _join_libiscsi(snap, vms, hists, iscsi, unattr)
    _join_block(snap, vms, hists, unattr, missing_why)
    out = [DiskLatency(vm, disk, op, src, bounds, tuple(a.counts), a.count, a.sum_ns, pid)
           for (vm, disk, op, src, bounds, pid), a in hists.items()]
    _join_qmp(vms, out)
    out.sort(key=lambda h: (h.vm, h.disk, SOURCES.index(h.source), OP_ORDER.index(h.op) if h.op in OP_ORDER else 99))
    have = {(h.vm, h.disk) for h in out}
    missing = []
    for vm in vms.values():
        for d in vm.disks:
            if (vm.name, d.target) in have:
                continue
            why = missing_why.get((vm.name, d.target))
            if why is None:
                why = _no_histogram_reason(snap, vm, d)
            missing.append((vm.name, d.target, why))
    return _shared(VmDiskLatencies(tuple(out), tuple(iscsi), tuple(missing), tuple(unattr)))


# the last build's histograms by (vm, disk, op, source, pid): every snapshot of the agent's history keeps its
# own VmDiskLatencies (a cached property), and an idle disk's histogram is the same from one cycle to the next
_last: dict[tuple, DiskLatency] = {}


def _shared(d: VmDiskLatencies) -> VmDiskLatencies:
    """``d`` holding the last build's DiskLatency (its ~38 bucket counts) wherever a disk's histogram did not
    change: the history holds it once. Equal records either way; only which object differs."""
    global _last
    last, cur, out = _last, {}, []
    for h in d.histograms:
        key = (h.vm, h.disk, h.op, h.source, h.pid)
        p = last.get(key)
        if (p is not None and p.count == h.count and p.sum_ns == h.sum_ns and p.counts == h.counts
                and p.bounds_ns == h.bounds_ns):
            h = p
        cur[key] = h
        out.append(h)
    _last = cur
    return VmDiskLatencies(tuple(out), d.iscsi, d.missing, d.unattributed)


def _no_histogram_reason(snap: "Snapshot", vm: Vm, d: VmDisk) -> str:
    if d.backend == "libiscsi":
        if snap.libiscsi is None:
            return "no libiscsi probe data (ebpf_libiscsi source: see kvmscope probes check)"
        return "no command of this disk seen by the libiscsi probe yet"
    if d.backend == "host":
        if snap.block_io is None:
            return "no block probe data (ebpf_block_io source: see kvmscope probes check)"
        return "no block I/O of this VM's QEMU on the disk's host device seen yet"
    return f"no latency source for backend {d.backend}"


# -- over an interval: the percentiles top, Elasticsearch and diagnose read ------------------------------------------

# the histogram an interval's percentiles come from, when a disk has several: what the guest sees first
PREFERENCE = (QMP, LIBISCSI, BLOCK)


@dataclass(frozen=True)
class DiskPercentiles:
    """One VM disk's latency over an interval, from one histogram source (reads, writes, discards, others; no
    flushes). A percentile is the upper bound of the bucket that holds it (inf: the overflow bucket)."""

    vm: str
    disk: str
    source: str
    requests: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None  # histogram sum / count (None when the source keeps no sum)


def quantile_ns(bounds_ns: tuple[int, ...], counts, q: float) -> float | None:
    """Upper bound (ns) of the bucket holding quantile q of per-bucket ``counts`` (last = overflow: inf)."""
    n = sum(counts)
    if n <= 0:
        return None
    acc = 0
    for i, c in enumerate(counts):
        acc += c
        if acc >= q * n:
            return float(bounds_ns[i]) if i < len(bounds_ns) else float("inf")
    return float("inf")


def _delta(before: DiskLatency | None, after: DiskLatency) -> tuple[tuple[int, ...], int | None]:
    """Per-bucket counts and sum over the interval; the whole of ``after`` when ``before`` is not its past
    (another process, other bounds, or a counter went down: a restart)."""
    if (before is None or before.bounds_ns != after.bounds_ns or before.pid != after.pid
            or any(b > a for a, b in zip(after.counts, before.counts))):
        return after.counts, after.sum_ns
    s = None if after.sum_ns is None or before.sum_ns is None else after.sum_ns - before.sum_ns
    return tuple(a - b for a, b in zip(after.counts, before.counts)), s


def disk_percentiles(before: VmDiskLatencies | None, after: VmDiskLatencies,
                     sources: tuple[str, ...] = PREFERENCE) -> dict[tuple[str, str], DiskPercentiles]:
    """(vm, disk) -> its latency over the interval between two snapshots' histograms (``before`` None: since the
    histograms started), from the first of ``sources`` that saw requests in it. A latency budget compares
    sources of one disk: ``sources=(LIBISCSI,)`` gives the iSCSI command time under the guest-visible one
    (libvirt's time/reqs mean, or ``(QMP,)``)."""
    prev = {(h.vm, h.disk, h.op, h.source): h for h in (before.histograms if before else ())}
    acc: dict[tuple[str, str, str], list] = {}
    for h in after.histograms:
        if h.op == "flush":
            continue
        counts, s = _delta(prev.get((h.vm, h.disk, h.op, h.source)), h)
        a = acc.setdefault((h.vm, h.disk, h.source), [h.bounds_ns, [0] * len(counts), 0])
        if a[0] != h.bounds_ns:
            continue  # one source keeps one set of bounds per disk
        a[1] = [x + y for x, y in zip(a[1], counts)]
        a[2] = None if s is None or a[2] is None else a[2] + s
    out: dict[tuple[str, str], DiskPercentiles] = {}
    for src in sources:
        for (vm, disk, source), (bounds, counts, s) in sorted(acc.items()):
            n = sum(counts)
            if source != src or (vm, disk) in out or n == 0:
                continue

            def ms(q):
                v = quantile_ns(bounds, counts, q)
                return None if v is None else v / 1e6

            out[(vm, disk)] = DiskPercentiles(vm, disk, source, n, ms(0.5), ms(0.9), ms(0.99),
                                              None if s is None else s / n / 1e6)
    return out
