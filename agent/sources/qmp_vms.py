"""Stand-alone QEMU (no libvirt) through QMP sockets.

Sources: QMP ``query-blockstats`` (qapi/block-core.json ``BlockStats`` /
``BlockDeviceStats``: rd/wr/flush operations, bytes, ``*_total_time_ns``,
failed operations, ``idle_time_ns``) and ``query-block`` (the drive's
``inserted.file`` / ``image.filename``, e.g. ``iscsi://HOST:PORT/IQN/LUN``
for QEMU's libiscsi driver, or the same node written as a ``json:{...}``
pseudo-filename, which is what QEMU 7.2 reports for ``-drive
file=iscsi://...,format=raw``; see :func:`plain_qemu_filename`). Sockets are found by the glob patterns in
``qmp.sockets``.

Opt-in latency histograms (``qmp.latency_histograms``): the source issues
``block-latency-histogram-set`` once per drive (QEMU >= 4.0; named
``x-block-latency-histogram-set`` before) and then reads
``rd/wr/flush_latency_histogram`` from query-blockstats. Do not point this at
libvirt-managed QEMU: libvirt marks a domain whose monitor is used behind
its back as tainted (``custom-monitor``), and libvirt already holds the
monitor socket of its domains.

QEMU runs the guest and its answers are outside input: every value is
type-checked at the parser (counters are JSON integers in 0..2**64-1,
names are strings). A disk with a bad counter loses its counters for that
cycle, the VM's ``error`` names the member and the value, and the source
counts it in ``dropped["invalid_value"]``; nothing a QEMU says can fail the
/metrics page or another VM's documents.

The VM's pid is the process listening on the socket, as the kernel tells
the client (``SO_PEERCRED``); failing that, the one trusted QEMU whose
command line names exactly that socket path (``-qmp unix:PATH``,
``-chardev socket,path=PATH``), see :class:`agent.sources.qemu_procs.Owners`.

Every socket has its own deadline (``qmp.timeout``) and its own thread: a
socket that accepts and never answers marks that VM failed, and the cycle
still completes on time.
"""

from __future__ import annotations

import glob
import json
import socket
import struct
import threading
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from agent.errors import NoData
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from agent.sources import SourceContext, register
from agent.sources._values import U64_MAX, valid_counter
from agent.sources._vm_common import host_devno, parse_iscsi_url, plain_qemu_filename
from agent.sources.qemu_procs import Owners, ProcessCache


class QmpError(Exception):
    pass


