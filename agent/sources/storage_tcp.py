"""TCP connections to storage portals, with tcp_info and the owning process.

Sources: inet_diag (NETLINK_SOCK_DIAG, see :mod:`agent.sources.netlink_diag`)
for every TCP socket whose remote port is a storage port
(``storage.ports``, default 3260), then ``/proc/<pid>/fd`` links
(``socket:[<inode>]``) to find the process that owns each socket: for QEMU's
built-in libiscsi initiator that is the VM's qemu process. Kernel
(open-iscsi) connections belong to no process (iscsid hands the socket to
the kernel); they are joined to their session by local port instead.

Cost: one netlink dump per family per cycle (only the sockets to a storage
port are decoded); the /proc fd scan runs only for sockets not seen before
(the inode → pid map is cached while the socket lives).
"""

from __future__ import annotations

import os
from functools import partial

from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.records.tcp import StorageConnection, StorageConnections, share_tcp_info
from agent.sources import SourceContext, register
from agent.sources.netlink_diag import DiagSocket, SharedTcpInfo, dump_tcp


_new = object.__new__


def socket_owners(paths: HostPaths, inodes: set[int]) -> dict[int, tuple[int, str]]:
    """inode -> (pid, comm) for the given socket inodes, by scanning /proc/*/fd."""
    want = {f"socket:[{i}]" for i in inodes}
    found: dict[int, tuple[int, str]] = {}
    try:
        pids = [int(p) for p in os.listdir(paths.procfs) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = paths.proc(str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # exited, or not ours to read
            continue
        hit = []
        for fd in fds:
            try:
                link = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if link in want:
                hit.append(int(link[8:-1]))
        if hit:
            try:
                comm = paths.read_text(paths.proc(str(pid), "comm")).strip()
            except OSError:
                comm = None
            for i in hit:
                found[i] = (pid, comm)
            if len(found) == len(inodes):
                break
    return found


def select_storage(socks: list[DiagSocket], ports: set[int]) -> list[DiagSocket]:
    return [s for s in socks if s.dport in ports and s.state != "TIME_WAIT"]


@register("storage_tcp", description="TCP connections to storage ports: tcp_info (inet_diag) and owning process")
class StorageTcpSource:
    def __init__(self, ctx: SourceContext, dump=None):
        self.paths = ctx.paths
        self.ports = set(ctx.config.storage.ports)
        # the kernel's dump holds every TCP socket of the host: decode only those to a storage port; each
        # one's tcp_info shares the values that did not move with the last dump's (SharedTcpInfo)
        self._shared = None if dump is not None else SharedTcpInfo()
        self.dump = dump if dump is not None else partial(dump_tcp, dports=frozenset(self.ports),
                                                          tcp_info=self._shared)
        self._owners: dict[int, tuple[int, str] | None] = {}
        self._infos: dict[tuple, object] = {}  # (4-tuple, inode) -> last cycle's TcpInfo (a dump given to us)

    def collect(self) -> StorageConnections:
        socks = select_storage(self.dump(), self.ports)
        if self._shared is not None:
            self._shared.rotate()
        if not socks:
            raise NoData(f"no TCP connections to storage ports {sorted(self.ports)}")
        inodes = {s.inode for s in socks if s.inode}
        unknown = {i for i in inodes if i not in self._owners}
        if unknown:
            found = socket_owners(self.paths, unknown)
            for i in unknown:
                self._owners[i] = found.get(i)
        self._owners = {i: v for i, v in self._owners.items() if i in inodes}
        out = []
        infos = {}
        shared = self._shared is not None  # the dump shared them already
        for s in socks:
            owner = self._owners.get(s.inode)
            if shared:
                info = s.info
            else:
                key = (s.src, s.sport, s.dst, s.dport, s.inode)
                info = infos[key] = share_tcp_info(s.info, self._infos.get(key))
            # StorageConnection(...) without its frozen __init__'s setattr per field (every field, in order)
            conn = _new(StorageConnection)
            conn.__dict__.update(
                family="ipv6" if ":" in s.dst else "ipv4",
                state=s.state,
                src=s.src,
                sport=s.sport,
                dst=s.dst,
                dport=s.dport,
                inode=s.inode,
                pid=owner[0] if owner else None,
                comm=owner[1] if owner else None,
                info=info,
            )
            out.append(conn)
        self._infos = infos
        out.sort(key=lambda c: (c.dst, c.dport, c.src, c.sport))
        return StorageConnections(tuple(out))

    def close(self) -> None:
        pass
