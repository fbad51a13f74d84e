"""dm-multipath maps and paths: the kernel's table and status, and multipathd's view.

Sources:
  * ``dmsetup table --target multipath`` and ``dmsetup status --target
    multipath`` (drivers/md/dm-mpath.c ``multipath_status``): per map the
    feature words (``queue_if_no_path``), the hardware handler, the path
    groups with their selector, and per path its MAJ:MIN, ``A``/``F``
    (the kernel sends I/O to it, or failed it) and its fail count since the
    table was loaded; the status line's first feature value is ``queue_io``:
    the map holds I/O right now (no usable path with queue_if_no_path, or a
    path-group initialisation in flight). This is what I/O does; it needs
    only the dm_multipath module, not multipathd.
  * ``multipathd show maps json`` (multipath-tools libmultipath/print.c,
    JSON major version 0): the path checker's state (``chk_st``: ready,
    faulty, ghost, shaky, i/o pending, delayed), the SCSI device state
    (``dev_st``), the sdX names, the WWID, the map's ``queueing``
    (``off``, ``on``, ``N chk`` = no_path_retry N with paths present,
    ``N sec`` = seconds of queueing left with none) and ``path_faults``.
  * ``/sys/block/dm-N/dm/name`` and ``dev`` (the map's dm-N and MAJ:MIN),
    ``/sys/dev/block/MAJ:MIN`` (a path's sdX when multipathd is not there).

Any kernel with dm_multipath; multipath-tools 0.7 or later for the JSON
(0.9.4 in Debian 12 checked). Cost: three short commands per cycle (each
~10 ms on a real host; 1-4 s on the lab's TCG-emulated kernel host, where
most of it is starting the process), all within one budget (three quarters
of the collector deadline by default) and no fixed per-call limit: the two
dmsetup calls end by two thirds of the budget, so a hung dmsetup leaves
multipathd its third, and a hung multipathd costs its part of that cycle
(the kernel's part still comes). The source always returns within the
budget, before the collector deadline.
Once a minute (every cycle while a map is degraded) one stat per open file
of every process, to name who holds each map open, within the same budget
(on a slow host the scan is cut short and tried again next cycle).

Caveats: ``dmsetup`` and ``multipathd`` need root (CAP_SYS_ADMIN for the
device-mapper ioctls, the multipathd socket is root-only). A path that
multipathd removed (``dev_loss_tmo`` expired) is gone from both views.
The kernel's fail count restarts when multipathd reloads the table.
Without multipathd nobody reinstates a failed path: that is reported
(``multipathd`` reason), not hidden.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import replace
from typing import Callable

from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.records.multipath import Multipath, MultipathGroup, MultipathMap, MultipathPath, parse_no_path_retry
from agent.sources import SourceContext, register
from agent.sources.iscsi_kernel import CommandTimeout, Runner, run_command

__all__ = ["MultipathSource", "build_maps", "parse_dm_status", "parse_dm_table", "parse_multipathd_json",
           "parse_no_path_retry"]

_DEVNO = re.compile(r"\d+:\d+")
_GROUP_STATE = {"A": "active", "E": "enabled", "D": "disabled"}


class ParseError(ValueError):
    """A dmsetup line that does not follow the multipath target's format."""


# --------------------------------------------------------------------------
# parsers (pure)


def _split_lines(text: str) -> list[tuple[str, list[str]]]:
    """``name: start length multipath args...`` lines → (name, args after the target name)."""
    out = []
    for line in text.splitlines():
        name, sep, rest = line.partition(": ")
        words = rest.split()
        if not sep or len(words) < 3 or words[2] != "multipath":
            continue  # "No devices found", another target type, noise
        out.append((name.strip(), words[3:]))
    return out


class _Words:
    def __init__(self, words: list[str], where: str):
        self.w, self.i, self.where = words, 0, where

    def take(self) -> str:
        if self.i >= len(self.w):
            raise ParseError(f"{self.where}: line ends early")
        self.i += 1
        return self.w[self.i - 1]

    def count(self) -> int:
        v = self.take()
        if not v.isdigit():
            raise ParseError(f"{self.where}: expected a count, got {v!r}")
        return int(v)

    def counted(self) -> list[str]:
        return [self.take() for _ in range(self.count())]