class QmpClient:
    """A minimal QMP client with an absolute deadline on every exchange."""

    def __init__(self, path: str, deadline: float):
        self.path = path
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""
        self.peer_pid: int | None = None  # the process listening on the socket (SO_PEERCRED), 0 if not in our pid namespace

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise QmpError("no answer before the deadline")
        return left

    def _read_msg(self) -> dict:
        while b"\n" not in self.buf:
            self.sock.settimeout(self._remaining())
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise QmpError("no answer before the deadline") from None
            if not chunk:
                raise QmpError("QMP socket closed by QEMU")
            self.buf += chunk
            if len(self.buf) > 64 << 20:
                raise QmpError("QMP answer larger than 64 MiB")
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError:
            raise QmpError(f"not JSON from QMP: {line[:80]!r}") from None
        if not isinstance(msg, dict):  # every QMP message is a JSON object (qapi/qmp-spec)
            raise QmpError(f"not a JSON object from QMP: {line[:80]!r}")
        return msg

    def connect(self) -> None:
        self.sock.settimeout(self._remaining())
        try:
            self.sock.connect(self.path)
        except OSError as e:
            raise QmpError(f"cannot connect: {e.strerror or e}") from None
        try:
            self.peer_pid = struct.unpack("3i", self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError:
            self.peer_pid = None
        greeting = self._read_msg()
        if "QMP" not in greeting:
            raise QmpError("not a QMP greeting")
        self.execute("qmp_capabilities")

    def execute(self, cmd: str, args: dict | None = None):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.settimeout(self._remaining())
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read_msg()
            if "event" in reply:
                continue  # asynchronous events may come before the answer
            if "error" in reply:
                e = reply["error"]
                if not isinstance(e, dict):
                    raise QmpError(f"{cmd}: error {str(e)[:80]!r}")
                raise QmpError(f"{cmd}: {e.get('class')}: {e.get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


# BlockDeviceStats members read as counters (QAPI int/uint64) -> DiskStats field
COUNTERS = (("rd_operations", "rd_reqs"), ("rd_bytes", "rd_bytes"), ("rd_total_time_ns", "rd_time_ns"),
            ("wr_operations", "wr_reqs"), ("wr_bytes", "wr_bytes"), ("wr_total_time_ns", "wr_time_ns"),
            ("flush_operations", "fl_reqs"), ("flush_total_time_ns", "fl_time_ns"))
FAILED = ("failed_rd_operations", "failed_wr_operations", "failed_flush_operations")


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 24 else r[:20] + "..."


def _str(v) -> str | None:
    return v if isinstance(v, str) else None


def _hist(h, bad: list, where: str) -> dict | None:
    """A ``BlockLatencyHistogramInfo`` (boundaries: [uint64], bins: [uint64], len(bins) = len(boundaries) + 1)."""
    if not h:
        return None
    b = h.get("boundaries") if isinstance(h, dict) else None
    n = h.get("bins") if isinstance(h, dict) else None
    if (not isinstance(b, list) or not isinstance(n, list) or len(n) != len(b) + 1
            or not all(map(valid_counter, b)) or not all(map(valid_counter, n))):
        bad.append((where, _show(h)))
        return None
    return {"boundaries_ns": list(b), "bins": list(n)}


def parse_disk_stats(s, bad: list, disk: str) -> DiskStats | None:
    """``BlockDeviceStats`` -> DiskStats, or None if any counter is not a valid counter.

    Every value comes from a guest-controlled process: each is type-checked
    here, and a bad one is appended to ``bad`` as ("<disk> <member>", value)
    and costs this disk's counters for this cycle (a counter replaced by 0
    would be a false reset). An absent member is 0, as QEMU omits none.
    A histogram of the wrong shape is left out alone.
    """
    if not isinstance(s, dict):
        bad.append((f"{disk} stats", _show(s)))
        return None
    n = len(bad)
    vals = {}
    for member, attr in COUNTERS:
        v = s.get(member, 0)
        if valid_counter(v):
            vals[attr] = v
        else:
            bad.append((f"{disk} {member}", _show(v)))
    failed = 0
    for member in FAILED:
        v = s.get(member, 0)
        if valid_counter(v):
            failed += v
        else:
            bad.append((f"{disk} {member}", _show(v)))
    idle = s.get("idle_time_ns")
    if idle is not None and not valid_counter(idle):
        bad.append((f"{disk} idle_time_ns", _show(idle)))
    if len(bad) > n:
        return None
    hist = {op: _hist(s.get(f"{op}_latency_histogram"), bad, f"{disk} {op}_latency_histogram")
            for op in ("rd", "wr", "flush")}
    hist = {k: v for k, v in hist.items() if v}
    return DiskStats(**vals, failed_reqs=min(failed, U64_MAX), idle_time_ns=idle, histograms=hist or None)


def parse_blockstats(blockstats: list, block: list, bad: list | None = None) -> list[VmDisk]:
    """query-blockstats + query-block -> disks. Drives with no medium are skipped.

    Values of the wrong type (QEMU is guest-exposed and may be hostile) are
    left out and listed in ``bad`` as (where, value); see :func:`parse_disk_stats`.
    """
    bad = [] if bad is None else bad
    if not isinstance(blockstats, list) or not isinstance(block, list):
        raise QmpError("query-blockstats/query-block: not a list")
    files = {}
    for b in block:
        ins = b.get("inserted") if isinstance(b, dict) else None
        if not isinstance(ins, dict):
            continue
        key = _str(b.get("qdev")) or _str(b.get("device"))
        image = ins.get("image")
        files[key] = _str(ins.get("file")) or (_str(image.get("filename")) if isinstance(image, dict) else None)
    disks = []
    for bs in blockstats:
        if not isinstance(bs, dict):
            bad.append(("query-blockstats entry", _show(bs)))
            continue
        key = _str(bs.get("qdev")) or _str(bs.get("device"))
        if key not in files:
            continue
        name = _str(bs.get("device")) or _qdev_name(_str(bs.get("qdev"))) or _str(bs.get("node-name")) or "?"
        f = plain_qemu_filename(files[key] or "")
        if f.startswith("iscsi://"):
            host, port, iqn, lun = parse_iscsi_url(f)
            if lun is None:
                bad.append((f"{name} iscsi URL", _show(f)))
            disk = VmDisk(target=name, kind="network", protocol="iscsi", source=f"{iqn}/{lun}",
                          hosts=((host, port),) if host else (), iqn=iqn, lun=lun)
        elif f.startswith("/dev/"):
            disk = VmDisk(target=name, kind="block", source=f, host_devno=host_devno("block", f))
        else:
            kind = "file" if f else "unknown"
            disk = VmDisk(target=name, kind=kind, source=f or None, host_devno=host_devno(kind, f or None))
        disks.append(replace(disk, stats=parse_disk_stats(bs.get("stats", {}), bad, name)))
    return disks


def _member(ret, key: str, bad: list) -> str | None:
    """A string member of a QMP answer (query-name's name, query-status's status...); anything else is bad."""
    v = ret.get(key) if isinstance(ret, dict) else None
    if v is None or isinstance(v, str):
        return v
    bad.append((key, _show(v)))
    return None


def _qdev_name(qdev: str | None) -> str | None:
    """``/machine/peripheral/virtio-disk0/virtio-backend`` -> ``virtio-disk0``."""
    if not qdev:
        return None
    parts = [p for p in qdev.split("/") if p]
    if len(parts) >= 3 and parts[1] in ("peripheral", "peripheral-anon"):
        return parts[2]
    return parts[-1] if parts else None


@register("qmp", description="stand-alone QEMU VMs through QMP sockets (qmp.sockets globs)")
class QmpSource:
    def __init__(self, ctx: SourceContext):
        self.paths = ctx.paths
        self.cfg = ctx.config.qmp
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="qmp")
        self._hist_done: set[tuple[str, str]] = set()
        self._busy: dict[str, threading.Event] = {}
        self.dropped = {"invalid_value": 0, "expired": 0}  # cumulative, exported through the loop's health
        self._procs = ProcessCache()  # the QEMU processes' claims and impostor verdicts, across cycles

    def _query(self, path: str) -> tuple[Vm, list, int | None]:
        c = QmpClient(path, time.monotonic() + self.cfg.timeout)
        try:
            c.connect()
            bad: list = []
            name = _member(c.execute("query-name"), "name", bad) or path
            status = _member(c.execute("query-status"), "status", bad) or "unknown"
            uuid = _member(c.execute("query-uuid"), "UUID", bad)
            hist_errors = []
            if self.cfg.latency_histograms:
                blocks = c.execute("query-block")
                for b in blocks if isinstance(blocks, list) else []:
                    # the command wants the frontend device: its QOM path reaches the
                    # virtio backend (the short id would name the PCI proxy)
                    dev = _str(b.get("qdev")) if isinstance(b, dict) else None
                    if not (dev and b.get("inserted")) or (path, dev) in self._hist_done:
                        continue
                    args = {"id": dev, "boundaries": list(self.cfg.histogram_boundaries_ns)}
                    try:
                        try:
                            c.execute("block-latency-histogram-set", args)
                        except QmpError as e:
                            if "CommandNotFound" not in str(e):
                                raise
                            c.execute("x-block-latency-histogram-set", args)  # QEMU < 4.0
                        self._hist_done.add((path, dev))
                    except QmpError as e:
                        hist_errors.append(f"latency histogram on {dev}: {e}")
            disks = parse_blockstats(c.execute("query-blockstats"), c.execute("query-block"), bad)
            if bad:
                shown = ", ".join(f"{w}={v}" for w, v in bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
                hist_errors.append(f"invalid values from QMP left out: {shown}")
            vm = Vm(
                name=name,
                uuid=uuid.lower() if uuid else None,
                state=status,
                pid=None,
                disks=tuple(disks),
                manager="qmp",
                error="; ".join(hist_errors) or None,
            )
            return vm, bad, c.peer_pid
        finally:
            c.close()

    def collect(self) -> Vms:
        paths = sorted({p for pat in self.cfg.sockets for p in glob.glob(pat)})
        if not self.cfg.sockets:
            raise NoData("no QMP sockets configured (qmp.sockets)")
        if not paths:
            raise NoData(f"no QMP socket matches {self.cfg.sockets}")
        self._prune(set(paths))
        futures = {}
        failed = []
        for p in paths:
            ev = self._busy.get(p)
            if ev is not None and not ev.is_set():
                failed.append((p, "previous query still hanging; skipped"))
                continue
            ev = threading.Event()
            self._busy[p] = ev

            def run(p=p, ev=ev):
                try:
                    return self._query(p)
                finally:
                    ev.set()

            futures[p] = self._pool.submit(run)
        vms = []
        end = time.monotonic() + self.cfg.timeout + 0.5
        owners = Owners(self.paths, cache=self._procs)
        for p, fut in futures.items():
            try:
                vm, bad, peer = fut.result(timeout=max(0.0, end - time.monotonic()))
                self.dropped["invalid_value"] += len(bad)
                pid, note = owners.by_socket(p, peer)
                vms.append(replace(vm, pid=pid, error="; ".join(x for x in (vm.error, note) if x) or None))
            except FutureTimeout:
                failed.append((p, f"no answer within {self.cfg.timeout:g}s"))
            except QmpError as e:
                failed.append((p, str(e)))
            except Exception as e:
                failed.append((p, f"{type(e).__name__}: {e}"))
        return Vms(tuple(sorted(vms, key=lambda v: v.name)), tuple(failed))

    def _prune(self, present: set[str]) -> None:
        """Forget sockets that no longer match: their histogram set-up (a new QEMU on the same path starts
        without histograms) and their finished queries. A query still hanging is kept, so it is not started twice."""
        before = len(self._hist_done) + len(self._busy)
        self._hist_done = {k for k in self._hist_done if k[0] in present}
        self._busy = {p: ev for p, ev in self._busy.items() if p in present or not ev.is_set()}
        self.dropped["expired"] += before - len(self._hist_done) - len(self._busy)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
