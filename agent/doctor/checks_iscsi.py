"""Checks of the open-iscsi / dm-multipath configuration and of path redundancy.

Inputs: ``/etc/iscsi/iscsid.conf``, ``/etc/multipath.conf`` (+ conf.d), the
kernel's per-session values from sysfs (``recovery_tmo`` = the session's
replacement_timeout, ``ping_tmo`` = noop_out_timeout, ``recv_tmo`` =
noop_out_interval: open-iscsi usr/initiator_common.c hands them to the
kernel as ISCSI_PARAM_PING_TMO / ISCSI_PARAM_RECV_TMO), the multipath
holders of each session's SCSI disks, and the VMs' libiscsi disks.

iscsid.conf only seeds *new* node records: sessions run with the values of
their node record (``/etc/iscsi/nodes/...``), so the sysfs values are the
truth and a difference is reported.
"""

from __future__ import annotations

from collections import defaultdict

from agent.doctor import DoctorInput, Result, check
from agent.doctor.etc import read_iscsid, read_multipath
from agent.doctor.parsers import int_setting, queueing
from agent.records.addr import fmt_endpoint

REPL = "node.session.timeo.replacement_timeout"
NOP_INT = "node.conn[0].timeo.noop_out_interval"
NOP_TMO = "node.conn[0].timeo.noop_out_timeout"

MP_REPL_MAX = 15  # s: with multipath, fail a path within this (open-iscsi README, dm-multipath section)
SINGLE_REPL_MIN = 30  # s: without multipath, queue at least this long before failing I/O to VMs
NOP_TOTAL_MAX = 20  # s: interval + timeout above this = slow dead-path detection

REF_TIMEOUTS = ('open-iscsi README "iSCSI settings for dm-multipath" (replacement_timeout); '
                "iscsid.conf comments on node.session.timeo.replacement_timeout; "
                "multipath.conf(5) no_path_retry, polling_interval, features")
REF_NOP = ('open-iscsi README "iSCSI settings for dm-multipath" (NOP-Out Interval/Timeout); '
           "iscsid.conf comments on node.conn[0].timeo.noop_out_interval / noop_out_timeout")
REF_SINGLE = ('multipath.conf(5); open-iscsi README "iSCSI settings for dm-multipath"; '
              "QEMU docs, block drivers: iSCSI (one connection per disk, no multipath)")


def _sessions(inp: DoctorInput):
    return tuple(inp.snapshot.iscsi_sessions)


def _libiscsi_disks(inp: DoctorInput):
    return [(vm, disk) for vm in inp.snapshot.vms for disk in vm.disks if disk.backend == "libiscsi"]


def _multipathed(s) -> bool:
    return any(d.holders for d in s.disks)


def _fmt_q(q) -> str:
    if q.mode == "queue":
        return "queue forever"
    if q.mode == "retry":
        secs = f"{q.seconds} s" if q.seconds is not None else "? s"
        return f"queue {q.retries} x polling_interval {q.polling_interval} s = {secs}, then fail"
    return "fail at once"


