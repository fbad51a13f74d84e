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

The connection is read-only (``openReadOnly``) and is re-opened after an
error. A hung libvirtd is handled by the agent loop's deadline.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

from agent.errors import NoData
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from agent.sources import SourceContext, register
from agent.sources._vm_common import host_devno, split_iscsi_name
from agent.sources.qemu_procs import qemu_processes

log = logging.getLogger(__name__)

DOMAIN_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended"}


def parse_domain_disks(xml: str) -> list[VmDisk]:
    """Disks of a domain XML (device='disk' only; cdroms and floppies skipped)."""
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
                    hosts.append((h.get("name", ""), int(port) if port and port.isdigit() else 3260))
                if protocol == "iscsi":
                    iqn, lun = split_iscsi_name(source)
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


def parse_block_stats(stats: dict) -> dict[str, DiskStats]:
    """``block.<n>.*`` of a bulk-stats record -> {target: DiskStats}.

    With the BACKING flag off, one entry per disk (the top of the chain).
    Missing fields are 0: libvirt documents that fields may be absent.
    """
    out: dict[str, DiskStats] = {}
    for i in range(int(stats.get("block.count", 0))):
        p = f"block.{i}."
        name = stats.get(p + "name")
        if not name or name in out:
            continue

        def g(k):
            return int(stats.get(p + k, 0) or 0)

        out[name] = DiskStats(
            rd_reqs=g("rd.reqs"),
            rd_bytes=g("rd.bytes"),
            rd_time_ns=g("rd.times"),
            wr_reqs=g("wr.reqs"),
            wr_bytes=g("wr.bytes"),
            wr_time_ns=g("wr.times"),
            fl_reqs=g("fl.reqs"),
            fl_time_ns=g("fl.times"),
        )
    return out


def _import_libvirt():
    try:
        import libvirt
    except ImportError:
        raise NoData("python3-libvirt not importable (install Debian python3-libvirt)") from None
    # libvirt prints every error to stderr by default; we report them ourselves
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


@register("libvirt", description="VMs and per-disk I/O from libvirt bulk stats and domain XML")
class LibvirtSource:
    def __init__(self, ctx: SourceContext):
        self.paths = ctx.paths
        self.uri = ctx.config.libvirt.uri
        self._conn = None
        self._xml_cache: dict[tuple[str, int], list[VmDisk]] = {}

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
        procs = {p.uuid: p.pid for p in qemu_processes(self.paths) if p.uuid}
        vms, failed, seen = [], [], set()
        for dom, stats in records:
            try:
                name, uuid, dom_id = dom.name(), dom.UUIDString().lower(), dom.ID()
            except libvirt.libvirtError as e:
                failed.append(("?", f"domain vanished: {e.get_error_message()}"))
                continue
            block = parse_block_stats(stats)
            key = (uuid, dom_id)
            seen.add(key)
            disks = self._xml_cache.get(key)
            error = None
            if disks is None or {d.target for d in disks} != set(block) and block:
                try:
                    disks = parse_domain_disks(dom.XMLDesc(0))
                    self._xml_cache[key] = disks
                except (libvirt.libvirtError, ET.ParseError) as e:
                    disks = [VmDisk(target=t, kind="unknown") for t in block]
                    error = f"domain XML unavailable: {e}"
            if "state.state" not in stats:
                error = error or "stats skipped: domain busy (job lock held, e.g. migration); NOWAIT"
            from dataclasses import replace

            disks = [replace(d, stats=block.get(d.target)) for d in disks]
            vms.append(
                Vm(
                    name=name,
                    uuid=uuid,
                    state=DOMAIN_STATES.get(stats.get("state.state"), "unknown") if "state.state" in stats else "unknown",
                    pid=procs.get(uuid),
                    disks=tuple(disks),
                    manager="libvirt",
                    error=error,
                )
            )
        self._xml_cache = {k: v for k, v in self._xml_cache.items() if k in seen}
        if not vms and not failed:
            raise NoData(f"no running domains at {self.uri}")
        vms.sort(key=lambda v: v.name)
        return Vms(tuple(vms), tuple(failed))

    def close(self) -> None:
        self._drop()
