"""Prometheus rendering of the eBPF probe sources (pure: records → families).

Cardinality: block histograms per (device, op); TCP counters per storage
remote (address, port) plus one "other" series; never PIDs or 4-tuples.
"""

from __future__ import annotations

from itertools import accumulate, repeat
from typing import Iterable

from agent.ebpf import decode
from agent.exporters import catalog as C
from agent.exporters.registry import renderer
from agent.records.ebpf import BlockIoData, LibiscsiData, TcpLifecycleData, TcpRetransData
from agent.records.snapshot import Snapshot

OTHER = "other"


def probe_families(name: str, stats) -> Iterable:
    if stats is None:
        return
    timing = ((C.PROBE_RUN_TIME, stats.run_time_ns / 1e9), (C.PROBE_RUNS, stats.run_cnt))
    # without BPF stats (no CAP_SYS_ADMIN) the run time is unknown, not zero: no series
    for d, v in ((C.PROBE_EVENTS, stats.events), (C.PROBE_LOST, stats.lost)) + (timing if stats.timed else ()):
        fam = d.family()
        fam.add_metric([name], v)
        yield fam


_BOUNDS: dict[int, tuple[str, ...]] = {}  # slot_max -> every bucket's le text (decode.cumulative_buckets')


def histogram_buckets(slots: dict[int, int], slot_max: int) -> list[tuple[str, int]]:
    """decode.cumulative_buckets(slots, slot_max), with the bound texts made once per slot_max (a render of a
    host with many devices writes them for every histogram)."""
    bounds = _BOUNDS.get(slot_max)
    if bounds is None:
        bounds = _BOUNDS[slot_max] = tuple(le for le, _n in decode.cumulative_buckets({}, slot_max))
    counts = list(accumulate(map(slots.get, range(slot_max + 1), repeat(0))))
    counts.append(counts[-1] + sum(c for s, c in slots.items() if s > slot_max))
    return list(zip(bounds, counts))


@renderer(Snapshot.block_io)
def render_block_io(data: BlockIoData) -> Iterable:
    for d, kind in ((C.BLOCK_IO_LATENCY, "total"), (C.BLOCK_IO_QUEUE, "queue"), (C.BLOCK_IO_DEVICE, "device")):
        fam = d.family()
        for h in sorted((h for h in data.histograms if h.kind == kind), key=lambda h: (h.device, h.op)):
            fam.add_metric([h.device, h.op], histogram_buckets(h.slots, data.slot_max), h.sum_ns / 1e9)
        yield fam
    fam = C.BLOCK_IO_BYTES.family()
    for h in sorted((h for h in data.histograms if h.kind == "total"), key=lambda h: (h.device, h.op)):
        fam.add_metric([h.device, h.op], h.bytes)
    yield fam
    yield from probe_families("block_io", data.probe)


@renderer(Snapshot.tcp_lifecycle)
def render_tcp_lifecycle(data: TcpLifecycleData) -> Iterable:
    fam = C.STORAGE_CONN_EVENTS.family()
    fam.extend_rows([((addr, str(port), kind), n) for (addr, port), counts in sorted(data.counts.items())
                     for kind, n in counts.items() if kind != "state"])
    yield fam
    live: dict[tuple[str, int], int] = {}
    for c in data.live:
        key = (c.daddr, c.dport if c.role == "initiator" else c.sport)
        live[key] = live.get(key, 0) + 1
    fam = C.STORAGE_CONN_OPEN.family()
    fam.extend_rows([((addr, str(port)), n) for (addr, port), n in sorted(live.items())])
    yield fam
    yield from probe_families("tcp_lifecycle", data.probe)


@renderer(Snapshot.tcp_retrans)
def render_tcp_retrans(data: TcpRetransData) -> Iterable:
    remotes = sorted(data.storage.items())
    labels = [(addr, str(port)) for (addr, port), _counts in remotes]
    for d, kind in ((C.TCP_RETRANSMITS, "retransmit"), (C.TCP_SYNACK_RETRANSMITS, "synack_retransmit"),
                    (C.TCP_RESETS_SENT, "reset_sent"), (C.TCP_RESETS_RECEIVED, "reset_received")):
        fam = d.family()
        fam.extend_rows([(lv, counts.get(kind, 0)) for lv, (_remote, counts) in zip(labels, remotes)])
        fam.add_metric([OTHER, OTHER], data.other.get(kind, 0))
        yield fam
    yield from probe_families("tcp_retrans", data.probe)


@renderer(Snapshot.libiscsi)
def render_libiscsi(data: LibiscsiData) -> Iterable:
    """The libiscsi probe's own health (its histograms reach /metrics per VM disk: render_inventory)."""
    yield from probe_families("libiscsi", data.probe)
