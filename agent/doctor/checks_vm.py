"""Checks of VM disks on iSCSI: cache mode, error policies, libiscsi keepalive.

Inputs: the libvirt domain XML of each running VM (``<driver cache=
error_policy= rerror_policy=>``, via the libvirt source; QMP-only VMs carry
no policies), the storage paths (``Snapshot.paths``) to tell
which host-backed disks sit on kernel iSCSI, the inet_diag timer of each
libiscsi socket, and the VM's QEMU log.

QEMU defaults when libvirt says nothing: cache = writeback, werror = enospc
(stop only on ENOSPC, report any other write error), rerror = report
(QEMU docs, -drive ``cache=``, ``werror=``, ``rerror=``).
"""

from __future__ import annotations

import glob
import os

from agent.doctor import DoctorInput, Result, check

REF_CACHE = ('libvirt domain XML docs, "Hard drives, floppy disks, CDROMs": driver attribute cache; '
             'QEMU docs, -drive cache= ("cache.direct", "cache.writeback"); libvirt migration docs (unsafe '
             "migration with cache other than none/directsync)")
REF_ERR = ('libvirt domain XML docs, "Hard drives, floppy disks, CDROMs": driver attributes error_policy and '
           "rerror_policy; QEMU docs, -drive werror= / rerror=")
REF_KEEPALIVE = ("QEMU block/iscsi.c (NOP_INTERVAL 5000 ms, MAX_NOP_FAILURES 3, iscsi_nop_timed_event); "
                 'QEMU docs, block drivers "iSCSI" and -iscsi options; tcp(7) SO_KEEPALIVE; '
                 "inet_diag idiag_timer (linux/inet_diag.h)")

# inet_diag idiag_timer values (net/ipv4/tcp_diag.c, as `ss -o` prints them)
TIMERS = {0: "none", 1: "retransmit", 2: "keepalive", 3: "time-wait", 4: "zero-window probe"}


def iscsi_disks(inp: DoctorInput) -> list[tuple]:
    """(vm, disk, backend, detail) of every VM disk on iSCSI: libiscsi, or a host device on a kernel session."""
    out = []
    host_iscsi: dict[tuple[str, str], list] = {}
    try:
        for p in inp.snapshot.paths:
            if p.backend == "host-iscsi":
                host_iscsi.setdefault((p.vm, p.disk), []).append(p)
    except Exception:  # a join that fails must not hide the libiscsi disks
        pass
    for vm in inp.snapshot.vms:
        for disk in vm.disks:
            if disk.backend == "libiscsi":
                out.append((vm, disk, "libiscsi", f"{disk.iqn} LUN {disk.lun}"))
            elif (vm.name, disk.target) in host_iscsi:
                ps = host_iscsi[(vm.name, disk.target)]
                via = ps[0].multipath or ps[0].host_device
                out.append((vm, disk, "host-iscsi", f"{disk.source} on {via} ({ps[0].target} LUN {ps[0].lun})"))
    return out


def _no_disks(inp: DoctorInput, name: str, ref: str) -> list[Result]:
    reasons = [r for r in (inp.health("libvirt"),) if r]
    return [Result(name, "skipped", "host",
                   "no VM disks on iSCSI" + (f" ({'; '.join(reasons)})" if reasons else ""), reference=ref)]


@check("disk_cache", 50, "cache mode of VM disks on iSCSI")
def disk_cache(inp: DoctorInput) -> list[Result]:
    """cache= of each VM disk on iSCSI: none or directsync on shared storage.

    A host-backed disk with another mode goes through the host page cache:
    writes acknowledged to the guest sit in host RAM (lost if the host
    dies) and another host does not see them, so libvirt refuses live
    migration as unsafe. For a libiscsi disk there is no host page cache,
    but libvirt still treats any mode but none/directsync as unsafe to
    migrate. ``unsafe`` ignores the guest's flushes: data loss on any crash.
    """
    name = "disk_cache"
    disks = iscsi_disks(inp)
    if not disks:
        return _no_disks(inp, name, REF_CACHE)
    out = []
    for vm, disk, backend, detail in disks:
        subj = f"{vm.name}/{disk.target}"
        mode = disk.cache
        shown = mode or "not set (QEMU default: writeback)"
        values = {"vm": vm.name, "disk": disk.target, "backend": backend, "cache": mode}
        if vm.manager != "libvirt" and mode is None:
            out.append(Result(name, "info", subj, f"{backend} {detail}: cache mode not known (QMP-only VM)",
                              reference=REF_CACHE, values=values))
        elif mode in ("none", "directsync"):
            out.append(Result(name, "ok", subj, f"{backend} {detail}: cache={mode}", reference=REF_CACHE, values=values))
        elif mode == "unsafe":
            out.append(Result(
                name, "problem", subj, f"{backend} {detail}: cache=unsafe",
                why="the guest's flushes are ignored: a host crash or power loss loses writes the guest believes are "
                    "on disk (file system and database corruption)",
                reference=REF_CACHE, fix="set <driver cache='none'/>", values=values))
        else:
            why = ("writes go through the host page cache: acknowledged data sits in host RAM (lost if the host "
                   "fails, invisible to other hosts), reads may be stale after another host wrote, and libvirt "
                   "refuses live migration as unsafe")
            if backend == "libiscsi":
                why = ("QEMU talks iSCSI itself, so no host page cache is involved, but libvirt treats any mode other "
                       "than none/directsync on a network disk as unsafe for live migration (virsh migrate fails "
                       "without --unsafe)")
            out.append(Result(name, "warning", subj, f"{backend} {detail}: cache={shown}", why=why,
                              reference=REF_CACHE, fix="set <driver cache='none'/> (or directsync)", values=values))
    return out


