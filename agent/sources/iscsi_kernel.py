"""Kernel (open-iscsi) iSCSI sessions: sysfs topology plus iscsiadm counters.

Sources:
  * ``/sys/class/iscsi_session/session<SID>/`` (``targetname``, ``state``
    LOGGED_IN|FAILED|FREE, ``recovery_tmo``, ``tpgt``, ``ifacename``...),
    ``/sys/class/iscsi_connection/connection<SID>:<CID>/`` (``address``,
    ``port``, ``persistent_address``/``_port``, ``local_port``, ``state``,
    ``ping_tmo``, ``recv_tmo``), ``/sys/class/iscsi_host/host<H>/``
    (``netdev``, ``ipaddress``, ``initiatorname``); the session's SCSI disks
    under ``device/target<H>:0:<T>/<H>:0:<T>:<L>/block/<sdX>`` and their
    device-mapper parents through ``/sys/block/dm-N/slaves/``
    (drivers/scsi/scsi_transport_iscsi.c, iscsi_tcp.c).
  * ``iscsiadm -m session -r SID -s``: the 21 iSCSI SNMP counters and the
    iscsi_tcp extended ones (open-iscsi usr/iscsiadm.c ``session_stats``).
    Most PDU counters are u32 in the kernel and wrap; :class:`Unwrapper`
    turns them into monotonic totals.

Any kernel with ``scsi_transport_iscsi``; open-iscsi 2.0-870 or later.
Cost: a few dozen small sysfs reads and one iscsiadm call per session per
cycle, all calls together within one budget (half the collector deadline by
default): a hung iscsid costs the counters of that cycle, never the sysfs
states (see :class:`IscsiKernelSource`).

Caveats: during recovery or a logout, attributes return errors or vanish
between listing and reading (offload drivers answer -ENOTCONN for
``address``/``port`` while unbound). Each read is tolerant: a missing file
becomes ``None``; a session whose directory vanished is reported gone, not
as an error.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.records.addr import canonical_host
from agent.records.iscsi import IscsiConnection, IscsiSession, IscsiSessions, ScsiDisk
from agent.sources import SourceContext, register

# u64 counters; every other counter in the SNMP block is u32 and wraps
U64_STATS = frozenset({"txdata_octets", "rxdata_octets", "tx_sendpage_failures", "rx_discontiguous_hdr", "eh_abort_cnt"})


# --------------------------------------------------------------------------
# parsers (pure)


def parse_iscsiadm_stats(text: str) -> dict[str, int]:
    """``name: value`` lines of ``iscsiadm -m session -r SID -s``.

    The header line changed over open-iscsi versions (``Stats for session
    [sid: 1, ...]`` now, ``[01]`` or ``[01:000001] addr,tpgt target`` in old
    ones): only the counter lines are read.
    """
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\s+([a-z_][a-z0-9_]*):\s*(\d+)\s*", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def _int_or_none(s: str | None) -> int | None:
    if s is None:
        return None
    try:
        return int(s)
    except ValueError:
        return None


class Unwrapper:
    """Monotonic totals from u32 counters that wrap at 2**32.

    Keyed by (session identity, counter). A u64 counter that goes down means
    the session was re-created under the same SID: its totals restart.
    """

    def __init__(self):
        self._last: dict[tuple, int] = {}
        self._total: dict[tuple, int] = {}

    def update(self, ident: tuple, raw: dict[str, int]) -> dict[str, int]:
        reset = any(
            name in U64_STATS and (ident, name) in self._last and v < self._last[(ident, name)]
            for name, v in raw.items()
        )
        out = {}
        for name, v in raw.items():
            key = (ident, name)
            if reset or key not in self._last:
                self._total[key] = v
            else:
                delta = v - self._last[key]
                if delta < 0 and name not in U64_STATS:
                    delta += 1 << 32
                self._total[key] += max(delta, 0)
            self._last[key] = v
            out[name] = self._total[key]
        return out

    def forget_except(self, idents: set[tuple]) -> None:
        for key in [k for k in self._last if k[0] not in idents]:
            self._last.pop(key, None)
            self._total.pop(key, None)


# --------------------------------------------------------------------------
# sysfs reading


class _Gone(Exception):
    """The session directory disappeared while being read."""


def _read(paths: HostPaths, p: Path) -> str | None:
    try:
        return paths.read_text(p).strip()
    except FileNotFoundError:
        return None
    except OSError:  # -ENOTCONN / -EIO during recovery, -EACCES for CHAP attrs
        return None


def _listdir(p: Path) -> list[str]:
    try:
        return sorted(os.listdir(p))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _resolve(p: Path) -> Path | None:
    try:
        return p.resolve(strict=True)
    except (OSError, RuntimeError):
        return None


def read_session(paths: HostPaths, sid: int) -> IscsiSession:
    base = paths.sys("class", "iscsi_session", f"session{sid}")
    state = _read(paths, base / "state")
    target = _read(paths, base / "targetname")
    if state is None and target is None and not base.exists():
        raise _Gone(sid)
    dev = _resolve(base / "device")
    conns: list[IscsiConnection] = []
    disks: list[ScsiDisk] = []
    host = None
    if dev is not None:
        host = dev.parent.name if dev.parent.name.startswith("host") else None
        for entry in _listdir(dev):
            if entry.startswith("connection"):
                conns.append(_read_connection(paths, entry.removeprefix("connection")))
            elif entry.startswith("target"):
                disks.extend(_read_target_disks(paths, dev / entry))
    netdev = ipaddr = None
    if host:
        hbase = paths.sys("class", "iscsi_host", host)
        netdev = _read(paths, hbase / "netdev")
        ipaddr = _read(paths, hbase / "ipaddress")
    if not base.exists() or (dev is not None and not dev.exists()):
        raise _Gone(sid)  # logged out while we read it
    return IscsiSession(
        sid=sid,
        target=target,
        tpgt=_int_or_none(_read(paths, base / "tpgt")),
        state=state,
        recovery_tmo=_int_or_none(_read(paths, base / "recovery_tmo")),
        iface=_read(paths, base / "ifacename"),
        initiator=_read(paths, base / "initiatorname"),
        host=host,
        # unset: "(null)" (iscsi_tcp on a 6.1 kernel, seen on the lab's kernel host), "<NULL>", "default"
        netdev=None if netdev in _UNSET else netdev,
        host_ipaddress=None if ipaddr in _UNSET else canonical_host(ipaddr),
        connections=tuple(conns),
        disks=tuple(sorted(disks, key=lambda d: d.lun)),
    )


_UNSET = (None, "", "default", "<NULL>", "(null)")


def _read_connection(paths: HostPaths, cid: str) -> IscsiConnection:
    # The kernel writes ``address`` with %pI6, all eight groups in full
    # (drivers/scsi/libiscsi.c iscsi_conn_get_addr_param); iscsid writes
    # ``persistent_address`` as the portal was given. Both enter in the
    # inet_ntop form (canonical_host), the one inet_diag gives the socket.
    c = paths.sys("class", "iscsi_connection", f"connection{cid}")
    return IscsiConnection(
        cid=cid,
        address=canonical_host(_read(paths, c / "address")) or None,
        port=_int_or_none(_read(paths, c / "port")),
        persistent_address=canonical_host(_read(paths, c / "persistent_address")) or None,
        persistent_port=_int_or_none(_read(paths, c / "persistent_port")),
        local_port=_int_or_none(_read(paths, c / "local_port")),
        state=_read(paths, c / "state") or None,
        ping_tmo=_int_or_none(_read(paths, c / "ping_tmo")),
        recv_tmo=_int_or_none(_read(paths, c / "recv_tmo")),
    )


def _read_target_disks(paths: HostPaths, target_dir: Path) -> list[ScsiDisk]:
    out = []
    for hctl in _listdir(target_dir):
        if not re.fullmatch(r"\d+:\d+:\d+:\d+", hctl):
            continue
        d = target_dir / hctl
        names = _listdir(d / "block")
        name = names[0] if names else None
        devno = _read(paths, d / "block" / name / "dev") if name else None
        holders = tuple(_listdir(paths.sys("block", name, "holders"))) if name else ()
        holder_names = tuple(_read(paths, paths.sys("block", h, "dm", "name")) or h for h in holders)
        out.append(
            ScsiDisk(
                hctl=hctl,
                lun=int(hctl.rsplit(":", 1)[1]),
                name=name,
                devno=devno,
                state=_read(paths, d / "state"),
                holders=holders,
                holder_names=holder_names,
                ioerr_cnt=_hex_or_none(_read(paths, d / "ioerr_cnt")),
                iotmo_cnt=_hex_or_none(_read(paths, d / "iotmo_cnt")),
            )
        )
    return out


def _hex_or_none(s: str | None) -> int | None:
    """The SCSI device counters are printed as ``0x1f`` (drivers/scsi/scsi_sysfs.c)."""
    if s is None:
        return None
    try:
        return int(s, 0)
    except ValueError:
        return None


def list_sids(paths: HostPaths) -> list[int]:
    base = paths.sys("class", "iscsi_session")
    if not base.is_dir():
        raise NoData("no kernel iSCSI sessions: /sys/class/iscsi_session absent (iscsi_tcp not loaded)")
    sids = []
    for name in _listdir(base):
        m = re.fullmatch(r"session(\d+)", name)
        if m:
            sids.append(int(m.group(1)))
    return sorted(sids)


Runner = Callable[[list[str], float], str]


class CommandTimeout(RuntimeError):
    """The command did not finish before its deadline (and was killed with its children)."""


def run_command(argv: list[str], timeout: float) -> str:
    """Run a command with a deadline; raise RuntimeError with a clear reason.

    The command gets its own process group, killed as a whole at the
    deadline: a wrapper script's children (or iscsiadm's) do not outlive it.
    """
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(f"{argv[0]} not installed")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         errors="replace", start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        p.communicate()
        raise CommandTimeout(f"{' '.join(argv)} timed out after {timeout:g}s") from None
    if p.returncode != 0:
        lines = (err or out).strip().splitlines()
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {lines[-1] if lines else 'no output'}")
    return out


MIN_CALL = 0.05  # seconds: less budget than this left, no call is started


@register("iscsi_kernel", description="open-iscsi kernel sessions from sysfs, counters from iscsiadm")
class IscsiKernelSource:
    """Sessions from sysfs, then counters from iscsiadm within one budget for all sessions.

    ``stats_budget`` (default: half of ``agent.collector_timeout``) bounds
    all iscsiadm calls of a cycle together; each call also has its own
    ``stats_timeout`` when given (default: none but the budget's rest). Once the budget is spent, or after one call timed out
    (iscsid is not answering: the next call would wait the same), the
    remaining sessions are reported without counters, with the reason. The
    sessions not asked in one cycle are asked first in the next, and one
    whose call timed out is asked last: one hung session never starves the
    others for good.
    """

    def __init__(self, ctx: SourceContext, runner: Runner = run_command, stats_timeout: float | None = None,
                 stats_budget: float | None = None, monotonic: Callable[[], float] = time.monotonic):
        self.paths = ctx.paths
        self.runner = runner
        # one call may use what is left of the budget (None), or at most stats_timeout: on the lab's
        # kernel host (QEMU/TCG) one `iscsiadm -s` takes up to ~2.2 s, over the old fixed 2 s
        self.stats_timeout = stats_timeout
        self.stats_budget = stats_budget if stats_budget is not None else ctx.config.agent.collector_timeout / 2
        self._mono = monotonic
        self._skipped: list[int] = []  # sids not asked last cycle (budget spent): asked first now
        self._timed_out: list[int] = []  # sids whose call timed out last cycle: asked last now
        self.unwrap = Unwrapper()

    def collect(self) -> IscsiSessions:
        sids = list_sids(self.paths)
        if not sids:
            raise NoData("no kernel iSCSI sessions logged in")
        read, vanished = {}, []
        for sid in sids:
            try:
                read[sid] = read_session(self.paths, sid)
            except _Gone:
                vanished.append(sid)
        stats, problem = self._counters(read)
        # a session without counters this cycle keeps its totals: forget only sessions that are gone
        self.unwrap.forget_except({(sid, s.target) for sid, s in read.items()})
        sessions = tuple(_with_stats(s, *stats[sid]) for sid, s in read.items())
        return IscsiSessions(sessions, tuple(vanished), problem)

    def _counters(self, read: dict[int, IscsiSession]) -> tuple[dict[int, tuple], str | None]:
        """{sid: (unwrapped counters or None, why missing)} and the source-wide iscsiadm problem, if any."""
        deadline = self._mono() + self.stats_budget
        first = [sid for sid in self._skipped if sid in read]
        last = [sid for sid in self._timed_out if sid in read and sid not in first]
        order = first + [sid for sid in read if sid not in first and sid not in last] + last
        out: dict[int, tuple] = {}
        problem = stop = None
        skipped, timed_out = [], []
        for sid in order:
            left = deadline - self._mono()
            if stop is None and left < MIN_CALL:
                stop = f"skipped: the iscsiadm budget of {self.stats_budget:g}s for all sessions was spent"
                problem = problem or stop
            if stop is not None:
                out[sid] = (None, stop)
                skipped.append(sid)
                continue
            try:
                raw = parse_iscsiadm_stats(
                    self.runner(["iscsiadm", "-m", "session", "-r", str(sid), "-s"], left if self.stats_timeout is None else min(self.stats_timeout, left)))
                if raw:
                    out[sid] = (self.unwrap.update((sid, read[sid].target), raw), None)
                else:
                    out[sid] = (None, "iscsiadm printed no counters")
            except CommandTimeout as e:
                out[sid] = (None, str(e))
                timed_out.append(sid)
                problem = str(e)
                stop = f"skipped: iscsiadm timed out on session {sid} this cycle"
            except (OSError, RuntimeError) as e:
                out[sid] = (None, str(e))
                problem = str(e)
                if isinstance(e, FileNotFoundError):  # not installed: the same for every session
                    stop = str(e)
        self._skipped, self._timed_out = skipped, timed_out
        return out, problem

    def close(self) -> None:
        pass


def _with_stats(s: IscsiSession, stats, err) -> IscsiSession:
    from dataclasses import replace

    return replace(s, stats=stats, stats_error=err)
