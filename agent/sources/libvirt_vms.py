"""VMs and their disks from libvirt: bulk stats plus the domain XML.

Sources: ``virConnectGetAllDomainStats`` (libvirt >= 1.2.8) with the STATE
and BLOCK groups, the ACTIVE filter and the NOWAIT flag (libvirt >= 4.5):
a domain whose job lock is held by a migration or shutdown is skipped
instead of stalling every other VM. Fields ``block.<n>.{name,rd.reqs,
rd.bytes,rd.times,wr.*,fl.reqs,fl.times}`` (times in ns, cumulative since
the QEMU process started). Disk backends come from the domain XML (``<disk
type='network'><source protocol='iscsi' name='IQN/LUN'><host name port/>``
for QEMU's libiscsi, ``<source file|dev>`` for host block devices), cached
per domain ID and re-read when the disk set changes.

The QEMU pid of a domain is libvirt's own (``/run/libvirt/qemu/<name>.pid``)
when it checks out, else the one trusted process with the domain's ``-uuid``
(see :mod:`agent.sources.qemu_procs`: impostors and ambiguity are reported in
the VM's error, never silently chosen).

The connection is read-only (``openReadOnly``) and is re-opened after an
error. A hung libvirtd is handled by the agent loop's deadline.
"""

from __future__ import annotations

import logging
import time
import xml.etree.ElementTree as ET
from dataclasses import fields, replace

from agent.errors import NoData
from agent.records.addr import canonical_host
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from agent.sources import SourceContext, register
from agent.sources._values import U64_MAX, ascii_uint, valid_counter
from agent.sources._vm_common import host_devno, split_iscsi_name
from agent.sources.qemu_procs import Owners, ProcessCache

log = logging.getLogger(__name__)

DOMAIN_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended"}


def parse_domain_disks(xml: str, problems: list | None = None) -> list[VmDisk]:
    """Disks of a domain XML (device='disk' only; cdroms and floppies skipped).

    The XML is whatever the domain's definer wrote: a port or LUN that is not
    a plain number (``"²"`` passes ``isdigit()``) becomes the default port or
    an unknown LUN, and a sentence naming the disk and the value is appended
    to ``problems``. Raises only ET.ParseError (not XML at all).
    """
    problems = [] if problems is None else problems
    root = ET.fromstring(xml)
    disks = []
    for d in root.findall("./devices/disk"):
        if d.get("device", "disk") not in ("disk", "lun"):
            continue
        target = d.find("target")
        if target is None or not target.get("dev"):
            continue
        kind = d.get("type", "unknown")
        src = d.find("source")
        drv = d.find("driver")
        protocol = source = None
        hosts: list[tuple[str, int]] = []
        iqn = lun = None
        if src is not None:
            if kind == "network":
                protocol = src.get("protocol")
                source = src.get("name")
                for h in src.findall("host"):
                    port = h.get("port")
                    num = ascii_uint(port, 65535) if port else 3260
                    if num is None:
                        problems.append(f"disk {target.get('dev')}: host port {port!r} is not a port number; 3260 assumed")
                    hosts.append((canonical_host(h.get("name", "")), num or 3260))
                if protocol == "iscsi":
                    iqn, lun = split_iscsi_name(source)
                    if iqn is not None and lun is None:
                        problems.append(f"disk {target.get('dev')}: LUN {source.rpartition('/')[2]!r} in {source!r} "
                                        "is not a LUN number")
            elif kind == "file":
                source = src.get("file")
            elif kind == "block":
                source = src.get("dev")
            elif kind == "volume":
                source = f"{src.get('pool')}/{src.get('volume')}"
        disks.append(
            VmDisk(
                target=target.get("dev"),
                kind=kind,
                protocol=protocol,
                source=source,
                hosts=tuple(hosts),
                iqn=iqn,
                lun=lun,
                cache=drv.get("cache") if drv is not None else None,
                io=drv.get("io") if drv is not None else None,
                error_policy=drv.get("error_policy") if drv is not None else None,
                rerror_policy=drv.get("rerror_policy") if drv is not None else None,
                host_devno=host_devno(kind, source),
            )
        )
    return disks


# block.<n>.<field> -> DiskStats attribute (libvirt typed parameters, unsigned long long)
BLOCK_FIELDS = (("rd.reqs", "rd_reqs"), ("rd.bytes", "rd_bytes"), ("rd.times", "rd_time_ns"),
                ("wr.reqs", "wr_reqs"), ("wr.bytes", "wr_bytes"), ("wr.times", "wr_time_ns"),
                ("fl.reqs", "fl_reqs"), ("fl.times", "fl_time_ns"))
MAX_BLOCK_COUNT = 4096  # more disks than any domain can have (bounds the loop over a bad block.count)