def parse_dm_table(text: str) -> dict[str, dict]:
    """``dmsetup table`` lines of multipath maps → {name: {features, hwhandler, groups: [{selector, paths}]}}.

    Table format (dm-mpath.c): ``<#features> <features...> <#hw args>
    <hw handler...> <#groups> <initial group> [<selector> <#sel args> <args...>
    <#paths> <#path args> [<MAJ:MIN> <path args...>]...]...``.
    A line that breaks the format is left out (raise only if every line does).
    """
    out: dict[str, dict] = {}
    for name, words in _split_lines(text):
        w = _Words(words, f"table of {name}")
        try:
            features = w.counted()
            hw = w.counted()
            ngroups = w.count()
            w.count()  # the initial group
            groups = []
            for _ in range(ngroups):
                selector = w.take()
                sel_args = w.counted()
                npaths, nargs = w.count(), w.count()
                paths = []
                for _ in range(npaths):
                    dev = w.take()
                    [w.take() for _ in range(nargs)]
                    paths.append(dev)
                # written as multipathd shows it: "service-time 0" (name, argument count, arguments)
                groups.append({"selector": " ".join([selector, str(len(sel_args)), *sel_args]), "paths": paths})
        except ParseError:
            continue
        out[name] = {"features": " ".join([str(len(features)), *features]), "feature_words": features,
                     "hwhandler": " ".join(hw) or None, "groups": groups}
    return out


def parse_dm_status(text: str) -> dict[str, dict]:
    """``dmsetup status`` lines of multipath maps → {name: {queue_io, current_group, groups: [{state, paths}]}}.

    Status format (dm-mpath.c, STATUSTYPE_INFO): ``2 <queue_io> <pg_init_count>
    <#hw args> <args...> <#groups> <current group> [<A|E|D> <#sel args>
    <args...> <#paths> <#path info args> [<MAJ:MIN> <A|F> <fail count>
    <info args...>]...]...``. Older kernels print one feature value
    (``1 <queue_io>``): the count is honoured.
    """
    out: dict[str, dict] = {}
    for name, words in _split_lines(text):
        w = _Words(words, f"status of {name}")
        try:
            feats = w.counted()
            queue_io = bool(feats) and feats[0] == "1"
            w.counted()  # hardware handler status
            ngroups, current = w.count(), w.count()
            groups = []
            for _ in range(ngroups):
                st = w.take()
                if st not in _GROUP_STATE:
                    raise ParseError(f"status of {name}: group state {st!r}")
                w.counted()  # selector status of the group
                npaths, nargs = w.count(), w.count()
                paths = []
                for _ in range(npaths):
                    dev, state, fails = w.take(), w.take(), w.take()
                    if state not in ("A", "F") or not fails.isdigit():
                        raise ParseError(f"status of {name}: path {dev} {state} {fails}")
                    [w.take() for _ in range(nargs)]
                    paths.append({"devno": dev, "dm_state": "active" if state == "A" else "failed",
                                  "fail_count": int(fails)})
                groups.append({"state": _GROUP_STATE[st], "paths": paths})
        except ParseError:
            continue
        out[name] = {"queue_io": queue_io, "current_group": current or None, "groups": groups}
    return out


def _int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    return None


def _str(v) -> str | None:
    if not isinstance(v, str):
        return None
    v = v.strip()
    return None if v in ("", "[undef]", "undef", "#") else v