@check("disk_error_policy", 60, "error policies of VM disks on iSCSI")
def disk_error_policy(inp: DoctorInput) -> list[Result]:
    """error_policy / rerror_policy of each VM disk on iSCSI.

    When a path outage outlasts the iSCSI and multipath timeouts, I/O fails.
    With ``stop`` QEMU pauses the VM and keeps the failed requests; after
    the path is back, ``virsh resume`` retries them and the guest never sees
    an error (libvirt does not resume by itself: someone must). With
    ``report`` (QEMU's default for reads; writes default to ``enospace``,
    which reports everything but ENOSPC) the guest gets EIO: it keeps
    running, but Linux guests typically remount file systems read-only and
    databases abort. ``ignore`` drops the error and continues: silent
    corruption.
    """
    name = "disk_error_policy"
    disks = iscsi_disks(inp)
    if not disks:
        return _no_disks(inp, name, REF_ERR)
    out = []
    for vm, disk, backend, detail in disks:
        subj = f"{vm.name}/{disk.target}"
        w = disk.error_policy
        r = disk.rerror_policy or disk.error_policy
        eff_w = w or "enospace"
        eff_r = r or "report"
        values = {"vm": vm.name, "disk": disk.target, "backend": backend, "error_policy": w,
                  "rerror_policy": disk.rerror_policy, "effective_write": eff_w, "effective_read": eff_r}
        shown = (f"error_policy={w or 'not set'}"
                 + (f", rerror_policy={disk.rerror_policy}" if disk.rerror_policy else "")
                 + f" (writes: {eff_w}, reads: {eff_r})")
        if vm.manager != "libvirt" and w is None:
            out.append(Result(name, "info", subj, f"{backend} {detail}: policies not known (QMP-only VM)",
                              reference=REF_ERR, values=values))
        elif "ignore" in (eff_w, eff_r):
            out.append(Result(
                name, "problem", subj, f"{backend} {detail}: {shown}",
                why="I/O errors are dropped and the guest carries on as if the I/O had succeeded: silent data "
                    "corruption after any path outage",
                reference=REF_ERR, fix="set <driver error_policy='stop'/>", values=values))
        elif eff_w in ("report", "enospace"):
            out.append(Result(
                name, "warning", subj, f"{backend} {detail}: {shown}",
                why="a path outage longer than the iSCSI/multipath timeouts becomes I/O errors inside the guest "
                    "(read-only file systems, crashed databases); with error_policy='stop' the VM pauses instead "
                    "and resumes cleanly (virsh resume) once the path is back — at the price of a paused VM that "
                    "someone or something must resume",
                reference=REF_ERR, fix="set <driver error_policy='stop'/> and plan who resumes paused VMs",
                values=values))
        elif eff_r == "report":
            out.append(Result(
                name, "info", subj, f"{backend} {detail}: {shown}",
                why="writes pause the VM on error; read errors still reach the guest (usually retried by the "
                    "application, no data lost)",
                reference=REF_ERR, values=values))
        else:
            out.append(Result(name, "ok", subj, f"{backend} {detail}: {shown}", reference=REF_ERR, values=values))
    return out


def _qemu_log(inp: DoctorInput, vm_name: str) -> str | None:
    """The tail of the VM's QEMU log, found through storage_log.qemu_logs (None if none)."""
    for pattern in inp.config.storage_log.qemu_logs:
        for path in glob.glob(pattern):
            if os.path.basename(path) == f"{vm_name}.log":
                try:
                    with open(path, "rb") as f:
                        f.seek(0, os.SEEK_END)
                        f.seek(max(0, f.tell() - 256 * 1024))
                        return f.read().decode("utf-8", "replace")
                except OSError:
                    return None
    return None


