"""QEMU processes on this host, from /proc/<pid>/cmdline.

Used to tie a VM (libvirt domain UUID, or the ``-name`` of a stand-alone
QEMU) to the process that owns its iSCSI sockets and issues its host block
I/O. Reads ``/proc/<pid>/comm`` first and the command line only for
``qemu*`` processes. Not a source by itself (no records of its own).
"""

from __future__ import annotations

import os

from agent.hostpaths import HostPaths
from agent.records.vms import QemuProcess


def parse_qemu_name(value: str) -> str:
    """``-name guest=vm0,debug-threads=on`` -> ``vm0`` (QemuOpts: ',,' is a literal comma)."""
    parts, cur, i = [], [], 0
    while i < len(value):
        ch = value[i]
        if ch == ",":
            if i + 1 < len(value) and value[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    for p in parts:
        if p.startswith("guest="):
            return p[6:]
    return parts[0] if parts and "=" not in parts[0] else value


def parse_cmdline(pid: int, raw: bytes) -> QemuProcess:
    argv = tuple(a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0"))
    name = uuid = None
    for i, a in enumerate(argv[:-1]):
        if a == "-name":
            name = parse_qemu_name(argv[i + 1])
        elif a == "-uuid":
            uuid = argv[i + 1].lower()
    return QemuProcess(pid, name, uuid, argv)


def qemu_processes(paths: HostPaths) -> list[QemuProcess]:
    out = []
    try:
        pids = [p for p in os.listdir(paths.procfs) if p.isdigit()]
    except OSError:
        return out
    for p in pids:
        try:
            comm = paths.read_text(paths.proc(p, "comm")).strip()
            if not comm.startswith("qemu"):
                continue
            with open(paths.proc(p, "cmdline"), "rb") as f:
                raw = f.read()
        except OSError:
            continue
        if raw:
            out.append(parse_cmdline(int(p), raw))
    return sorted(out, key=lambda q: q.pid)
