"""QEMU processes on this host, from /proc/<pid>/cmdline.

Used to tie a VM (libvirt domain UUID, or the ``-name`` of a stand-alone
QEMU) to the process that owns its iSCSI sockets and issues its host block
I/O. Reads ``/proc/<pid>/comm`` first and the command line only for
``qemu*`` processes. Not a source by itself (no records of its own).

A process name and a command line are the process's own claim: any local
user can start a program named ``qemu-system-x86_64`` with ``-uuid`` of a
VM. Before a process is tied to a libvirt domain it must pass
:func:`impostor_reason`: real and effective uid root or a QEMU user
(``libvirt-qemu`` on Debian, ``qemu`` on RHEL), and an executable
(``/proc/<pid>/exe``) named like a QEMU binary, owned by root and writable
by nobody else. libvirt's own record comes first: it writes the pid of each
domain's QEMU to ``/run/libvirt/qemu/<name>.pid`` (libvirt has no pid API).
Two trusted processes claiming one UUID are reported as ambiguous, never
resolved by "the last one wins".

A source keeps a :class:`ProcessCache` across cycles: a process is known by
its pid, its start time (/proc/<pid>/stat, read instead of comm) and its
executable's device, inode, owner and mode (one stat); while none of them
changes, its command line is not read again and its verdict stands. A
reused pid, an exec or a chmod/chown of the binary is judged afresh.
"""

from __future__ import annotations

import os
import pwd
import re

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


def _stat_comm_start(raw: bytes) -> tuple[bytes, int | None]:
    """(comm, start time in clock ticks after boot) from /proc/<pid>/stat ``pid (comm) state ...``; the
    comm may hold spaces and parentheses, so the fields are counted from the last ')'."""
    i, j = raw.find(b"("), raw.rfind(b")")
    if i < 0 or j < i:
        return b"", None
    rest = raw[j + 1:].split()
    start = rest[19] if len(rest) > 19 else b""  # field 22 of proc(5); rest[0] is field 3 (state)
    return raw[i + 1:j], int(start) if start.isdigit() else None