@check("iscsi_timeouts", 10, "open-iscsi replacement_timeout against multipath queueing")
def iscsi_timeouts(inp: DoctorInput) -> list[Result]:
    """replacement_timeout (recovery_tmo) of each session against dm-multipath's no_path_retry.

    With multipath, a failed path should be given up quickly (5-15 s) so
    multipath moves I/O to the other paths; what happens when *all* paths are
    down is then multipath's no_path_retry (queue N x polling_interval s, or
    forever with ``queue``: VMs hang with no error and no end). Without
    multipath, replacement_timeout *is* the time I/O is held during an outage
    before the VM gets errors, so it should be long (default 120 s).
    """
    name = "iscsi_timeouts"
    iscsid, mp = read_iscsid(inp.paths), read_multipath(inp.paths)
    sessions = _sessions(inp)
    out: list[Result] = []
    for err in ([iscsid.file.error] if iscsid.file.error else []) + mp.errors:
        out.append(Result(name, "warning", "configuration", err,
                          why="a file multipath or iscsid reads could not be parsed fully; what it means may differ "
                              "from what was intended",
                          reference="multipath.conf(5); iscsid.conf comments"))
    for err in (iscsid.conf.errors if iscsid.conf else ()):
        out.append(Result(name, "warning", str(iscsid.file.path), err,
                          why="iscsid skips lines it cannot read", reference="iscsid.conf comments"))
    if iscsid.conf is None and not sessions:
        why = inp.health("iscsi_kernel") or "no kernel iSCSI sessions"
        libiscsi = _libiscsi_disks(inp)
        note = (f"; {len(libiscsi)} VM disk(s) use QEMU's own libiscsi initiator, which does not read iscsid.conf "
                "(see libiscsi_keepalive)") if libiscsi else ""
        return out + [Result(name, "skipped", "host",
                             f"open-iscsi not in use: {iscsid.file.path} absent, {why}{note}",
                             reference=REF_TIMEOUTS)]

    conf_rt, conf_origin = int_setting(iscsid.conf, REPL) if iscsid.conf else (None, "no iscsid.conf")
    eff = mp.effective()
    q = queueing(eff, mp.main.name if mp.main else "multipath.conf")
    dev_queue = [(d, queueing(mp.effective(d), "device section")) for d in (mp.conf.devices() if mp.conf else [])]
    dev_forever = [(d, dq) for d, dq in dev_queue if dq.mode == "queue" and "no_path_retry" in d.values
                   or dq.mode == "queue" and "features" in d.values]

    groups: dict[tuple, list] = defaultdict(list)
    for s in sessions:
        groups[(s.recovery_tmo, _multipathed(s))].append(s)
    if not sessions:
        # no session yet: judge what new sessions will get
        groups[(conf_rt, mp.conf is not None)] = []

    for (rt, multipath), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] or -1)):
        subject = (f"session(s) {', '.join(str(s.sid) for s in group)}" if group
                   else f"{iscsid.file.path} (no session logged in)")
        origin = "sysfs recovery_tmo" if group else f"iscsid.conf {conf_origin}"
        values = {"replacement_timeout": rt, "replacement_timeout_from": origin, "multipath": multipath,
                  "sessions": [s.sid for s in group]}
        if rt is None:
            out.append(Result(name, "info", subject, f"replacement_timeout unknown ({origin} unreadable or off)",
                              reference=REF_TIMEOUTS, values=values))
            continue
        if multipath:
            values.update(no_path_retry=q.retries if q.mode == "retry" else q.mode, polling_interval=q.polling_interval,
                          all_paths_down=_fmt_q(q), queueing_from=q.source)
            head = (f"multipath; replacement_timeout {rt} s ({origin}); all paths down: {_fmt_q(q)} "
                    f"[{q.source}]")
            forever = q.mode == "queue"
            extra = ""
            if dev_forever:
                extra = "; device section(s) queueing forever: " + ", ".join(
                    f"{d.get('vendor') or '?'}/{d.get('product') or '?'} (line {d.line})" for d, _ in dev_forever)
                forever = True
                values["devices_queue_forever"] = [f"{d.get('vendor')}/{d.get('product')}" for d, _ in dev_forever]
            if rt > MP_REPL_MAX and forever:
                out.append(Result(
                    name, "problem", subject, head + extra,
                    why=f"a dead path holds its I/O for {rt} s before multipath fails over (VMs stall on every path "
                        "failure), and when every path is down I/O is queued with no limit: VMs hang, paused or "
                        "blocked in D state, with no error and no end until a path returns",
                    reference=REF_TIMEOUTS,
                    fix=f"set {REPL} = 5..15 (iscsiadm -m node -o update -n {REPL} -v 15 for existing nodes) and "
                        "no_path_retry N in multipath.conf so total outages end (N x polling_interval s)",
                    values=values))
            elif forever:
                out.append(Result(
                    name, "warning", subject, head + extra,
                    why="when every path is down, I/O is queued with no limit: VMs hang with no error until a path "
                        "returns, and multipathd cannot flush the map; a bounded queue (no_path_retry N) rides out "
                        "target failovers and still ends",
                    reference=REF_TIMEOUTS,
                    fix="set no_path_retry to a number (e.g. 12 with polling_interval 5 = 60 s) instead of queue / "
                        "features \"1 queue_if_no_path\"",
                    values=values))
            elif rt > MP_REPL_MAX:
                out.append(Result(
                    name, "warning", subject, head,
                    why=f"multipath only sees a path fail after the iSCSI layer gives up on it: I/O on a dead path "
                        f"waits up to {rt} s (plus NOP-Out detection) before it is retried on another path, so VMs "
                        "stall that long on every single-path failure",
                    reference=REF_TIMEOUTS,
                    fix=f"set {REPL} = 5..15 in iscsid.conf and in the node records "
                        f"(iscsiadm -m node -o update -n {REPL} -v 15), then log the sessions in again",
                    values=values))
            else:
                out.append(Result(
                    name, "ok" if q.mode == "retry" else "info", subject, head,
                    why="paths fail over quickly; " + (
                        "a total outage is ridden out for a bounded time, then errors reach the VMs"
                        if q.mode == "retry" else
                        "but a total outage (e.g. a target controller failover) turns into I/O errors in the VMs "
                        "at once: consider no_path_retry N to ride it out"),
                    reference=REF_TIMEOUTS, values=values))
        else:
            head = f"no multipath; replacement_timeout {rt} s ({origin})"
            if rt < SINGLE_REPL_MIN:
                out.append(Result(
                    name, "warning", subject, head,
                    why=f"without multipath, replacement_timeout is how long I/O is held while the session "
                        f"recovers: after {rt} s of outage the VM gets I/O errors (or pauses, per its error "
                        "policy); a short network blip or target restart then damages guests",
                    reference=REF_TIMEOUTS,
                    fix=f"use multipath, or set {REPL} to 120 or more (iscsiadm -m node -o update -n {REPL} -v 120)",
                    values=values))
            else:
                out.append(Result(
                    name, "ok", subject, head,
                    why=f"without multipath, I/O is held up to {rt} s while the session recovers, then fails",
                    reference=REF_TIMEOUTS, values=values))
    if sessions and conf_rt is not None:
        differ = sorted({s.recovery_tmo for s in sessions if s.recovery_tmo is not None and s.recovery_tmo != conf_rt})
        if differ:
            out.append(Result(
                name, "info", str(iscsid.file.path),
                f"iscsid.conf replacement_timeout {conf_rt} ({conf_origin}) but sessions run with "
                f"{', '.join(map(str, differ))}",
                why="iscsid.conf only seeds node records at discovery; existing node records keep their own value",
                reference="iscsiadm(8) -m node -o update; iscsid.conf header comments",
                fix=f"iscsiadm -m node -o update -n {REPL} -v <N> and log in again, if the node value is not intended",
                values={"iscsid_conf": conf_rt, "sessions": differ}))
    return out


