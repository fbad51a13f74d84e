"""Stand-alone QEMU (no libvirt) through QMP sockets.

Sources: QMP ``query-blockstats`` (qapi/block-core.json ``BlockStats`` /
``BlockDeviceStats``: rd/wr/flush operations, bytes, ``*_total_time_ns``,
failed operations, ``idle_time_ns``) and ``query-block`` (the drive's
``inserted.file`` / ``image.filename``, e.g. ``iscsi://HOST:PORT/IQN/LUN``
for QEMU's libiscsi driver). Sockets are found by the glob patterns in
``qmp.sockets``.

Opt-in latency histograms (``qmp.latency_histograms``): the source issues
``block-latency-histogram-set`` once per drive (QEMU >= 4.0; named
``x-block-latency-histogram-set`` before) and then reads
``rd/wr/flush_latency_histogram`` from query-blockstats. Do not point this at
libvirt-managed QEMU: libvirt marks a domain whose monitor is used behind
its back as tainted (``custom-monitor``), and libvirt already holds the
monitor socket of its domains.

Every socket has its own deadline (``qmp.timeout``) and its own thread: a
socket that accepts and never answers marks that VM failed, and the cycle
still completes on time.
"""

from __future__ import annotations

import glob
import json
import socket
import threading
import time
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from agent.errors import NoData
from agent.sources import SourceContext, register
from agent.sources._vm_records import DiskStats, Vm, VmDisk, Vms, host_devno, parse_iscsi_url
from agent.sources.qemu_procs import qemu_processes


class QmpError(Exception):
    pass


class QmpClient:
    """A minimal QMP client with an absolute deadline on every exchange."""

    def __init__(self, path: str, deadline: float):
        self.path = path
        self.deadline = deadline
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buf = b""

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
            return json.loads(line)
        except ValueError:
            raise QmpError(f"not JSON from QMP: {line[:80]!r}") from None

    def connect(self) -> None:
        self.sock.settimeout(self._remaining())
        try:
            self.sock.connect(self.path)
        except OSError as e:
            raise QmpError(f"cannot connect: {e.strerror or e}") from None
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
                raise QmpError(f"{cmd}: {e.get('class')}: {e.get('desc')}")
            return reply.get("return")

    def close(self) -> None:
        self.sock.close()


def _hist(stats: dict, key: str) -> dict | None:
    h = stats.get(key)
    if not h:
        return None
    return {"boundaries_ns": list(h.get("boundaries", [])), "bins": list(h.get("bins", []))}


def parse_blockstats(blockstats: list, block: list) -> list[VmDisk]:
    """query-blockstats + query-block -> disks. Drives with no medium are skipped."""
    files = {}
    for b in block or []:
        ins = b.get("inserted")
        if not ins:
            continue
        key = b.get("qdev") or b.get("device")
        files[key] = ins.get("file") or (ins.get("image") or {}).get("filename")
    disks = []
    for bs in blockstats or []:
        key = bs.get("qdev") or bs.get("device")
        if key not in files:
            continue
        name = bs.get("device") or _qdev_name(bs.get("qdev")) or bs.get("node-name") or "?"
        s = bs.get("stats", {})
        hist = {op: _hist(s, f"{op}_latency_histogram") for op in ("rd", "wr", "flush")}
        hist = {k: v for k, v in hist.items() if v}
        f = files[key] or ""
        if f.startswith("iscsi://"):
            host, port, iqn, lun = parse_iscsi_url(f)
            disk = VmDisk(target=name, kind="network", protocol="iscsi", source=f"{iqn}/{lun}",
                          hosts=((host, port),) if host else (), iqn=iqn, lun=lun)
        elif f.startswith("/dev/"):
            disk = VmDisk(target=name, kind="block", source=f, host_devno=host_devno("block", f))
        else:
            kind = "file" if f else "unknown"
            disk = VmDisk(target=name, kind=kind, source=f or None, host_devno=host_devno(kind, f or None))
        disks.append(
            replace(
                disk,
                stats=DiskStats(
                    rd_reqs=s.get("rd_operations", 0),
                    rd_bytes=s.get("rd_bytes", 0),
                    rd_time_ns=s.get("rd_total_time_ns", 0),
                    wr_reqs=s.get("wr_operations", 0),
                    wr_bytes=s.get("wr_bytes", 0),
                    wr_time_ns=s.get("wr_total_time_ns", 0),
                    fl_reqs=s.get("flush_operations", 0),
                    fl_time_ns=s.get("flush_total_time_ns", 0),
                    failed_reqs=sum(s.get(k, 0) for k in ("failed_rd_operations", "failed_wr_operations", "failed_flush_operations")),
                    idle_time_ns=s.get("idle_time_ns"),
                    histograms=hist or None,
                ),
            )
        )
    return disks


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

    def _query(self, path: str) -> Vm:
        c = QmpClient(path, time.monotonic() + self.cfg.timeout)
        try:
            c.connect()
            name = (c.execute("query-name") or {}).get("name") or path
            status = (c.execute("query-status") or {}).get("status", "unknown")
            uuid = (c.execute("query-uuid") or {}).get("UUID")
            hist_errors = []
            if self.cfg.latency_histograms:
                for b in c.execute("query-block") or []:
                    # the command wants the frontend device: its QOM path reaches the
                    # virtio backend (the short id would name the PCI proxy)
                    dev = b.get("qdev")
                    if not (b.get("inserted") and dev) or (path, dev) in self._hist_done:
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
            disks = parse_blockstats(c.execute("query-blockstats"), c.execute("query-block"))
            return Vm(
                name=name,
                uuid=uuid.lower() if uuid else None,
                state=status,
                pid=None,
                disks=tuple(disks),
                manager="qmp",
                error="; ".join(hist_errors) or None,
            )
        finally:
            c.close()

    def collect(self) -> Vms:
        paths = sorted({p for pat in self.cfg.sockets for p in glob.glob(pat)})
        if not self.cfg.sockets:
            raise NoData("no QMP sockets configured (qmp.sockets)")
        if not paths:
            raise NoData(f"no QMP socket matches {self.cfg.sockets}")
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
        owners = {}
        for q in qemu_processes(self.paths):
            for a in q.argv:
                for p in futures:
                    if p in a:
                        owners[p] = q.pid
        for p, fut in futures.items():
            try:
                vms.append(replace(fut.result(timeout=max(0.0, end - time.monotonic())), pid=owners.get(p)))
            except FutureTimeout:
                failed.append((p, f"no answer within {self.cfg.timeout:g}s"))
            except QmpError as e:
                failed.append((p, str(e)))
            except Exception as e:
                failed.append((p, f"{type(e).__name__}: {e}"))
        return Vms(tuple(sorted(vms, key=lambda v: v.name)), tuple(failed))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
