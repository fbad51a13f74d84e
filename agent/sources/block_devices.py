"""Host block devices from /sys/block: names, MAJ:MIN, multipath legs, I/O counters.

Sources: ``/sys/block/<dev>/dev`` (MAJ:MIN), ``slaves/`` and ``holders/``
(device-mapper stacking, e.g. dm-0 over sdb and sdc for multipath),
``dm/name``, ``stat`` (Documentation/block/stat.rst: reads, read merges,
sectors, read ticks ms, writes, ..., in flight, io_ticks, time in queue,
discards..., flushes...), and ``/sys/dev/block/MAJ:MIN`` for partitions.

Used to name the devices behind VM disks on host storage and to join them
to kernel iSCSI sessions; also decodes dev_t for the block I/O probe.
Cost: a few small reads per device per cycle.
"""

from __future__ import annotations

import os

from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.records.block import BlockDevice, BlockDevices
from agent.sources import SourceContext, Unchanged, register

STAT_FIELDS = (
    "read_ios", "read_merges", "read_sectors", "read_ticks_ms",
    "write_ios", "write_merges", "write_sectors", "write_ticks_ms",
    "in_flight", "io_ticks_ms", "time_in_queue_ms",
    "discard_ios", "discard_merges", "discard_sectors", "discard_ticks_ms",
    "flush_ios", "flush_ticks_ms",
)


def parse_stat(text: str) -> dict[str, int]:
    vals = text.split()
    out = {}
    for name, v in zip(STAT_FIELDS, vals):
        try:
            out[name] = int(v)
        except ValueError:
            return {}
    return out


def _read(paths: HostPaths, p) -> str | None:
    try:
        return paths.read_text(p).strip()
    except OSError:
        return None


def _ls(p) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(p)))
    except OSError:
        return ()


def read_block_devices(paths: HostPaths) -> BlockDevices:
    base = paths.sys("block")
    names = _ls(base)
    if not names:
        raise NoData(f"no block devices under {base}")
    devs, parts = [], []
    for n in names:  # string paths: ~10 reads and listings per device every cycle
        d = f"{base}/{n}"
        devno = _read(paths, f"{d}/dev")
        if devno is None:
            continue  # vanished
        devs.append(
            BlockDevice(
                name=n,
                devno=devno,
                dm_name=_read(paths, f"{d}/dm/name"),
                slaves=_ls(f"{d}/slaves"),
                holders=_ls(f"{d}/holders"),
                stat=parse_stat(_read(paths, f"{d}/stat") or ""),
            )
        )
        for sub in _ls(d):
            if sub.startswith(n) and os.path.exists(f"{d}/{sub}/partition"):
                pd = _read(paths, f"{d}/{sub}/dev")
                if pd:
                    parts.append((pd, sub, n))
    return BlockDevices(tuple(devs), tuple(parts))


@register("block_devices", description="host block devices from /sys/block (names, multipath legs, I/O counters)")
class BlockDevicesSource:
    def __init__(self, ctx: SourceContext):
        self.paths = ctx.paths
        self._same: Unchanged[BlockDevice] = Unchanged()  # an idle device's record is last cycle's
        self._last: BlockDevices | None = None

    def collect(self) -> BlockDevices:
        new = read_block_devices(self.paths)
        devs = tuple(self._same.same(d.name, d) for d in new.devices)
        if self._same.end_cycle() and self._last is not None and self._last.partitions == new.partitions:
            return self._last  # nothing moved: the history holds it once
        self._last = BlockDevices(devs, new.partitions)
        return self._last

    def close(self) -> None:
        pass
