"""What-if for every dm-multipath map: what its VMs see if one portal fails now.

Inputs: the multipath source's maps (live path states, the map's
``queue_if_no_path`` and multipathd's no_path_retry), the open-iscsi sessions
behind each path (sysfs ``recovery_tmo`` = replacement_timeout, ``recv_tmo``
= noop_out_interval, ``ping_tmo`` = noop_out_timeout), ``polling_interval``
from multipath.conf, and the VMs joined to the map (plus the processes the
source saw holding it open).

The timeline of a portal that stops answering (a dead link or target, no
RST: the worst case), for I/O in flight on its path:

1. the initiator notices: no PDU for ``noop_out_interval`` s makes it send a
   NOP-Out, no answer within ``noop_out_timeout`` s fails the connection
   (libiscsi ``iscsi_check_transport_timeouts``): between ``timeout`` and
   ``interval + timeout`` s after the last answer;
2. the session is FAILED and holds its commands for ``replacement_timeout``
   s (``recovery_tmo``), then fails them (``iscsi_session_recovery_timedout``,
   DID_TRANSPORT_FAILFAST);
3. dm-multipath fails the path on that error and retries the I/O on a
   remaining usable path: the stall ends. A portal whose paths are all in a
   standby path group (``path_grouping_policy failover``: the kernel sends
   I/O to one group only) stalls nothing: it only loses redundancy. With none left, the map queues
   for ``no_path_retry`` x ``polling_interval`` s (or for ever with
   ``queue``) and then fails the I/O: the VMs get I/O errors.

So the stall of a failover is ``[timeout + replacement_timeout, interval +
timeout + replacement_timeout]`` s; the prediction states the upper end and
the range. The SCSI command timeout (30 s by default) is longer than that
with sane settings and plays no part.
"""

from __future__ import annotations

from agent.doctor import DoctorInput, Result, check
from agent.doctor.etc import read_multipath
from agent.records.multipath import parse_no_path_retry

REF = ('open-iscsi README "iSCSI settings for dm-multipath"; multipath.conf(5) no_path_retry, '
       "polling_interval; drivers/scsi/libiscsi.c iscsi_check_transport_timeouts")


def _polling_interval(inp: DoctorInput) -> tuple[int, str]:
    mp = read_multipath(inp.paths)
    s = mp.effective().get("polling_interval")
    if s is not None:
        try:
            return int(s.value), f"multipath.conf line {s.line}"
        except ValueError:
            pass
    return 5, "built-in default"


def detection(sessions) -> tuple[int | None, int | None]:
    """(fastest, slowest) seconds from a portal's last answer to its connection failing, over the sessions."""
    lo = hi = None
    for s in sessions:
        for c in s.connections:
            if c.ping_tmo is None or c.recv_tmo is None:
                continue
            lo = c.ping_tmo if lo is None else min(lo, c.ping_tmo)
            hi = c.recv_tmo + c.ping_tmo if hi is None else max(hi, c.recv_tmo + c.ping_tmo)
    return lo, hi


def predict(map_, legs_via: list, remaining: list, sessions, poll: int) -> dict:
    """The what-if of one portal for one map (pure): outcome, stall range, seconds to I/O errors."""
    det_lo, det_hi = detection(sessions)
    repl = max((s.recovery_tmo for s in sessions if s.recovery_tmo is not None), default=None)
    repl_lo = min((s.recovery_tmo for s in sessions if s.recovery_tmo is not None), default=None)
    out: dict = {"detect_s": [det_lo, det_hi], "replacement_timeout_s": repl, "polling_interval_s": poll}
    if det_hi is None or repl is None:
        out["outcome"] = "unknown"
        return out
    lo, hi = det_lo + repl_lo, det_hi + repl
    carries_io = map_.active_group is None or any(p.group == map_.active_group for p, _s in legs_via)
    if remaining and not carries_io:
        # a standby path group (path_grouping_policy failover): no I/O waits on it; it is failed when noticed
        out.update(outcome="no_stall", stall_s=0, stall_range_s=[0, 0], path_failed_after_s=[lo, hi])
        return out
    if remaining:
        out.update(outcome="failover", stall_s=hi, stall_range_s=[lo, hi])
        return out
    mode, n = parse_no_path_retry(map_.no_path_retry)
    if mode == "unknown":
        mode = "queue" if map_.queue_if_no_path else "fail"
    if mode == "queue":
        out.update(outcome="hang", stall_s=None, stall_range_s=[lo, None])
    elif mode == "retry":
        q = n * poll
        out.update(outcome="errors", queue_s=q, errors_after_s=hi + q, stall_range_s=[lo + q, hi + q])
    elif mode == "counting":  # queueing right now: n s left
        out.update(outcome="errors", queue_s=n, errors_after_s=n, stall_range_s=[n, n])
    else:
        out.update(outcome="errors", queue_s=0, errors_after_s=hi, stall_range_s=[lo, hi])
    return out


