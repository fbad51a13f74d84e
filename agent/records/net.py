"""Host network interfaces and their addresses (source: net_ifaces)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NetIface:
    name: str
    operstate: str | None
    mtu: int | None
    speed_mbps: int | None
    counters: dict[str, int] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()  # IPv4/IPv6 addresses (getifaddrs)


@dataclass(frozen=True)
class NetIfaces:
    ifaces: tuple[NetIface, ...] = ()

    def get(self, name: str) -> NetIface | None:
        return next((i for i in self.ifaces if i.name == name), None)

    def address_map(self) -> dict[str, str]:
        """host address -> interface name."""
        return {a: i.name for i in self.ifaces for a in i.addresses}
