"""What the eBPF probes report each cycle (sources: ebpf_block_io, ebpf_tcp_retrans, ebpf_tcp_lifecycle).

The records the probes make per map entry or event have ``__slots__``: the
agent's history keeps up to 120 snapshots of them.

``probe`` holds the probe's ProbeStats (its events, losses, and the run time
and count of its BPF programs), so that it survives the local API and
recordings as a record, not a plain mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _fields(rec) -> dict:
    return {f.name: getattr(rec, f.name) for f in fields(rec)}


@dataclass
class ProbeStats:
    """What a probe reports about itself (cumulative since it was loaded)."""

    events: int = 0  # tracepoint hits the probe handled (its own in-kernel counters)
    lost: int = 0  # events it could not account for (see each probe's docstring)
    run_time_ns: int = 0  # kernel time in the probe's programs (BPF stats)
    run_cnt: int = 0  # program runs counted while BPF stats were on
    per_program: dict[str, dict[str, int]] = field(default_factory=dict)
    timed: bool = True  # False when BPF stats could not be switched on (no CAP_SYS_ADMIN): run_* unknown

    @property
    def ns_per_event(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None

    def as_dict(self) -> dict:
        return {
            "events": self.events,
            "lost": self.lost,
            "run_time_ns": self.run_time_ns,
            "run_cnt": self.run_cnt,
            "ns_per_event": None if self.ns_per_event is None else round(self.ns_per_event, 1),
            "programs": self.per_program,
        }


# log2 latency slots of the block probe (-DSLOT_MAX of probes/block_io.h)
SLOT_MAX = 36


@dataclass(frozen=True, slots=True)
class BlockHistogram:
    device: str
    major: int
    minor: int
    op: str
    kind: str  # total | queue | device
    slots: dict[int, int]  # log2 slot -> count
    count: int
    sum_ns: int
    bytes: int


@dataclass(frozen=True, slots=True)
class BlockProcess:
    """Block I/O of one process on one device and op: every thread of it (QEMU's I/O threads
    included) under its tgid, the process that submitted each request. Cumulative since the agent
    first saw (tgid, device, op): counters that only grow while the entry lives (the agent keeps at
    most a bounded number, see agent/ebpf/block_io.py; one that is dropped and comes back restarts
    at 0, a counter reset). ``slots`` is the log2 histogram of the requests' total latency (the
    kernel's own accounting start -> completion, the ``total`` kind of BlockHistogram, same slots:
    slot s = [2^(s-1), 2^s) ns), ``count`` its sum. Join key to a VM disk: (tgid = QEMU's pid,
    major:minor or device name of the disk the VM's image lives on). A dm device and its legs are
    separate devices: the request on the dm device is the submitter's, the clone on each leg is
    attributed to the context that issued it (often the same process, or a kworker)."""

    tgid: int
    comm: str  # the process's name (/proc/<tgid>/comm when first seen; "" if it had already ended)
    device: str
    op: str
    count: int
    sum_ns: int
    bytes: int
    major: int = 0
    minor: int = 0
    slots: dict[int, int] = field(default_factory=dict)  # log2 slot -> count (total latency)


@dataclass(frozen=True)
class BlockIoData:
    histograms: tuple[BlockHistogram, ...]
    processes: tuple[BlockProcess, ...]
    totals: dict[str, int]
    slot_max: int = SLOT_MAX
    probe: ProbeStats | None = None
    tracepoints: tuple[str, ...] = field(default_factory=tuple)

    def histogram(self, device: str, op: str, kind: str = "total") -> BlockHistogram | None:
        for h in self.histograms:
            if (h.device, h.op, h.kind) == (device, op, kind):
                return h
        return None

    def processes_of(self, tgid: int) -> tuple[BlockProcess, ...]:
        """Every (device, op) of one process, e.g. a QEMU pid."""
        return tuple(p for p in self.processes if p.tgid == tgid)


@dataclass(frozen=True, slots=True)
class TcpConnection:
    family: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    storage: bool
    retransmits: int
    synack_retransmits: int
    resets_sent: int
    resets_received: int
    last_state: str
    states: tuple[str, ...]
    last_seen_ns: int  # CLOCK_MONOTONIC ns

    def as_dict(self) -> dict:
        return _fields(self) | {"states": list(self.states)}


@dataclass(frozen=True, slots=True)
class TcpRetransEvent:
    monotonic_ns: int
    kind: str
    state: str
    family: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    storage: bool


@dataclass(frozen=True)
class TcpRetransData:
    connections: tuple[TcpConnection, ...]
    # (remote address, remote port) -> kind -> cumulative count
    storage: dict[tuple[str, int], dict[str, int]]
    other: dict[str, int]  # kind -> cumulative count, everything not to a storage port
    totals: dict[str, int]  # kind -> cumulative count, all connections
    events: tuple[TcpRetransEvent, ...]  # new since the previous read
    stream_dropped: int
    probe: ProbeStats | None = None
    tracepoints: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ConnEvent:
    monotonic_ns: int
    kind: str
    oldstate: str
    newstate: str
    role: str  # initiator | target
    family: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    tgid: int
    comm: str
    age_seconds: float  # since connect (or since the probe first saw it)
    established_seconds: float
    reset: str  # "", "received", "sent"
    conn_id: int  # start time of the connection in monotonic ns: groups one connection's events


    def as_dict(self) -> dict:
        return _fields(self)


@dataclass(frozen=True, slots=True)
class LiveConn:
    role: str
    family: str
    saddr: str
    sport: int
    daddr: str
    dport: int
    tgid: int
    comm: str
    start_ns: int
    established: bool


@dataclass(frozen=True)
class TcpLifecycleData:
    # (remote address, storage port) -> kind -> cumulative count
    counts: dict[tuple[str, int], dict[str, int]]
    live: tuple[LiveConn, ...]
    events: tuple[ConnEvent, ...]
    totals: dict[str, int]
    probe: ProbeStats | None = None
    tracepoints: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class LibiscsiLatency:
    """One QEMU process's commands to one LUN through one iSCSI context, one op (cumulative)."""

    tgid: int
    ctx: int  # struct iscsi_context * in that process: tells two sessions of one process apart
    lun: int
    op: str  # read | write | flush | discard | other (from the CDB opcode)
    slots: dict[int, int]  # log2 slot -> count
    count: int
    sum_ns: int


@dataclass(frozen=True, slots=True)
class LibiscsiContext:
    """One iSCSI context of one process: where it logged in (when the probe saw the login) and its events."""

    tgid: int
    ctx: int
    target: str  # "" when iscsi_set_targetname was not seen (QEMU started before the probe)
    portal: str  # "" when iscsi_full_connect_* was not seen
    lun: int | None
    aborts: int
    reconnects: int


@dataclass(frozen=True)
class LibiscsiData:
    latencies: tuple[LibiscsiLatency, ...]
    contexts: tuple[LibiscsiContext, ...]
    inflight: dict[tuple[int, int, int], int]  # (tgid, ctx, lun) -> commands submitted, not yet freed
    totals: dict[str, int]
    slot_max: int = SLOT_MAX
    probe: ProbeStats | None = None
    tracepoints: tuple[str, ...] = field(default_factory=tuple)  # the uprobes attached
    # the sampling state after this read (agent/ebpf/libiscsi.py DutyCycle): attached, cycles_detached_left,
    # busiest_commands_per_second, cost_ns_per_command, hit_ns, budget
    sampling: dict[str, float | int | bool | None] = field(default_factory=dict)

    def context(self, tgid: int, ctx: int) -> LibiscsiContext | None:
        for c in self.contexts:
            if (c.tgid, c.ctx) == (tgid, ctx):
                return c
        return None
