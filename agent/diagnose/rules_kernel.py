"""Diagnosis rules of the kernel storage path: dm-multipath over open-iscsi sessions.

What an outage means depends on multipath: a failed path of a map with
other usable paths is a failover (the VMs stalled once, for the detection
and replacement time, and now run on the rest: a warning about lost
redundancy); a map with no usable path either holds I/O (queue_if_no_path /
no_path_retry: the VMs hang, critical) or fails it (I/O errors, critical);
a session in recovery under no multipath stalls its VMs until it logs in
again or its recovery_tmo fails their I/O. Each finding names the VMs (and
other processes) on the affected map or session; of a healthy portal it
only says that it carries the load.

The rules register with a precedence below the generic ones of
:mod:`agent.diagnose.rules` and claim the effects they explain (the VM disks
on the map, the sessions and connections of its failed paths), so the
generic "session FAILED" or "disk stalled" finding of the same outage is
folded into theirs (``explains_also``).
"""

from __future__ import annotations

from agent.config import DiagnoseConfig
from agent.diagnose.rules import Finding, _r, rule
from agent.diagnose.window import MapWindow, Window
from agent.records.multipath import parse_no_path_retry


def _disks(w: Window, m: MapWindow):
    on = set(m.disks)
    return [d for d in w.disks if (d.vm, d.disk) in on]


def _effects(w: Window, m: MapWindow, legs) -> frozenset:
    sessions = {leg["session"] for leg in legs if leg.get("session") is not None}
    conns = {p.connection for p in w.paths if p.multipath == m.name and p.session in sessions and p.connection}
    return frozenset([("disk", f"{v}/{d}") for v, d in m.disks] + [("session", str(s)) for s in sessions]
                     + [("conn", c) for c in conns])


def _who(m: MapWindow) -> list[str]:
    """The VMs on the map, then the other processes holding it open (qemu of a listed VM left out)."""
    names = list(m.vms)
    names += [f"{comm} (pid {pid})" for pid, comm in m.openers
              if not (comm.startswith("qemu") and m.vms)]
    return names


def _leg_text(leg: dict) -> str:
    return leg["path"] + (f" via {leg['portal']}" if leg.get("portal") else "")


def _queue_text(m: MapWindow) -> tuple[str, int | None]:
    mode, n = parse_no_path_retry(m.no_path_retry)
    if mode == "counting":
        return f"no_path_retry counting down: {n} s of queueing left, then I/O errors", n
    if mode == "queue" or (mode == "unknown" and m.queue_if_no_path):
        return "queueing with no limit (no_path_retry queue / queue_if_no_path): until a path returns", None
    if mode == "retry":
        return f"queueing for no_path_retry {n} checker intervals, then I/O errors", None
    return "queueing", None


