"""Host network interfaces: errors, drops, MTU and link state from sysfs.

Sources: ``/sys/class/net/<if>/statistics/{rx,tx}_{packets,bytes,errors,
dropped}``, ``mtu``, ``operstate``, ``speed`` (Documentation/ABI/testing/
sysfs-class-net-statistics). Diagnosis looks at the interfaces that carry
storage connections (errors or drops there explain retransmits); doctor
compares MTUs along iSCSI interfaces. Cost: a few reads per interface.
"""

from __future__ import annotations

import os

from agent.errors import NoData
from agent.records.net import NetIface, NetIfaces
from agent.sources import SourceContext, Unchanged, register

COUNTERS = ("rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_errors", "tx_errors", "rx_dropped", "tx_dropped")


def _read_int(path: str) -> int | None:
    """A sysfs number (one read(2), no file object: ~11 files per interface every cycle); None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            return int(os.read(fd, 64))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None


def _addresses() -> dict[str, list[str]]:
    import socket

    import psutil

    out: dict[str, list[str]] = {}
    for ifname, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                out.setdefault(ifname, []).append(a.address.split("%", 1)[0])
    return out


@register("net_ifaces", description="host network interfaces: errors, drops, MTU, link state (/sys/class/net)")
class NetIfacesSource:
    def __init__(self, ctx: SourceContext):
        self.paths = ctx.paths
        self._same: Unchanged[NetIface] = Unchanged()  # an idle interface's record is last cycle's
        self._last: NetIfaces | None = None

    def collect(self) -> NetIfaces:
        base = self.paths.sys("class", "net")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            raise NoData(f"no {base}") from None
        addrs = _addresses()
        out = []
        for n in names:
            d = f"{base}/{n}"
            try:
                state = self.paths.read_text(f"{d}/operstate").strip()
            except OSError:
                continue  # vanished
            speed = _read_int(f"{d}/speed")
            stats = f"{d}/statistics/"
            out.append(self._same.same(n,
                NetIface(
                    name=n,
                    operstate=state,
                    mtu=_read_int(f"{d}/mtu"),
                    speed_mbps=speed if speed and speed > 0 else None,
                    counters={c: v for c in COUNTERS if (v := _read_int(stats + c)) is not None},
                    addresses=tuple(addrs.get(n, ())),
                )
            ))
        if self._same.end_cycle() and self._last is not None:
            return self._last  # nothing moved: the history holds it once
        self._last = NetIfaces(tuple(out))
        return self._last

    def close(self) -> None:
        pass