def parse_multipathd_json(text: str) -> dict[str, dict]:
    """``multipathd show maps json`` → {map name: {uuid, dm, queueing, ..., paths: {devno: {...}}}}.

    Only what this source uses is read; anything of an unexpected type
    becomes None. Raises ValueError when the text is not that JSON at all.
    """
    doc = json.loads(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("maps"), list):
        raise ValueError("no \"maps\" list in multipathd's JSON")
    out: dict[str, dict] = {}
    for m in doc["maps"]:
        if not isinstance(m, dict) or not _str(m.get("name")):
            continue
        paths: dict[str, dict] = {}
        groups: list[dict] = []
        for g in m.get("path_groups") or []:
            if not isinstance(g, dict):
                continue
            groups.append({"number": _int(g.get("group")), "selector": _str(g.get("selector")),
                           "priority": _int(g.get("pri")), "dm_state": _str(g.get("dm_st"))})
            for p in g.get("paths") or []:
                if not isinstance(p, dict):
                    continue
                devno = _str(p.get("dev_t"))
                if devno is None or not _DEVNO.fullmatch(devno):
                    continue
                paths[devno] = {"name": _str(p.get("dev")), "checker_state": _str(p.get("chk_st")),
                                "dev_state": _str(p.get("dev_st")), "dm_state": _str(p.get("dm_st")),
                                "checker": _str(p.get("checker")), "priority": _int(p.get("pri")),
                                "group": _int(g.get("group"))}
        out[m["name"].strip()] = {
            "uuid": _str(m.get("uuid")), "dm": _str(m.get("sysfs")), "queueing": _str(m.get("queueing")),
            "features": _str(m.get("features")), "hwhandler": _str(m.get("hwhandler")),
            "vendor": _str(m.get("vend")), "product": _str(m.get("prod")),
            "path_faults": _int(m.get("path_faults")), "dm_state": _str(m.get("dm_st")),
            "groups": groups, "paths": paths,
        }
    return out


def build_maps(table: dict[str, dict] | None, status: dict[str, dict] | None, daemon: dict[str, dict] | None,
               dm_devs: dict[str, tuple[str, str]], dev_names: Callable[[str], str | None]) -> list[MultipathMap]:
    """Join the kernel's table and status with multipathd's view (pure).

    The kernel's table and status are the truth for path states when both
    are there; multipathd's JSON alone still gives the maps (its dm_st).
    ``dm_devs``: dm name -> (dm-N, MAJ:MIN) from sysfs; ``dev_names``:
    MAJ:MIN -> sdX when multipathd does not name a path.
    """
    names = sorted(set(table or {}) | set(status or {}) | set(daemon or {}))
    out = []
    for name in names:
        t = (table or {}).get(name)
        s = (status or {}).get(name)
        d = (daemon or {}).get(name) or {}
        dpaths: dict[str, dict] = d.get("paths") or {}
        groups: list[MultipathGroup] = []
        paths: list[MultipathPath] = []
        if s is not None:
            for gi, g in enumerate(s["groups"], 1):
                sel = t["groups"][gi - 1]["selector"] if t and gi <= len(t["groups"]) else None
                dg = next((x for x in d.get("groups", []) if x.get("number") == gi), {})
                groups.append(MultipathGroup(gi, g["state"], sel or dg.get("selector"), dg.get("priority")))
                for p in g["paths"]:
                    dp = dpaths.get(p["devno"], {})
                    paths.append(MultipathPath(
                        devno=p["devno"], name=dp.get("name") or dev_names(p["devno"]), group=gi,
                        dm_state=p["dm_state"], fail_count=p["fail_count"], checker_state=dp.get("checker_state"),
                        dev_state=dp.get("dev_state"), checker=dp.get("checker"), priority=dp.get("priority")))
        else:  # multipathd only (dmsetup missing or failed)
            for g in d.get("groups", []):
                if g.get("number") is not None:
                    groups.append(MultipathGroup(g["number"], g.get("dm_state") or "unknown", g.get("selector"),
                                                 g.get("priority")))
            for devno, dp in sorted(dpaths.items()):
                paths.append(MultipathPath(
                    devno=devno, name=dp.get("name") or dev_names(devno), group=dp.get("group") or 0,
                    dm_state=dp.get("dm_state") or "unknown", checker_state=dp.get("checker_state"),
                    dev_state=dp.get("dev_state"), checker=dp.get("checker"), priority=dp.get("priority")))
        feature_words = t["feature_words"] if t else (d.get("features") or "").split()[1:]
        dm, devno = dm_devs.get(name, (d.get("dm"), None))
        out.append(MultipathMap(
            name=name, dm=dm or d.get("dm"), devno=devno, uuid=d.get("uuid"),
            features=t["features"] if t else (d.get("features") or ""),
            queue_if_no_path="queue_if_no_path" in feature_words,
            queueing_io=bool(s and s["queue_io"]), no_path_retry=d.get("queueing"),
            hwhandler=(t["hwhandler"] if t else None) or _hw(d.get("hwhandler")),
            vendor=d.get("vendor"), product=d.get("product"), path_faults=d.get("path_faults"),
            active_group=s["current_group"] if s else None, groups=tuple(groups), paths=tuple(paths)))
    return out