@check("libiscsi_keepalive", 70, "liveness checks of QEMU libiscsi connections")
def libiscsi_keepalive(inp: DoctorInput) -> list[Result]:
    """How a dead path is noticed on each QEMU libiscsi disk.

    QEMU's iSCSI driver sends a NOP-Out every 5 s and reconnects when more
    than 3 are unanswered (block/iscsi.c NOP_INTERVAL, MAX_NOP_FAILURES):
    built in, on by default, not configurable; it logs "iSCSI: NOP timeout.
    Reconnecting..." and, if it ever stops, "failed to sent NOP-Out.
    Disabling NOP messages." (both looked for in the VM's QEMU log). TCP
    keepalive on the socket is seen only when the socket is idle (inet_diag
    timer 2 = keepalive); a busy socket shows the retransmit timer instead,
    and then keepalive is reported as unknown.
    """
    name = "libiscsi_keepalive"
    disks = [(vm, d) for vm, d, backend, _ in iscsi_disks(inp) if backend == "libiscsi"]
    if not disks:
        return [Result(name, "skipped", "host", "no QEMU libiscsi disks" + (
            f" ({inp.health('libvirt')})" if inp.health("libvirt") else ""), reference=REF_KEEPALIVE)]
    conns_by_disk: dict[tuple, list[str]] = {}
    try:
        for p in inp.snapshot.paths:
            if p.backend == "libiscsi" and p.connection:
                conns_by_disk.setdefault((p.vm, p.disk), []).append(p.connection)
    except Exception:
        pass
    timers = None
    timer_note = "not observed (judging a recording)"
    if inp.socket_timers is not None:
        try:
            timers = inp.socket_timers()
        except OSError as e:
            timer_note = f"not observable: {e}"
    out = []
    for vm, disk in disks:
        subj = f"{vm.name}/{disk.target}"
        conns = conns_by_disk.get((vm.name, disk.target), [])
        seen = sorted({t for c in conns for t in (timers or {}).get(c, [])})
        if timers is None:
            tcp_ka = f"unknown, {timer_note}"
        elif not conns:
            tcp_ka = "unknown, no TCP connection of this disk found"
        elif 2 in seen:
            tcp_ka = "on (keepalive timer seen on the idle socket)"
        elif 0 in seen:
            tcp_ka = "off (idle socket with no timer)"
        elif seen:
            tcp_ka = f"unknown, the socket was never idle when sampled (timers: {', '.join(TIMERS.get(t, str(t)) for t in seen)})"
        else:
            tcp_ka = "unknown, socket not found when sampled"
        log = _qemu_log(inp, vm.name)
        disabled = log is not None and "Disabling NOP messages" in log
        reconnects = log.count("NOP timeout. Reconnecting") if log is not None else None
        values = {"vm": vm.name, "disk": disk.target, "connections": conns, "nop_interval_s": 5,
                  "nop_max_failures": 3, "tcp_keepalive": tcp_ka.split(" ")[0].rstrip(","),
                  "socket_timers_seen": [TIMERS.get(t, str(t)) for t in seen],
                  "nop_disabled_in_log": disabled if log is not None else None,
                  "nop_reconnects_in_log": reconnects}
        log_txt = ("QEMU log not found" if log is None else
                   f"QEMU log: {reconnects} NOP-timeout reconnect(s)" + (", NOP disabled" if disabled else ""))
        if disabled:
            out.append(Result(
                name, "warning", subj,
                f"QEMU stopped sending NOP-Outs on this disk ({log_txt}); TCP keepalive {tcp_ka}",
                why="without NOP-Outs a dead portal is noticed only by TCP retransmission timeouts (minutes) while "
                    "I/O is outstanding, and never while the disk is idle",
                reference=REF_KEEPALIVE, fix="restart the VM's QEMU (migrate or power-cycle) to re-arm the NOP timer",
                values=values))
            continue
        out.append(Result(
            name, "ok", subj,
            f"QEMU NOP-Out every 5 s, reconnect after 3 unanswered (~20 s); TCP keepalive {tcp_ka}; {log_txt}",
            why="QEMU's NOP-Out ping finds a dead portal in about 20 s even when the disk is idle; libiscsi then "
                "reconnects to the same portal (single path: see single_path)",
            reference=REF_KEEPALIVE, values=values))
    return out