@check("multipath_whatif", 40, "If a portal fails now: what each multipath map's VMs see")
def multipath_whatif(inp: DoctorInput) -> list[Result]:
    """For every multipath map and every portal its paths go to: the predicted stall and its outcome.

    "If portal X fails now: these VMs stall N s and fail over to Y" (another
    usable path is left), "... hang until X returns" (no path left, queueing
    for ever), or "... get I/O errors after N s" (no path left, no_path_retry
    N or fail). Computed from the live path states and the sessions' own
    timeouts (see the module docstring for the timeline).
    """
    name = "multipath_whatif"
    snap = inp.snapshot
    data = snap.multipath
    if data is None:
        why = inp.health("multipath") or "no multipath maps"
        return [Result(name, "skipped", "host", f"no dm-multipath maps to predict for ({why})", reference=REF)]
    poll, poll_from = _polling_interval(inp)
    sess_of = {d.name: s for s in snap.iscsi_sessions for d in s.disks if d.name}
    out: list[Result] = []
    for m in data.maps:
        vms = sorted({p.vm for p in snap.paths if p.multipath == m.name})
        procs = [f"{comm} (pid {pid})" for pid, comm in m.openers if not (comm.startswith("qemu") and vms)]
        who = ", ".join(vms + procs) or f"whatever uses {m.name}"
        by_portal: dict[str, list] = {}
        for p in m.paths:
            s = sess_of.get(p.name or "")
            by_portal.setdefault(s.portal if s is not None and s.portal else "?", []).append((p, s))
        for portal, legs in sorted(by_portal.items()):
            remaining = [(p, s) for q, legs2 in by_portal.items() if q != portal for p, s in legs2 if p.active]
            sessions = [s for _p, s in legs if s is not None]
            pr = predict(m, legs, remaining, sessions, poll)
            rem = ", ".join(f"{p.name or p.devno}" + (f" via {s.portal}" if s is not None and s.portal else "")
                            for p, s in remaining)
            values = {"map": m.name, "portal": portal, "paths": [p.name or p.devno for p, _s in legs],
                      "remaining": [p.name or p.devno for p, _s in remaining], "vms": vms, "workloads": procs,
                      "polling_interval_from": poll_from, "no_path_retry": m.no_path_retry, **pr}
            subject = f"{m.name} if {portal} fails"
            if pr["outcome"] == "unknown":
                out.append(Result(name, "info", subject, f"if {portal} fails now: {who} - timeouts unknown "
                                  "(sessions' recv_tmo/ping_tmo/recovery_tmo unreadable)", reference=REF,
                                  values=values))
            elif pr["outcome"] == "no_stall":
                out.append(Result(
                    name, "ok", subject,
                    f"if {portal} fails now: {who} do not stall: I/O runs on path group {m.active_group} via {rem}; "
                    f"the standby path is marked failed after {pr['path_failed_after_s'][0]}-"
                    f"{pr['path_failed_after_s'][1]} s",
                    why="the paths through this portal are in a path group the kernel does not send I/O to "
                        "(path_grouping_policy failover): losing them only loses redundancy",
                    reference=REF, values=values))
            elif pr["outcome"] == "failover":
                lo, hi = pr["stall_range_s"]
                out.append(Result(
                    name, "ok", subject,
                    f"if {portal} fails now: {who} stall {lo}-{hi} s and fail over to {rem}",
                    why=f"NOP-Out detects the dead portal in {pr['detect_s'][0]}-{pr['detect_s'][1]} s, the session "
                        f"holds I/O for replacement_timeout {pr['replacement_timeout_s']} s, then dm-multipath "
                        f"retries it on {rem}",
                    reference=REF, values=values))
            elif pr["outcome"] == "hang":
                out.append(Result(
                    name, "problem", subject,
                    f"if {portal} fails now: {who} hang (I/O queued with no limit) until {portal} returns: "
                    f"no other usable path",
                    why="every usable path of the map goes through this portal and the map queues for ever "
                        "(no_path_retry queue / queue_if_no_path): guests freeze with no error and no end",
                    reference=REF,
                    fix="log in to a second portal (a second path), and set no_path_retry N so an outage ends",
                    values=values))
            else:
                q = pr.get("queue_s") or 0
                out.append(Result(
                    name, "warning", subject,
                    f"if {portal} fails now: {who} stall, then get I/O errors after {pr['errors_after_s']} s"
                    + (f" (queueing {q} s = no_path_retry x polling_interval {poll} s)" if q else "")
                    + ": no other usable path",
                    why="every usable path of the map goes through this portal: once it is declared dead and the "
                        "queueing ends, reads and writes fail in the guests",
                    reference=REF, fix="log in to a second portal so the map has a path to fail over to",
                    values=values))
    return out