def _read(path: str, size: int = 4096) -> bytes:
    """One read(2) of a small /proc file (comm, stat: well under ``size``)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _exe_identity(procfs: str, pid: str) -> tuple[int, int, int, int] | None:
    """(device, inode, owner, mode) of the executable behind /proc/<pid>/exe; None if it may not be read."""
    try:
        st = os.stat(f"{procfs}/{pid}/exe")
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_uid, st.st_mode


def qemu_processes(paths: HostPaths, cache: "ProcessCache | None" = None) -> list[QemuProcess]:
    """The processes whose name starts with ``qemu``, with their command line's claim, in pid order.

    With a ``cache`` (a source keeps one across cycles) a process seen before is not read again: the
    same pid, start time and executable (device, inode, owner, mode) is the same process running the
    same program, and its command line is the one it started with. Whatever changed (a reused pid, an
    exec, a chmod of the binary) is read afresh."""
    out = []
    procfs = str(paths.procfs)
    try:
        pids = [p for p in os.listdir(procfs) if p.isascii() and p.isdigit()]
    except OSError:
        return out
    join = os.path.join
    known = cache.procs if cache is not None else {}
    seen: dict[tuple, QemuProcess] = {}
    keys: dict[int, tuple] = {}
    was_qemu = {str(pid) for pid in cache.keys} if cache is not None else ()
    for p in pids:  # every process of the host, every cycle: plain reads of its name, no file object per read
        key = None
        try:
            if p in was_qemu:  # a QEMU last cycle: stat has its name and start time in one read
                try:
                    comm, start = _stat_comm_start(_read(f"{procfs}/{p}/stat"))
                    have_start = True
                except FileNotFoundError:
                    comm, start, have_start = _read(f"{procfs}/{p}/comm"), None, False
            else:  # any other process: its name (comm: cheaper for the kernel to write than stat)
                try:
                    comm, start, have_start = _read(f"{procfs}/{p}/comm"), None, False
                except FileNotFoundError:  # a /proc tree with stat files only (tests' fixtures)
                    comm, start = _stat_comm_start(_read(f"{procfs}/{p}/stat"))
                    have_start = True
            if not comm.strip().startswith(b"qemu"):
                continue
            pid = int(p)
            if not have_start:  # a QEMU (a few of the host's processes): its start time too
                try:
                    _comm, start = _stat_comm_start(_read(f"{procfs}/{p}/stat"))
                except FileNotFoundError:  # a /proc tree without stat files (tests' fixtures): the name alone
                    start = None
            if cache is not None and start is not None:
                exe = _exe_identity(procfs, p)
                key = (pid, start, *exe) if exe is not None else None
            q = known.get(key) if key is not None else None
            if q is None:
                with open(join(procfs, p, "cmdline"), "rb") as f:
                    raw = f.read()
                if not raw:
                    continue  # a zombie, or a kernel thread named qemu*
                q = parse_cmdline(pid, raw)
        except OSError:
            continue
        if key is not None:
            seen[key] = q
            keys[pid] = key
        out.append(q)
    if cache is not None:
        cache.procs, cache.keys = seen, keys  # processes gone (or changed) are forgotten, and their verdicts
        cache.verdicts = {k: v for k, v in cache.verdicts.items() if k[0] in seen}
    return sorted(out, key=lambda q: q.pid)


# -- identity: is this process really a VM's QEMU? -------------------------------

QEMU_USERS = ("libvirt-qemu", "qemu")  # Debian/Ubuntu, RHEL/Fedora: the user libvirt runs system QEMU as
QEMU_BINARY = re.compile(r"qemu-system-[A-Za-z0-9_.-]+|qemu-kvm|kvm")


def trusted_uids(users=QEMU_USERS) -> frozenset[int]:
    """root and the QEMU users that exist on this host."""
    out = {0}
    for u in users:
        try:
            out.add(pwd.getpwnam(u).pw_uid)
        except KeyError:
            pass
    return frozenset(out)


def parse_status_uids(text: str | bytes) -> tuple[int, int] | None:
    """(real, effective) uid from /proc/<pid>/status ``Uid:\treal\teffective\tsaved\tfs``."""
    if isinstance(text, str):
        text = text.encode("utf-8", "replace")
    i = 0 if text.startswith(b"Uid:") else text.find(b"\nUid:") + 1  # the first line that starts with it
    if i == 0 and not text.startswith(b"Uid:"):
        return None
    end = text.find(b"\n", i)
    f = (text[i:] if end < 0 else text[i:end]).split()[1:3]
    if len(f) == 2 and all(x.isdigit() for x in f):  # bytes: ASCII digits only
        return int(f[0]), int(f[1])
    return None


def impostor_reason(paths: HostPaths, pid: int, uids: frozenset[int]) -> str | None:
    """Why process ``pid`` cannot be a VM's QEMU, or None if it can.

    Checks the real and effective uid (/proc/<pid>/status) against ``uids``,
    and the executable behind /proc/<pid>/exe: a QEMU binary name, owned by
    root, not writable by group or others (a user's copy of any program,
    renamed, fails here). An exe the agent may not read (no CAP_SYS_PTRACE)
    is judged by the uid alone.
    """
    base = os.path.join(str(paths.procfs), str(pid))
    try:
        with open(base + "/status", "rb") as f:
            ids = parse_status_uids(f.read())
    except OSError:
        return "process gone"
    if ids is None:
        return "no Uid line in /proc/PID/status"
    bad = [u for u in ids if u not in uids]
    if bad:
        return f"uid {bad[0]} is not root or a QEMU user ({', '.join(QEMU_USERS)})"
    exe = base + "/exe"
    try:
        target = os.readlink(exe)
        st = os.stat(exe)
    except OSError:
        return None
    target = target.removesuffix(" (deleted)")  # QEMU upgraded under a running VM
    if not QEMU_BINARY.fullmatch(os.path.basename(target)):
        return f"executable {target} is not a QEMU binary"
    if st.st_uid != 0 or st.st_mode & 0o022:
        return f"executable {target} is owned by uid {st.st_uid} or writable by others"
    return None


def read_pidfile(paths: HostPaths, *parts: str) -> int | None:
    """A pid file's number (ASCII decimal), or None if absent or not a pid."""
    try:
        with open(os.path.join(str(paths.rundir), *parts), "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 0 < len(text) <= 10 else None


_UNSET = object()


class ProcessCache:
    """What :class:`Owners` learnt about the QEMU processes in earlier cycles (a source keeps one): the
    command line of each process (pid, start time) and the impostor verdict of each (pid, start time,
    executable's device, inode, owner and mode). Checking 200 processes afresh every cycle (status, exe
    link, exe stat, command line) was most of the libvirt source's time at 200 VMs.

    What a cached verdict does not follow: a change of uid without an exec. Gaining a trusted uid (root
    or a QEMU user) that way takes root's privileges already; a trusted QEMU that drops its privileges
    keeps the verdict it had (its claims were made by the trusted user who started it)."""

    def __init__(self) -> None:
        self.procs: dict[tuple, QemuProcess] = {}  # (pid, start time, exe dev, ino, uid, mode) -> its claim
        self.keys: dict[int, tuple] = {}  # pid -> that key, from the last scan
        self.verdicts: dict[tuple, str | None] = {}  # (that key, trusted uids) -> impostor_reason


class Owners:
    """The QEMU processes of one cycle, and who may own what.

    :meth:`by_uuid` answers for a libvirt domain, :meth:`by_socket` for a
    stand-alone QEMU's QMP socket. Each returns (pid or None, problem or
    None): a problem names the impostors left out or the ambiguity.
    """

    def __init__(self, paths: HostPaths, uids: frozenset[int] | None = None, cache: "ProcessCache | None" = None):
        self.paths = paths
        self.cache = cache
        self.procs = qemu_processes(paths, cache)
        self.uids = trusted_uids() if uids is None else uids
        self._why: dict[int, str | None] = {}
        self._by_uuid: dict[str, list[QemuProcess]] = {}  # -uuid -> the processes claiming it, in pid order
        for q in self.procs:
            self._by_uuid.setdefault(q.uuid, []).append(q)

    def why_not(self, pid: int) -> str | None:
        if pid not in self._why:
            self._why[pid] = self._verdict(pid)
        return self._why[pid]

    def _verdict(self, pid: int) -> str | None:
        """:func:`impostor_reason`, remembered in the cache for this process running this executable (its
        key from this cycle's scan: pid, start time, executable's device, inode, owner, mode) and these
        trusted uids; judged afresh when any of them changed."""
        key = self.cache.keys.get(pid) if self.cache is not None else None
        if key is None:  # no cache, no start time (a fixture tree) or an exe we may not stat: every time
            return impostor_reason(self.paths, pid, self.uids)
        vkey = (key, self.uids)
        v = self.cache.verdicts.get(vkey, _UNSET)
        if v is _UNSET:
            v = impostor_reason(self.paths, pid, self.uids)
            exe = _exe_identity(str(self.paths.procfs), str(pid))
            if v != "process gone" and exe is not None and (pid, key[1], *exe) == key:  # no exec meanwhile
                self.cache.verdicts[vkey] = v
        return v

    def _choose(self, claims: list[QemuProcess], what: str) -> tuple[int | None, str | None]:
        ok = [q.pid for q in claims if self.why_not(q.pid) is None]
        rejected = [f"pid {q.pid} ({self.why_not(q.pid)})" for q in claims if self.why_not(q.pid) is not None]
        note = f"ignored process(es) claiming {what}: {'; '.join(rejected)}" if rejected else None
        if len(ok) > 1:
            amb = f"ambiguous: trusted pids {', '.join(map(str, ok))} all claim {what}; no pid reported"
            return None, "; ".join(x for x in (amb, note) if x)
        return (ok[0] if ok else None), note

    def by_uuid(self, uuid: str, name: str | None = None) -> tuple[int | None, str | None]:
        """The QEMU of libvirt domain ``name``/``uuid``: libvirt's pid file if it checks out, else the
        one trusted process whose ``-uuid`` is ``uuid``."""
        claims = list(self._by_uuid.get(uuid, ()))
        pid = read_pidfile(self.paths, "libvirt", "qemu", f"{name}.pid") if name and "/" not in name else None
        if pid is not None and any(q.pid == pid for q in claims) and self.why_not(pid) is None:
            return pid, self._choose([q for q in claims if q.pid != pid and self.why_not(q.pid)], f"UUID {uuid}")[1]
        return self._choose(claims, f"UUID {uuid}")

    def by_socket(self, path: str, peer_pid: int | None = None) -> tuple[int | None, str | None]:
        """The QEMU listening on QMP socket ``path``: the kernel's answer (SO_PEERCRED of our connection)
        if it is a QEMU process here, else the one trusted process whose command line names exactly ``path``."""
        if peer_pid and any(q.pid == peer_pid for q in self.procs):
            return peer_pid, None
        want = os.path.abspath(path)
        claims = [q for q in self.procs if want in {os.path.abspath(p) for p in qmp_socket_paths(q.argv)}]
        return self._choose(claims, f"QMP socket {path}")


def _qemu_opts(value: str) -> list[str]:
    """QemuOpts ``a,b=c,,d`` -> ["a", "b=c,d"] (',,' is a literal comma)."""
    return [p.replace("\0", ",") for p in value.replace(",,", "\0").split(",")]  # argv never holds a NUL


def qmp_socket_paths(argv: tuple[str, ...]) -> set[str]:
    """Unix socket paths a QEMU command line serves: ``-qmp unix:PATH[,...]``, ``-qmp-pretty``,
    ``-chardev socket,path=PATH,...`` (with ``-mon``) and ``-monitor unix:PATH``."""
    out = set()
    for i, a in enumerate(argv[:-1]):
        v = argv[i + 1]
        if a in ("-qmp", "-qmp-pretty", "-monitor") and v.startswith("unix:"):
            out.add(_qemu_opts(v[5:])[0])
        elif a == "-chardev" and v.startswith("socket,"):
            for o in _qemu_opts(v)[1:]:
                if o.startswith("path="):
                    out.add(o[5:])
    out.discard("")
    return out
