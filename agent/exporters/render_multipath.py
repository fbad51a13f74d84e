"""Prometheus rendering of dm-multipath maps and paths (source: multipath).

A path is labelled with its map, its sdX and, when the sdX belongs to an
open-iscsi session, that session's portal: an alert on a failed path says
which portal it goes to. Cardinality: one series per path and per map (plus
the five checker states per path), bounded by the host's LUNs x portals.
"""

from __future__ import annotations

from typing import Iterable

from agent.exporters.catalog import define
from agent.exporters.registry import snapshot_renderer
from agent.records.snapshot import Snapshot

MAP = ("map",)
PATH = ("map", "path", "portal")
CHECKER_STATES = ("ready", "ghost", "faulty", "shaky", "other")

MAP_PATHS = define(
    "kvmscope_multipath_map_paths", "gauge",
    "Paths of the multipath map (every path group); dmsetup table, else multipathd show maps json.", MAP,
    "dmsetup / multipathd")
MAP_ACTIVE = define(
    "kvmscope_multipath_map_active_paths", "gauge",
    "Paths of the map the kernel may send I/O to (dm state A); dmsetup status.", MAP, "dmsetup / multipathd")
MAP_QUEUE_IF_NO_PATH = define(
    "kvmscope_multipath_map_queue_if_no_path", "gauge",
    "1 if the map's table has queue_if_no_path: with no path left, I/O is held, not failed; dmsetup table.", MAP,
    "dmsetup")
MAP_QUEUEING = define(
    "kvmscope_multipath_map_queueing", "gauge",
    "1 if the map has no usable path and holds I/O (the VMs on it hang until a path returns or queueing "
    "ends); dmsetup status queue_io flag and active paths.", MAP, "dmsetup")
MAP_NO_PATH_RETRY = define(
    "kvmscope_multipath_map_no_path_retry_checks", "gauge",
    "no_path_retry of the map in path checker intervals (-1: queue forever, 0: fail at once); while queueing with "
    "no path, see kvmscope_multipath_map_queueing_remaining_seconds; multipathd show maps json 'queueing'.", MAP,
    "multipathd")
MAP_QUEUE_LEFT = define(
    "kvmscope_multipath_map_queueing_remaining_seconds", "gauge",
    "Seconds of queueing left before multipathd disables queueing and I/O errors reach the VMs (only while no "
    "path is left and no_path_retry counts down); multipathd show maps json 'queueing' 'N sec'.", MAP, "multipathd")
MAP_PATH_FAULTS = define(
    "kvmscope_multipath_map_path_faults_total", "counter",
    "Path failures multipathd counted on the map since it set it up; multipathd show maps json path_faults.", MAP,
    "multipathd")
MAP_INFO = define(
    "kvmscope_multipath_map_info", "gauge",
    "Always 1: the map's dm device, WWID, features and hardware handler; dmsetup table, multipathd.",
    MAP + ("dm", "uuid", "features", "hwhandler", "vendor", "product"), "dmsetup / multipathd")
PATH_UP = define(
    "kvmscope_multipath_path_up", "gauge",
    "1 if the kernel may send the map's I/O down this path (dm state A), 0 if it failed it (F); dmsetup status.",
    PATH + ("devno", "group"), "dmsetup")
PATH_CHECKER = define(
    "kvmscope_multipath_path_checker_state", "gauge",
    "1 for the path checker's current verdict (ready, ghost, faulty, shaky, other), 0 for the others; "
    "multipathd show maps json chk_st.", PATH + ("state",), "multipathd")
PATH_FAILURES = define(
    "kvmscope_multipath_path_failures_total", "counter",
    "Times the kernel failed this path since the map's table was loaded (restarts on a table reload); "
    "dmsetup status fail count.", PATH, "dmsetup")
MAP_COUNT = define(
    "kvmscope_multipath_maps", "gauge", "Multipath maps on the host; dmsetup / multipathd.", (), "dmsetup / multipathd")


def _checker(state: str | None) -> str | None:
    if state is None:
        return None
    return state if state in CHECKER_STATES else "other"


def _npr_checks(mode: str, n: int | None) -> int | None:
    return {"fail": 0, "queue": -1}.get(mode, n if mode == "retry" else None)


@snapshot_renderer(per_snapshot=True)
def render_multipath(snap: Snapshot) -> Iterable:
    data = snap.multipath
    if data is None:
        return []
    portal_of = {d.name: s.portal for s in snap.iscsi_sessions for d in s.disks if d.name}
    fams = [MAP_COUNT.family(), MAP_PATHS.family(), MAP_ACTIVE.family(), MAP_QUEUE_IF_NO_PATH.family(),
            MAP_QUEUEING.family(), MAP_NO_PATH_RETRY.family(), MAP_QUEUE_LEFT.family(), MAP_PATH_FAULTS.family(),
            MAP_INFO.family(), PATH_UP.family(), PATH_CHECKER.family(), PATH_FAILURES.family()]
    count, total, active, qinp, queueing, npr, left, faults, info, up, checker, failures = fams
    count.add_metric([], len(data.maps))
    for m in data.maps:
        lv = [m.name]
        total.add_metric(lv, len(m.paths))
        active.add_metric(lv, m.active_paths)
        qinp.add_metric(lv, 1 if m.queue_if_no_path else 0)
        queueing.add_metric(lv, 1 if m.stalled else 0)
        mode, n = m.no_path_retry_mode
        checks = _npr_checks(mode, n)
        if checks is not None:
            npr.add_metric(lv, checks)
        if mode == "counting" and n is not None:
            left.add_metric(lv, n)
        if m.path_faults is not None:
            faults.add_metric(lv, m.path_faults)
        info.add_metric(lv + [m.dm or "", m.uuid or "", m.features, m.hwhandler or "", m.vendor or "",
                              m.product or ""], 1)
        for p in m.paths:
            name = p.name or p.devno
            pl = [m.name, name, portal_of.get(name) or ""]
            up.add_metric(pl + [p.devno, str(p.group)], 1 if p.active else 0)
            cur = _checker(p.checker_state)
            if cur is not None:
                for st in CHECKER_STATES:
                    checker.add_metric(pl + [st], 1 if st == cur else 0)
            if p.fail_count is not None:
                failures.add_metric(pl, p.fail_count)
    return fams