@check("nop_out", 20, "iSCSI NOP-Out interval and timeout")
def nop_out(inp: DoctorInput) -> list[Result]:
    """NOP-Out interval/timeout of each connection (sysfs recv_tmo/ping_tmo) and in iscsid.conf.

    The initiator sends a NOP-Out after ``noop_out_interval`` s without
    traffic and declares the connection dead when no NOP-In comes back within
    ``noop_out_timeout`` s; only then does session recovery (and the
    replacement_timeout) start. 0 disables the ping: a dead idle path is then
    found only when I/O times out (SCSI command timeout, 30 s by default).
    """
    name = "nop_out"
    iscsid = read_iscsid(inp.paths)
    sessions = _sessions(inp)
    if iscsid.conf is None and not sessions:
        return [Result(name, "skipped", "host", "open-iscsi not in use (no iscsid.conf, no kernel sessions)",
                       reference=REF_NOP)]
    items: list[tuple[str, int | None, int | None, str]] = []
    for s in sessions:
        for c in s.connections:
            items.append((f"connection {c.cid}", c.recv_tmo, c.ping_tmo, "sysfs recv_tmo/ping_tmo"))
    if iscsid.conf is not None:
        iv, iv_o = int_setting(iscsid.conf, NOP_INT)
        to, to_o = int_setting(iscsid.conf, NOP_TMO)
        items.append((str(iscsid.file.path), iv, to, f"interval {iv_o}, timeout {to_o}"))
    groups: dict[tuple, list[str]] = defaultdict(list)
    origin: dict[tuple, str] = {}
    for subj, iv, to, o in items:
        groups[(iv, to)].append(subj)
        origin.setdefault((iv, to), o)
    out = []
    for (iv, to), subjects in groups.items():
        subject = ", ".join(subjects)
        values = {"noop_out_interval": iv, "noop_out_timeout": to, "from": origin[(iv, to)]}
        head = f"noop_out_interval {iv if iv is not None else '?'} s, noop_out_timeout {to if to is not None else '?'} s"
        if iv is None or to is None:
            out.append(Result(name, "info", subject, head + " (unreadable)", reference=REF_NOP, values=values))
        elif iv == 0 or to == 0:
            out.append(Result(
                name, "warning", subject, head + ": NOP-Out disabled",
                why="without NOP-Out pings a dead path is noticed only when outstanding I/O times out (SCSI "
                    "command timeout, 30 s by default) and never while the path is idle; multipath fails over late",
                reference=REF_NOP, fix=f"set {NOP_INT} = 5 and {NOP_TMO} = 5", values=values))
        elif iv + to > NOP_TOTAL_MAX:
            out.append(Result(
                name, "warning", subject, head + f": a dead path is detected after up to {iv + to} s",
                why="session recovery (and multipath failover) only starts once the ping fails; VMs stall that long "
                    "on every path failure, plus replacement_timeout",
                reference=REF_NOP, fix=f"set {NOP_INT} = 5 and {NOP_TMO} = 5 (open-iscsi defaults)", values=values))
        else:
            out.append(Result(name, "ok", subject, head + f": dead path detected within {iv + to} s",
                              reference=REF_NOP, values=values))
    return out