def parse_block_stats(stats: dict, bad: list | None = None, skipped: list | None = None) -> dict[str, DiskStats]:
    """``block.<n>.*`` of a bulk-stats record -> {target: DiskStats}.

    With the BACKING flag off, one entry per disk (the top of the chain).
    A single missing field is 0: libvirt documents that fields may be absent. A
    disk named without any of its request counters has no entry and its name
    is appended to ``skipped``: that is how NOWAIT answers while another client
    (an exporter, vdsm, nova) holds the domain's job, and reading it as zeros
    would make the counters fall to 0 and jump back (a false reset and a false
    burst of every request since the VM started). A value that is not a counter
    (libvirt types them, but they come from the QEMU process) is appended to
    ``bad`` as ("<disk> <field>", value) and costs that disk its counters for
    the cycle.
    """
    bad = [] if bad is None else bad
    out: dict[str, DiskStats] = {}
    count = stats.get("block.count", 0)
    if not valid_counter(count):
        bad.append(("block.count", repr(count)[:24]))
        return out
    get = stats.get
    for i in range(min(count, MAX_BLOCK_COUNT)):
        name_key, fields = _BLOCK_KEYS[i] if i < len(_BLOCK_KEYS) else _block_keys(i)
        name = get(name_key)
        if not name or not isinstance(name, str) or name in out:
            continue
        if fields[0][0] not in stats and fields[3][0] not in stats and fields[6][0] not in stats:
            if skipped is not None:
                skipped.append(name)  # rd.reqs, wr.reqs, fl.reqs all absent: no counters this time
            continue
        vals, ok = {}, True
        for key, field, attr in fields:
            v = get(key, 0)
            if type(v) is int and 0 <= v <= U64_MAX:  # valid_counter, inline (8 values per disk per cycle)
                vals[attr] = v
            else:
                bad.append((f"{name} {field}", repr(v)[:24]))
                ok = False
        if ok:  # DiskStats(**vals) without its frozen __init__'s setattr per field (800 disks a cycle at 200 VMs)
            st = _new(DiskStats)
            d = st.__dict__
            d.update(vals)
            d.update(_NO_QMP_STATS)
            out[name] = st
    return out


_new = object.__new__
_NO_QMP_STATS = {"failed_reqs": None, "idle_time_ns": None, "histograms": None}  # DiskStats' fields after BLOCK_FIELDS


_BLOCK_KEYS: list[tuple[str, tuple[tuple[str, str, str], ...]]] = []  # disk index -> its stats keys, made once


def _block_keys(i: int) -> tuple[str, tuple[tuple[str, str, str], ...]]:
    while len(_BLOCK_KEYS) <= i:
        p = f"block.{len(_BLOCK_KEYS)}."
        _BLOCK_KEYS.append((p + "name", tuple((p + field, field, attr) for field, attr in BLOCK_FIELDS)))
    return _BLOCK_KEYS[i]


def _counters_skipped(stats: dict) -> bool:
    """A running domain's record whose first disk is named without counters (NOWAIT, job busy)."""
    return bool(stats.get("block.count")) and "block.0.name" in stats and "block.0.rd.reqs" not in stats \
        and "block.0.wr.reqs" not in stats


def _import_libvirt():
    try:
        import libvirt
    except ImportError:
        raise NoData("python3-libvirt not importable (install Debian python3-libvirt)") from None
    # libvirt prints every error to stderr by default; we report them ourselves
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _disk_fields(d: VmDisk) -> dict:
    """Every field of the disk but its counters, in field order (stats None in its place)."""
    return {f.name: None if f.name == "stats" else getattr(d, f.name) for f in fields(d)}