@rule(precedence=5)
def multipath_all_paths_down(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Every path of a multipath map down: its VMs hang (queueing) or get I/O errors.

    Symptom: the VMs and processes on the map freeze (I/O in D state), or
    report I/O errors and remount read-only.
    Signals: the multipath source: no path of the map usable at the end of
    the window (dmsetup status F / multipathd dm_st failed); the map's
    queue_io flag, queue_if_no_path and multipathd's no_path_retry
    countdown; the sessions behind its paths.
    Threshold: zero usable paths in the last snapshot.
    Remedy: bring back one path (target, network); I/O resumes where it
    stopped. If the storage is gone for good, `multipathd disablequeueing
    map MAP` fails the held I/O so the VMs can be stopped.
    """
    out = []
    for m in w.multipath:
        if m.paths_total == 0 or m.active_last > 0:
            continue
        who = _who(m)
        names = ", ".join(who) or "nothing known on it (no VM disk joined, no process holding it)"
        portals = sorted({leg["portal"] for leg in m.failed if leg.get("portal")})
        ev = {"map": m.name, "failed_paths": list(m.failed), "portals": portals, "vms": list(m.vms),
              "workloads": [{"pid": p, "comm": c} for p, c in m.openers], "no_path_retry": m.no_path_retry,
              "queue_if_no_path": m.queue_if_no_path}
        if m.queueing_last:
            text, left = _queue_text(m)
            ev["queueing_seconds_left"] = left
            out.append(Finding(
                rule="multipath_all_paths_down", severity="critical", subject={"kind": "multipath", "id": m.name},
                scope="all VMs on the map",
                title=f"{m.name}: every path down ({', '.join(portals) or 'all portals'}); I/O is queued: "
                      f"{names} hang",
                evidence=ev, aspect="queueing",
                cause=f"no usable path is left and the map holds I/O ({text}); every read and write of "
                      f"{names} waits without an error",
                next_checks=[f"reachability of {', '.join(portals) or 'the portals'} and the target service",
                             "kvmscope sessions (all sessions of the map FAILED?)",
                             f"multipathd show maps (queueing column of {m.name})",
                             "kvmscope doctor (no_path_retry, replacement_timeout)"],
                explains=_effects(w, m, m.failed)))
        else:
            out.append(Finding(
                rule="multipath_all_paths_down", severity="critical", subject={"kind": "multipath", "id": m.name},
                scope="all VMs on the map",
                title=f"{m.name}: every path down and no queueing: {names} get I/O errors",
                evidence=ev, aspect="failing",
                cause="no usable path is left and the map does not queue (no_path_retry fail, or queueing "
                      "ended): reads and writes fail at once; guests see I/O errors, filesystems may go "
                      "read-only",
                next_checks=[f"reachability of {', '.join(portals) or 'the portals'}", "guest consoles",
                             "kvmscope doctor (no_path_retry)"],
                explains=_effects(w, m, m.failed)))
    return out


@rule(precedence=10)
def multipath_failover(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """A path of a multipath map failed; its VMs run on the remaining path(s).

    Symptom: a short I/O stall of the VMs on the map (the failover), then
    normal I/O; redundancy is reduced until the path returns.
    Signals: the multipath source: a path failed at the end of the window
    (or failed and came back within it), with the session behind it (state,
    portal) and the paths still usable; the VMs' latency in the window.
    Threshold: a failed path while another is usable.
    Remedy: restore the failed path (its portal, network, target); multipathd
    reinstates it by itself. Until then the remaining path is a single point
    of failure.
    """
    out = []
    for m in w.multipath:
        if m.active_last == 0 or not (m.failed or m.failed_within):
            continue
        disks = _disks(w, m)
        lat = {f"{d.vm}/{d.disk}": _r(d.mean_ms) for d in disks}
        who = _who(m)
        names = ", ".join(who) or "nothing known on it"
        remaining = ", ".join(_leg_text(leg) for leg in m.remaining)
        carry = sorted({leg["portal"] for leg in m.remaining if leg.get("portal")})
        ev = {"map": m.name, "failed_paths": list(m.failed), "remaining_paths": list(m.remaining),
              "paths_failed_in_window": list(m.failed_within), "vms": list(m.vms),
              "workloads": [{"pid": p, "comm": c} for p, c in m.openers], "mean_latency_ms": lat,
              "usable_paths": m.active_last, "paths": m.paths_total}
        speed = "; ".join(f"{k} {v} ms" for k, v in lat.items() if v is not None)
        if m.failed:
            failed = ", ".join(_leg_text(leg) for leg in m.failed)
            sess = [f"session {leg['session']} {leg.get('session_state') or '?'}" for leg in m.failed
                    if leg.get("session") is not None]
            out.append(Finding(
                rule="multipath_failover", severity="warning", subject={"kind": "multipath", "id": m.name},
                scope="all VMs on the map",
                title=f"{m.name}: path {failed} failed; {names} kept running on {remaining}"
                      + (f" ({speed})" if speed else ""),
                evidence=ev, aspect="failed",
                cause=f"the kernel failed path {failed}" + (f" ({', '.join(sess)})" if sess else "")
                      + f" and moved the map's I/O to {remaining}; "
                      + (f"{', '.join(carry)} carries the load" if carry else "the remaining path carries the load")
                      + f"; one more failure and {m.name} has no path",
                next_checks=[f"reachability of {', '.join(sorted({leg['portal'] for leg in m.failed if leg.get('portal')})) or 'the failed path'}",
                             "kvmscope sessions", "multipathd show paths (checker state)",
                             "kernel log: 'Failing path', 'detected conn error'"],
                explains=_effects(w, m, m.failed)))
        else:
            out.append(Finding(
                rule="multipath_failover", severity="info", subject={"kind": "multipath", "id": m.name},
                scope="all VMs on the map",
                title=f"{m.name}: path(s) {', '.join(m.failed_within)} failed and were reinstated within the "
                      f"window; {names} on {remaining}",
                evidence=ev, aspect="flapped",
                cause="a path failed over and came back: the VMs stalled for the failover time once",
                next_checks=["kernel log around the window", "kvmscope doctor (NOP-Out, replacement_timeout)"]))
    return out


@rule(precedence=15)
def kernel_session_recovery(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """An open-iscsi session in recovery with no multipath over it: its VMs stall.

    Symptom: the VMs on the session's LUNs stop doing I/O.
    Signals: the session's sysfs state is not LOGGED_IN at the end of the
    window and none of its disks is a leg of a multipath map; its
    recovery_tmo (replacement_timeout).
    Threshold: state != LOGGED_IN.
    Remedy: restore the portal; I/O resumes when the session logs in again,
    and fails after recovery_tmo. Consider multipath over a second portal.
    """
    legs = {leg["session"] for m in w.multipath for leg in (*m.failed, *m.remaining) if leg.get("session")}
    out = []
    for sid, s in sorted(w.sessions.items()):
        if s.get("last") == "LOGGED_IN" or sid in legs:
            continue
        on = [p for p in w.paths if p.session == sid]
        vms = sorted({p.vm for p in on})
        out.append(Finding(
            rule="kernel_session_recovery", severity="critical", subject={"kind": "session", "id": str(sid)},
            scope="all VMs on the session",
            title=f"iSCSI session {sid} to {s['portal']} is {s.get('last')} (no multipath): "
                  f"{', '.join(vms) or 'its disks'} stall",
            evidence={"state": s.get("last"), "portal": s["portal"], "target": s["target"], "vms": vms,
                      "recovery_timeout_s": s.get("recovery_tmo"), "disks": s.get("disks")},
            cause=f"the session lost its connection; with no other path its I/O waits for it to log in again, "
                  f"and fails after recovery_tmo {s.get('recovery_tmo')} s",
            next_checks=[f"reachability of {s['portal']}", "iscsiadm -m session -P 1",
                         "kernel log: 'detected conn error', 'ping timeout'"],
            explains=frozenset([("session", str(sid))] + [("disk", f"{p.vm}/{p.disk}") for p in on])))
    return out


@rule(precedence=40)
def scsi_timeouts(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """SCSI command timeouts and aborts on the kernel path.

    Symptom: I/O stalls of 30 s (the SCSI command timeout) and retries.
    Signals: kernel log lines ``[sdX] tag#N timing out command`` / aborts
    (storage_log), joined sdX -> session -> portal -> map -> VMs.
    Threshold: any in the window.
    Remedy: the target answers too slowly or not at all on that path:
    target load, the network in between; with multipath, the NOP-Out
    interval should find a dead path before commands time out.
    """
    by_dev: dict[str, int] = {}
    for e in w.kernel_events:
        if e.kind == "scsi_timeout" and e.device:
            by_dev[e.device] = by_dev.get(e.device, 0) + 1
    out = []
    for dev, n in sorted(by_dev.items()):
        on = [p for p in w.paths if p.scsi_device == dev or p.host_device == dev]
        vms = sorted({p.vm for p in on})
        maps = sorted({p.multipath for p in on if p.multipath})
        portal = next((p.portal for p in on if p.portal), None)
        out.append(Finding(
            rule="scsi_timeouts", severity="warning", subject={"kind": "device", "id": dev},
            scope="all VMs on the device",
            title=f"{dev}: {n} SCSI command timeout(s)/abort(s)" + (f" via {portal}" if portal else "")
                  + (f"; {', '.join(vms)} waited" if vms else ""),
            evidence={"device": dev, "count": n, "portal": portal, "multipath": maps, "vms": vms},
            cause="commands on this path were not answered within the SCSI timeout; the SCSI error handler "
                  "aborted them (and multipath may fail the path)",
            next_checks=["kernel log of the device", "target load", "kvmscope doctor (NOP-Out interval)"]))
    return out