@check("single_path", 30, "LUNs reachable over one path only")
def single_path(inp: DoctorInput) -> list[Result]:
    """LUNs (target IQN + LUN) reached over one path only.

    Kernel sessions: a LUN seen through one session has no second path (a
    NIC, switch or portal failure stops it); a LUN seen through several
    sessions whose SCSI disks are not gathered under one dm-multipath device
    has paths nobody fails over between. QEMU libiscsi disks are always
    single-path: QEMU opens one TCP connection per disk to one portal and has
    no multipath (said per disk, as info).
    """
    name = "single_path"
    out: list[Result] = []
    sessions = _sessions(inp)
    luns: dict[tuple, list] = defaultdict(list)
    for s in sessions:
        for d in s.disks:
            luns[(s.target, d.lun)].append((s, d))
    for (target, lun), legs in sorted(luns.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        subject = f"{target} LUN {lun}"
        portals = sorted({s.portal or "?" for s, _ in legs})
        devs = [d.name or d.hctl for _, d in legs]
        holders = {h for _, d in legs for h in (d.holder_names or d.holders)}
        values = {"target": target, "lun": lun, "sessions": [s.sid for s, _ in legs], "portals": portals,
                  "scsi_disks": devs, "multipath": sorted(holders)}
        if len(legs) == 1:
            s, d = legs[0]
            out.append(Result(
                name, "warning", subject,
                f"one path: session {s.sid} to {s.portal or '?'} ({d.name or d.hctl})",
                why="one portal, NIC, cable or switch failure stops every VM on this LUN until the session recovers",
                reference=REF_SINGLE,
                fix="log in to a second portal (or through a second iface) and use dm-multipath on the LUN",
                values=values))
        elif len(holders) != 1 or not all(d.holders for _, d in legs):
            out.append(Result(
                name, "warning", subject,
                f"{len(legs)} sessions ({', '.join(devs)}) but not under one multipath device "
                f"(holders: {', '.join(sorted(holders)) or 'none'})",
                why="the second path exists but nothing fails over to it: I/O goes to one sdX directly",
                reference=REF_SINGLE, fix="let multipathd claim the LUN (check blacklist / find_multipaths)",
                values=values))
        elif len(portals) == 1:
            out.append(Result(
                name, "warning", subject,
                f"{len(legs)} paths under {next(iter(holders))}, all to portal {portals[0]}",
                why="every path ends at the same portal: its failure still stops the LUN",
                reference=REF_SINGLE, fix="log in to the target's other portals", values=values))
        else:
            out.append(Result(name, "ok", subject,
                              f"{len(legs)} paths under {next(iter(holders))} via {', '.join(portals)}",
                              reference=REF_SINGLE, values=values))
    for vm, disk in _libiscsi_disks(inp):
        portal = ", ".join(fmt_endpoint(h, p) for h, p in disk.hosts) or "?"
        out.append(Result(
            name, "info", f"{vm.name}/{disk.target}",
            f"QEMU libiscsi disk {disk.iqn} LUN {disk.lun} via {portal}: single path by design",
            why="QEMU's built-in initiator opens one connection to one portal and has no multipath: a failure of "
                "that portal or its network stalls the disk until libiscsi reconnects to the same portal",
            reference=REF_SINGLE,
            values={"vm": vm.name, "disk": disk.target, "target": disk.iqn, "lun": disk.lun, "portal": portal,
                    "backend": "libiscsi"}))
    if not out:
        reasons = [r for r in (inp.health("iscsi_kernel"), inp.health("libvirt")) if r]
        return [Result(name, "skipped", "host", "no iSCSI LUNs in use" + (f" ({'; '.join(reasons)})" if reasons else ""),
                       reference=REF_SINGLE)]
    return out
