"""dm-multipath maps, their path groups and paths (source: multipath).

The kernel's view (``dmsetup table``/``status`` of the ``multipath`` target,
drivers/md/dm-mpath.c) is the truth for what I/O does now: which paths the
map may use (``A``ctive / ``F``ailed), how often each failed since the table
was loaded, whether ``queue_if_no_path`` is set and whether the map is
holding I/O right now. multipathd's view (``multipathd show maps json``)
adds what only it knows: the path checker's verdict (ready, faulty, ghost
...), the SCSI device state, the sdX names, the WWID and the no_path_retry
countdown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def parse_no_path_retry(queueing: str | None) -> tuple[str, int | None]:
    """multipathd's ``queueing`` column → (mode, number).

    ``off`` → ("fail", None); ``on`` → ("queue", None) (forever); ``N chk``
    → ("retry", N): N checker intervals of queueing once the last path
    fails; ``N sec`` → ("counting", N): no path now, N seconds of queueing
    left; ``-`` or anything else → ("unknown", None).
    """
    q = (queueing or "").strip()
    if q == "off":
        return "fail", None
    if q == "on":
        return "queue", None
    m = re.fullmatch(r"(\d+) (chk|sec)", q)
    if m:
        return ("retry" if m.group(2) == "chk" else "counting"), int(m.group(1))
    return "unknown", None


@dataclass(frozen=True)
class MultipathPath:
    devno: str  # MAJ:MIN as the kernel's table names it
    name: str | None  # sdX
    group: int  # 1-based priority group number
    dm_state: str  # active | failed (kernel A/F)
    fail_count: int | None = None  # kernel: failures of this path since the table was loaded
    checker_state: str | None = None  # multipathd chk_st: ready | faulty | ghost | shaky | i/o pending | delayed ...
    dev_state: str | None = None  # multipathd dev_st: running | offline | blocked | transport-offline ...
    checker: str | None = None  # tur | directio | ...
    priority: int | None = None

    @property
    def active(self) -> bool:
        return self.dm_state == "active"


@dataclass(frozen=True)
class MultipathGroup:
    number: int  # 1-based
    state: str  # active | enabled | disabled (kernel A/E/D)
    selector: str | None = None  # service-time 0 | round-robin 0 | queue-length 0
    priority: int | None = None


@dataclass(frozen=True)
class MultipathMap:
    name: str  # dm name (mpatha, or the WWID without user_friendly_names)
    dm: str | None = None  # dm-N
    devno: str | None = None  # MAJ:MIN of the map
    uuid: str | None = None  # WWID
    features: str = ""  # the table's feature words, e.g. "1 queue_if_no_path"
    queue_if_no_path: bool = False  # the kernel queues I/O when no path is left
    queueing_io: bool = False  # the kernel holds I/O right now (status queue_io flag)
    no_path_retry: str | None = None  # multipathd "queueing": off | on | N chk | N sec | -
    hwhandler: str | None = None
    vendor: str | None = None
    product: str | None = None
    path_faults: int | None = None  # multipathd: path failures it counted on this map
    active_group: int | None = None  # the group the kernel sends I/O to (status "current pg")
    groups: tuple[MultipathGroup, ...] = ()
    paths: tuple[MultipathPath, ...] = ()
    # processes holding the map open, (pid, comm): re-read every cycle while the map is degraded (a failed
    # path or none usable), else once a minute; names the workloads a failover stalls or an outage hangs
    openers: tuple[tuple[int, str], ...] = ()

    @property
    def active_paths(self) -> int:
        return sum(1 for p in self.paths if p.active)

    @property
    def stalled(self) -> bool:
        """No usable path and the kernel queues: I/O to this map hangs until a path returns."""
        return self.active_paths == 0 and bool(self.paths) and (self.queue_if_no_path or self.queueing_io)

    @property
    def no_path_retry_mode(self) -> tuple[str, int | None]:
        """:func:`parse_no_path_retry` of multipathd's ``queueing`` column."""
        return parse_no_path_retry(self.no_path_retry)

    def path(self, name_or_devno: str) -> MultipathPath | None:
        return next((p for p in self.paths if name_or_devno in (p.name, p.devno)), None)


@dataclass(frozen=True)
class Multipath:
    maps: tuple[MultipathMap, ...] = ()
    # why multipathd's part (checker state, names, no_path_retry) is missing, if it is
    multipathd: str | None = None
    # why the kernel's part (dmsetup) is missing, if it is
    kernel: str | None = None

    def by_name(self, name: str) -> MultipathMap | None:
        return next((m for m in self.maps if m.name == name or m.dm == name), None)

    def leg_of(self, dev: str) -> tuple[MultipathMap, MultipathPath] | None:
        """The map and path of a leg given as sdX or MAJ:MIN."""
        for m in self.maps:
            p = m.path(dev)
            if p is not None:
                return m, p
        return None