@register("libvirt", description="VMs and per-disk I/O from libvirt bulk stats and domain XML")
class LibvirtSource:
    def __init__(self, ctx: SourceContext):
        self.paths = ctx.paths
        self.uri = ctx.config.libvirt.uri
        self._conn = None
        # disks, XML problems, their targets, each one's fields but stats (VmDisk keywords)
        self._xml_cache: dict[tuple[str, int], tuple[list[VmDisk], tuple[str, ...], frozenset, list[dict]]] = {}
        self.dropped = {"invalid_value": 0}  # cumulative, exported through the loop's health
        self._procs = ProcessCache()  # the QEMU processes' claims and impostor verdicts, across cycles

    def _connect(self, libvirt):
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except libvirt.libvirtError:
                pass
            self._drop()
        try:
            self._conn = libvirt.openReadOnly(self.uri)
        except libvirt.libvirtError as e:
            msg = e.get_error_message() or str(e)
            if "No such file or directory" in msg or "Failed to connect socket" in msg:
                raise NoData(f"libvirt not running at {self.uri}: {msg}") from None
            raise RuntimeError(f"cannot connect to libvirt at {self.uri}: {msg}") from None
        return self._conn

    def _drop(self):
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:
            pass
        self._conn = None

    def _domain(self, libvirt, dom, key: tuple[str, int], name: str, stats: dict, procs: Owners) -> Vm:
        """One domain's record. Values that do not parse are left out, named in ``error`` and counted."""
        uuid = key[0]
        bad: list = []
        skipped: list = []
        block = parse_block_stats(stats, bad, skipped)
        targets = block.keys() | set(skipped) if skipped else block.keys()
        cached = self._xml_cache.get(key)
        problems: list[str] = []
        if cached is None or cached[2] != targets and targets:
            try:
                disks = parse_domain_disks(dom.XMLDesc(0), problems)
                self._xml_cache[key] = (disks, tuple(problems), frozenset(d.target for d in disks),
                                        [_disk_fields(d) for d in disks])
                self.dropped["invalid_value"] += len(problems)  # counted once per parse of the XML
            except (libvirt.libvirtError, ET.ParseError) as e:
                disks = [VmDisk(target=t, kind="unknown") for t in block]
                problems = [f"domain XML unavailable: {e}"]
            disks = [replace(d, stats=block.get(d.target)) for d in disks]
        else:
            problems = list(cached[1])
            # the cached disks with this cycle's counters: VmDisk(**fields, stats=...) without its frozen __init__
            # (each field set once; the cached fields hold every one, stats in its place)
            disks = []
            for kw in cached[3]:
                disk = _new(VmDisk)
                d = disk.__dict__
                d.update(kw)
                d["stats"] = block.get(kw["target"])
                disks.append(disk)
        if bad:
            self.dropped["invalid_value"] += len(bad)
            problems.append("invalid values from libvirt left out: " + ", ".join(f"{w}={v}" for w, v in bad[:3])
                            + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""))
        pid, note = procs.by_uuid(uuid, name)
        if note:
            problems.append(note)
        state = stats.get("state.state")
        if "state.state" not in stats:
            problems.append("stats skipped: domain busy (job lock held, e.g. migration); NOWAIT")
        if skipped:
            problems.append(f"no I/O counters this cycle for {', '.join(skipped)}: another libvirt client held "
                            "the domain's job (NOWAIT; asked twice)")
        return Vm(
            name=name,
            uuid=uuid,
            state=DOMAIN_STATES.get(state, "unknown") if isinstance(state, int) else "unknown",
            pid=pid,
            disks=tuple(disks),
            manager="libvirt",
            error="; ".join(problems) or None,
        )

    def collect(self) -> Vms:
        libvirt = _import_libvirt()
        conn = self._connect(libvirt)
        groups = libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK
        flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | getattr(
            libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0
        )
        try:
            records = conn.getAllDomainStats(groups, flags)
        except libvirt.libvirtError as e:
            self._drop()  # the connection may be gone; re-open next cycle
            raise RuntimeError(f"libvirt getAllDomainStats: {e.get_error_message() or e}") from None
        busy = [i for i, (_dom, st) in enumerate(records) if _counters_skipped(st)]
        if busy:
            # NOWAIT answered without the counters of domains whose job another client held (a query job
            # lasts milliseconds): those domains are asked once more, a moment later
            time.sleep(0.05)
            try:
                again = conn.domainListGetStats([records[i][0] for i in busy], groups,
                                                getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0))
                by_uuid = {d.UUIDString(): st for d, st in again}
                records = list(records)
                for i in busy:
                    dom, _st = records[i]
                    st = by_uuid.get(dom.UUIDString())
                    if st is not None:
                        records[i] = (dom, st)
            except libvirt.libvirtError:
                pass  # the first answer stands; the disks without counters say so
        procs = Owners(self.paths, cache=self._procs)
        vms, failed, seen = [], [], set()
        for dom, stats in records:
            try:
                name, uuid, dom_id = dom.name(), dom.UUIDString().lower(), dom.ID()
            except libvirt.libvirtError as e:
                failed.append(("?", f"domain vanished: {e.get_error_message()}"))
                continue
            seen.add((uuid, dom_id))
            try:
                vms.append(self._domain(libvirt, dom, (uuid, dom_id), name, stats, procs))
            except Exception as e:  # one domain's odd data costs that domain only
                log.debug("libvirt domain %s", name, exc_info=True)
                failed.append((name, f"cannot read domain: {type(e).__name__}: {e}"))
        self._xml_cache = {k: v for k, v in self._xml_cache.items() if k in seen}
        if not vms and not failed:
            raise NoData(f"no running domains at {self.uri}")
        vms.sort(key=lambda v: v.name)
        return Vms(tuple(vms), tuple(failed))

    def close(self) -> None:
        self._drop()
