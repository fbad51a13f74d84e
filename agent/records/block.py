"""Host block devices from /sys/block (source: block_devices)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockDevice:
    name: str
    devno: str  # MAJ:MIN
    dm_name: str | None
    slaves: tuple[str, ...]
    holders: tuple[str, ...]
    stat: dict[str, int]


@dataclass(frozen=True)
class BlockDevices:
    devices: tuple[BlockDevice, ...] = ()
    partitions: tuple[tuple[str, str, str], ...] = ()  # (devno, partition name, parent disk)

    def by_devno(self, devno: str) -> str | None:
        for d in self.devices:
            if d.devno == devno:
                return d.name
        for dn, _part, parent in self.partitions:
            if dn == devno:
                return parent
        return None

    def get(self, name: str) -> BlockDevice | None:
        for d in self.devices:
            if d.name == name:
                return d
        return None
