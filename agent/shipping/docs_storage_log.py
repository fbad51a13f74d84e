"""ECS events for storage-path log lines: ``logs-kvmscope.storage_log``.

Ids come from the line's file identity (device:inode:generation) and byte
offset, not from the cycle, so a line read twice (after a crash before its
read position was saved) is one event in Elasticsearch.
"""

from __future__ import annotations

from agent.records.snapshot import Snapshot
from agent.shipping.ecs import Doc, builder

_CATEGORY = {
    "io_error": (["host"], ["error"], "failure"),
    "iscsi_failure": (["host"], ["error"], "failure"),
    "check_condition": (["host"], ["info"], None),
    "nop_timeout": (["network"], ["connection", "error"], "failure"),
    "nop_out_failed": (["network"], ["connection", "error"], "failure"),
    "conn_error": (["network"], ["connection", "error"], "failure"),
    "ping_timeout": (["network"], ["connection", "error"], "failure"),
    "recovery_timeout": (["network"], ["connection", "error"], "failure"),
    "bind_failed": (["network"], ["connection", "error"], "failure"),
    "recovered": (["network"], ["connection", "change"], "success"),
    "scsi_timeout": (["host"], ["error"], "failure"),
    "mpath_fail_path": (["host"], ["change", "error"], "failure"),
    "mpath_checker_failed": (["host"], ["change", "error"], "failure"),
    "mpath_queue_timeout": (["host"], ["error"], "failure"),
    "mpath_queueing": (["host"], ["change", "error"], "failure"),
    "mpath_queueing_disabled": (["host"], ["change"], None),
    "mpath_remaining_paths": (["host"], ["info"], None),
    "mpath_reinstate_path": (["host"], ["change"], "success"),
    "mpath_reinstated": (["host"], ["change"], "success"),
    "mpath_recovered": (["host"], ["change"], "success"),
}


def _mp_names(snap) -> dict[str, str]:
    """MAJ:MIN -> name of the multipath maps and their paths (the kernel names both by number)."""
    out: dict[str, str] = {}
    for m in snap.multipath_maps if snap is not None else ():
        if m.devno:
            out[m.devno] = m.name
        out.update({p.devno: p.name for p in m.paths if p.name})
    return out


@builder(Snapshot.storage_log)
def log_docs(data, prev, snap, prev_snap):
    names = _mp_names(snap)
    for e in data.events:
        cat, typ, outcome = _CATEGORY.get(e.kind, (["host"], ["info"], None))
        yield Doc(
            "storage_log",
            f"{e.file_id}@{e.offset}",
            {
                "event.category": cat,
                "event.type": typ,
                "event.outcome": outcome,
                "event.action": e.kind.replace("_", "-"),
                "event.original": e.message,
                "message": e.message,
                "log.file.path": e.path,
                "log.offset": e.offset,
                "log.logger": e.origin,
                "process.name": {"qemu": "qemu-system-x86_64"}.get(e.origin, e.origin),
                "kvmscope.log.kind": e.kind,
                "kvmscope.log.file_id": e.file_id,
                "kvmscope.vm.name": e.vm,
                "kvmscope.iscsi.connection.cid": e.cid,
                "kvmscope.iscsi.session.sid": e.sid,
                "kvmscope.iscsi.error_code": e.error_code,
                "kvmscope.iscsi.error_name": e.error_name,
                "kvmscope.scsi.sense_key": e.sense_key,
                "kvmscope.scsi.ascq": e.ascq,
                "kvmscope.multipath.map": names.get(e.map, e.map) if e.map else None,
                "kvmscope.multipath.path": names.get(e.device, e.device) if e.device else None,
                "kvmscope.multipath.active_paths": e.active_paths,
                "kvmscope.multipath.no_path_retry": e.retries,
            },
            timestamp=e.time,
            id_time=False,
        )
