"""dm-multipath state changes between two cycles: ``logs-kvmscope.events``.

* ``multipath-path-failed`` / ``multipath-path-reinstated``: a path's dm
  state (the kernel's A/F) changed; also a path whose kernel fail count grew
  while it was active at both ends (it failed and came back within one
  cycle): ``multipath-path-flapped``;
* ``multipath-map-no-path``: the map's last usable path went (``event.outcome``
  says whether it queues I/O, i.e. its VMs hang, or fails it);
  ``multipath-map-restored``: a path is usable again after none.

Each event names the map, the path with its portal (the open-iscsi session
behind the sdX), the usable paths left, and the VMs whose disks sit on the
map (``kvmscope.vm.name``, from the joined storage paths). The log lines of
the same changes (kernel ``Failing path``, multipathd ``remaining active
paths``) are in ``logs-kvmscope.storage_log``. The first cycle only records a
baseline.
"""

from __future__ import annotations

from agent.shipping.ecs import Doc, snapshot_builder


def _vms_on(snap, map_name: str) -> list[str]:
    return sorted({p.vm for p in snap.paths if p.multipath == map_name})


def _portal_of(snap) -> dict[str, str]:
    return {d.name: s.portal for s in snap.iscsi_sessions for d in s.disks if d.name and s.portal}


@snapshot_builder
def multipath_events(snap, prev_snap):
    now = snap.multipath
    before = prev_snap.multipath if prev_snap is not None else None
    if now is None or before is None:
        return
    portals = _portal_of(snap) or _portal_of(prev_snap)
    for m in now.maps:
        old = before.by_name(m.name)
        if old is None:
            continue
        vms = _vms_on(snap, m.name) or _vms_on(prev_snap, m.name)
        common = {
            "kvmscope.multipath.map": m.name,
            "kvmscope.multipath.active_paths": m.active_paths,
            "kvmscope.multipath.paths": len(m.paths),
            "kvmscope.vm.name": vms or None,
        }
        for p in m.paths:
            q = old.path(p.devno)
            if q is None:
                continue
            name = p.name or p.devno
            if q.active and not p.active:
                action, outcome, what = "multipath-path-failed", "failure", "failed"
            elif not q.active and p.active:
                action, outcome, what = "multipath-path-reinstated", "success", "reinstated"
            elif (p.active and q.active and p.fail_count is not None and q.fail_count is not None
                  and p.fail_count > q.fail_count):
                action, outcome, what = "multipath-path-flapped", "failure", "failed and came back"
            else:
                continue
            portal = portals.get(name)
            on = f" ({', '.join(vms)})" if vms else ""
            yield Doc(
                "events",
                f"multipath:{m.name}:{p.devno}:{action}:{p.fail_count}",
                {
                    "event.category": ["host"],
                    "event.type": ["change"],
                    "event.action": action,
                    "event.outcome": outcome,
                    "message": f"multipath {m.name}{on}: path {name}" + (f" to {portal}" if portal else "")
                               + f" {what}; {m.active_paths} of {len(m.paths)} paths usable",
                    "kvmscope.multipath.path": name,
                    "kvmscope.multipath.path_state": p.dm_state,
                    "kvmscope.multipath.checker_state": p.checker_state,
                    "kvmscope.portal": portal,
                    "kvmscope.change.from": q.dm_state,
                    "kvmscope.change.to": p.dm_state,
                    **common,
                },
            )
        if old.active_paths > 0 and m.active_paths == 0 and m.paths:
            queues = m.stalled
            yield Doc(
                "events",
                f"multipath:{m.name}:no-path",
                {
                    "event.category": ["host"],
                    "event.type": ["change", "error"],
                    "event.action": "multipath-map-no-path",
                    "event.outcome": "failure",
                    "message": f"multipath {m.name}: no usable path left; "
                               + (f"I/O is queued: {', '.join(vms) or 'its VMs'} hang until a path returns"
                                  if queues else f"I/O fails: {', '.join(vms) or 'its VMs'} get I/O errors"),
                    "kvmscope.multipath.queueing": queues,
                    "kvmscope.change.from": str(old.active_paths),
                    "kvmscope.change.to": "0",
                    **common,
                },
            )
        elif old.active_paths == 0 and m.active_paths > 0 and old.paths:
            yield Doc(
                "events",
                f"multipath:{m.name}:restored",
                {
                    "event.category": ["host"],
                    "event.type": ["change"],
                    "event.action": "multipath-map-restored",
                    "event.outcome": "success",
                    "message": f"multipath {m.name}: {m.active_paths} path(s) usable again; held I/O resumes",
                    "kvmscope.multipath.queueing": m.stalled,
                    "kvmscope.change.from": "0",
                    "kvmscope.change.to": str(m.active_paths),
                    **common,
                },
            )