def _hw(v: str | None) -> str | None:
    """multipathd's ``hwhandler`` ("1 alua", "0") → the handler's words, None for none."""
    if not v:
        return None
    words = v.split()
    if words and words[0].isdigit():
        return " ".join(words[1:]) or None
    return v


# --------------------------------------------------------------------------
# reading


def read_dm_devices(paths: HostPaths) -> dict[str, tuple[str, str]]:
    """dm name -> (dm-N, MAJ:MIN) from /sys/block/dm-*/dm/name and dev."""
    out = {}
    base = paths.sys("block")
    try:
        names = sorted(n for n in os.listdir(base) if n.startswith("dm-"))
    except OSError:
        return out
    for n in names:
        try:
            name = paths.read_text(base / n / "dm" / "name").strip()
            dev = paths.read_text(base / n / "dev").strip()
        except OSError:
            continue
        out[name] = (n, dev)
    return out


def dev_name_reader(paths: HostPaths) -> Callable[[str], str | None]:
    def name(devno: str) -> str | None:
        try:
            return os.path.basename(os.path.realpath(paths.sys("dev", "block", devno), strict=True))
        except (OSError, RuntimeError):
            return None

    return name


def read_openers(paths: HostPaths, devnos: set[str], limit: int = 64,
                 stop: Callable[[], bool] = lambda: False) -> dict[str, list[tuple[int, str]]] | None:
    """MAJ:MIN -> processes with that block device open, from ``/proc/<pid>/fd/*`` (stat of each link).

    Costs one stat per open file of every process. Processes that vanish or
    deny access are skipped; at most ``limit`` per device. ``stop()`` is asked
    between processes: when it says so (the source's time budget is spent,
    e.g. on a slow emulated host) the scan ends and None is returned.
    """
    want = {}
    for d in devnos:
        ma, mi = d.split(":")
        want[os.makedev(int(ma), int(mi))] = d
    out: dict[str, list[tuple[int, str]]] = {}
    try:
        pids = [int(n) for n in os.listdir(paths.proc()) if n.isdigit()]
    except OSError:
        return out
    for pid in sorted(pids):
        if stop():
            return None
        fd_dir = paths.proc(str(pid), "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        hit = set()
        for fd in fds:
            try:
                st = os.stat(fd_dir / fd)
            except OSError:
                continue
            if st.st_rdev in want and (st.st_mode & 0o170000) == 0o060000:  # a block device
                hit.add(want[st.st_rdev])
        if not hit:
            continue
        try:
            comm = paths.read_text(paths.proc(str(pid), "comm")).strip()
        except OSError:
            comm = "?"
        for d in hit:
            if len(out.setdefault(d, [])) < limit:
                out[d].append((pid, comm))
    return out


MIN_CALL = 0.05  # seconds: less budget than this left, no call is started
BUDGET_SHARE = 0.75  # of agent.collector_timeout: the default budget (the rest: parsing, the openers scan)
KERNEL_SHARE = 2 / 3  # of the budget: dmsetup's calls end by then, multipathd always has the rest


@register("multipath", description="dm-multipath maps and paths: dmsetup table/status and multipathd's view")
class MultipathSource:
    """Kernel table and status first (what I/O does), then multipathd, within one budget.

    ``budget`` (default: three quarters of ``agent.collector_timeout``)
    bounds the three commands together; the two dmsetup calls must end
    within ``KERNEL_SHARE`` of it, so multipathd is still asked when dmsetup
    hangs. ``timeout``, when given, also caps each call. No fixed cap by
    default: on a slow host (TCG emulation, a loaded machine) one dmsetup
    takes seconds, and a cap of 2 s failed the whole source there.
    """

    def __init__(self, ctx: SourceContext, runner: Runner = run_command, timeout: float | None = None,
                 budget: float | None = None, monotonic: Callable[[], float] = time.monotonic):
        self.paths = ctx.paths
        self.runner = runner
        self.timeout = timeout
        self.budget = budget if budget is not None else ctx.config.agent.collector_timeout * BUDGET_SHARE
        self._mono = monotonic
        self.openers_every = 60.0  # s between scans of /proc/*/fd for the healthy maps
        self._openers_at = float("-inf")
        self._openers: dict[str, tuple[tuple[int, str], ...]] = {}

    def _run(self, argv: list[str], deadline: float, what: str = "the budget") -> str:
        left = deadline - self._mono()
        if left < MIN_CALL:
            raise CommandTimeout(f"{' '.join(argv)} not run: {what} was spent")
        return self.runner(argv, left if self.timeout is None else min(self.timeout, left))

    def _with_openers(self, maps: list[MultipathMap], deadline: float) -> list[MultipathMap]:
        """Who holds each map open: every cycle for degraded maps, every ``openers_every`` s for all.

        Within the cycle's budget: a scan cut short keeps the previous answer
        (and is tried again next cycle)."""
        now = self._mono()
        degraded = {m.devno for m in maps if m.devno and m.paths and m.active_paths < len(m.paths)}
        want = set(degraded)
        if now - self._openers_at >= self.openers_every:
            want |= {m.devno for m in maps if m.devno}
            self._openers_at = now
        elif not want:
            return [replace(m, openers=self._openers.get(m.devno, ())) for m in maps]
        who = read_openers(self.paths, want, stop=lambda: self._mono() > deadline) if want else {}
        if who is None:  # budget spent: keep what was known, scan again next cycle
            self._openers_at = float("-inf")
            who = {d: list(self._openers.get(d, ())) for d in want}
        for d in want:
            self._openers[d] = tuple(who.get(d, ()))
        return [replace(m, openers=self._openers.get(m.devno, ())) for m in maps]

    def collect(self) -> Multipath:
        if not self.paths.sys("module", "dm_multipath").exists():
            raise NoData("no dm-multipath: module dm_multipath not loaded")
        start = self._mono()
        deadline = start + self.budget
        kernel_deadline = start + self.budget * KERNEL_SHARE
        kernel_what = f"dmsetup's share ({self.budget * KERNEL_SHARE:.3g}s) of the budget of {self.budget:g}s"
        table = status = daemon = None
        kernel_err = daemon_err = None
        try:
            table = parse_dm_table(self._run(["dmsetup", "table", "--target", "multipath"], kernel_deadline,
                                             kernel_what))
            status = parse_dm_status(self._run(["dmsetup", "status", "--target", "multipath"], kernel_deadline,
                                               kernel_what))
        except (OSError, RuntimeError) as e:
            kernel_err, table, status = str(e), None, None
        try:
            daemon = parse_multipathd_json(self._run(["multipathd", "show", "maps", "json"], deadline,
                                                     f"the budget of {self.budget:g}s"))
        except (OSError, RuntimeError, ValueError) as e:
            daemon_err = f"multipathd: {e}"
        if table is None and daemon is None:
            raise RuntimeError(f"neither dmsetup ({kernel_err}) nor multipathd ({daemon_err}) answered")
        maps = build_maps(table, status, daemon, read_dm_devices(self.paths), dev_name_reader(self.paths))
        if not maps:
            raise NoData("no multipath maps" + (f" ({daemon_err})" if daemon_err else ""))
        maps = self._with_openers(maps, deadline)
        if daemon is not None and table is not None:
            missing = sorted(set(table) - set(daemon))
            if missing:
                daemon_err = f"multipathd does not know map(s) {', '.join(missing)}"
        return Multipath(tuple(maps), multipathd=daemon_err, kernel=kernel_err)

    def close(self) -> None:
        pass
