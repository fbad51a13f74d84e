"""Prometheus rendering of the storage inventory: iSCSI sessions, storage
connections, VMs and their disks, and the storage paths joining them.

Cardinality: sessions, connections and VM disks are bounded by the host's
configuration (one connection per session or per libiscsi disk); labels
never carry PIDs or ephemeral values other than a storage connection's
local address:port, which lives as long as the connection.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_, truediv
from typing import Iterable

from agent.exporters.catalog import define
from agent.exporters.registry import renderer, snapshot_renderer
from agent.records.addr import fmt_endpoint
from agent.records.disk_latency import VmDiskLatencies
from agent.records.iscsi import IscsiSessions
from agent.records.snapshot import Snapshot
from agent.records.vms import Vm

SESSION_LABELS = ("target", "portal", "session")

SESSION_UP = define(
    "kvmscope_iscsi_session_up", "gauge",
    "1 if the open-iscsi session is LOGGED_IN, else 0; sysfs iscsi_session/state.",
    SESSION_LABELS, "/sys/class/iscsi_session")
SESSION_STATE = define(
    "kvmscope_iscsi_session_state", "gauge",
    "1 for the session's current state (LOGGED_IN, FAILED, FREE, unknown), 0 for the others; sysfs iscsi_session/state.",
    SESSION_LABELS + ("state",), "/sys/class/iscsi_session")
SESSION_RECOVERY_TMO = define(
    "kvmscope_iscsi_session_recovery_timeout_seconds", "gauge",
    "Seconds a FAILED session waits for its connection before failing I/O; sysfs iscsi_session/recovery_tmo.",
    SESSION_LABELS, "/sys/class/iscsi_session")
CONNECTION_UP = define(
    "kvmscope_iscsi_connection_up", "gauge",
    "1 if the session's connection state is 'up' (newer kernels), else 0; sysfs iscsi_connection/state.",
    SESSION_LABELS + ("connection",), "/sys/class/iscsi_connection")
SESSION_PDUS = define(
    "kvmscope_iscsi_session_pdus_total", "counter",
    "iSCSI PDUs by type (scsicmd, scsirsp, datain, dataout, r2t, noptx, noprx, ...); iscsiadm -m session -r SID -s, "
    "u32 kernel counters unwrapped.",
    SESSION_LABELS + ("type",), "iscsiadm")
SESSION_BYTES = define(
    "kvmscope_iscsi_session_data_bytes_total", "counter",
    "iSCSI data octets by direction (tx, rx); iscsiadm -m session -r SID -s txdata_octets/rxdata_octets.",
    SESSION_LABELS + ("direction",), "iscsiadm")
SESSION_ERRORS = define(
    "kvmscope_iscsi_session_errors_total", "counter",
    "iSCSI errors by type (digest, timeout, eh_abort, tx_sendpage_failure, rx_discontiguous_hdr); iscsiadm -m session -s.",
    SESSION_LABELS + ("type",), "iscsiadm")
SESSION_STATS_OK = define(
    "kvmscope_iscsi_session_stats_success", "gauge",
    "1 if iscsiadm returned the session's counters this cycle, 0 if not (see the agent log or `kvmscope sessions`).",
    SESSION_LABELS, "iscsiadm")

ERROR_STATS = {"digest_err": "digest", "timeout_err": "timeout", "eh_abort_cnt": "eh_abort",
               "tx_sendpage_failures": "tx_sendpage_failure", "rx_discontiguous_hdr": "rx_discontiguous_hdr"}
BYTE_STATS = {"txdata_octets": "tx", "rxdata_octets": "rx"}


@renderer(Snapshot.iscsi)
def render_iscsi_kernel(data: IscsiSessions) -> Iterable:
    up, state, tmo, cup = SESSION_UP.family(), SESSION_STATE.family(), SESSION_RECOVERY_TMO.family(), CONNECTION_UP.family()
    pdus, byts, errs, ok = SESSION_PDUS.family(), SESSION_BYTES.family(), SESSION_ERRORS.family(), SESSION_STATS_OK.family()
    for s in data.sessions:
        lv = [s.target or "", s.portal or "", str(s.sid)]
        up.add_metric(lv, 1 if s.state == "LOGGED_IN" else 0)
        known = ("LOGGED_IN", "FAILED", "FREE")
        for st in known + ("unknown",):
            cur = s.state if s.state in known else "unknown"
            state.add_metric(lv + [st], 1 if st == cur else 0)
        if s.recovery_tmo is not None:
            tmo.add_metric(lv, s.recovery_tmo)
        for c in s.connections:
            if c.state is not None:
                cup.add_metric(lv + [c.cid], 1 if c.state == "up" else 0)
        ok.add_metric(lv, 1 if s.stats else 0)
        for name, v in (s.stats or {}).items():
            if name in BYTE_STATS:
                byts.add_metric(lv + [BYTE_STATS[name]], v)
            elif name in ERROR_STATS:
                errs.add_metric(lv + [ERROR_STATS[name]], v)
            elif name.endswith("_pdus"):
                pdus.add_metric(lv + [name.removesuffix("_pdus")], v)
    return [up, state, tmo, cup, ok, pdus, byts, errs]


VM_LABELS = ("vm", "disk")
VM_UP = define("kvmscope_vm_running", "gauge",
               "1 if the VM is running, 0 if it is paused or otherwise not running; libvirt state / QMP query-status.",
               ("vm", "manager"), "libvirt, QMP")
VM_STATS_OK = define("kvmscope_vm_stats_success", "gauge",
                     "1 if the VM's disk statistics were read this cycle, 0 if they were skipped (domain busy, XML unavailable).",
                     ("vm", "manager"), "libvirt, QMP")
DISK_REQUESTS = define("kvmscope_vm_disk_requests_total", "counter",
                       "Completed guest requests by op (read, write, flush); libvirt block.N.{rd,wr,fl}.reqs / QMP query-blockstats.",
                       VM_LABELS + ("op",), "libvirt, QMP")
DISK_BYTES = define("kvmscope_vm_disk_bytes_total", "counter",
                    "Guest bytes by op (read, write); libvirt block.N.{rd,wr}.bytes / QMP query-blockstats.",
                    VM_LABELS + ("op",), "libvirt, QMP")
DISK_TIME = define("kvmscope_vm_disk_time_seconds_total", "counter",
                   "Total time guest requests took, by op (read, write, flush): rate(time)/rate(requests) is the mean latency; "
                   "libvirt block.N.*.times / QMP *_total_time_ns.",
                   VM_LABELS + ("op",), "libvirt, QMP")
DISK_FAILED = define("kvmscope_vm_disk_failed_requests_total", "counter",
                     "Failed guest requests (all ops); QMP failed_*_operations (stand-alone QEMU only).",
                     VM_LABELS, "QMP")
DISK_IDLE = define("kvmscope_vm_disk_idle_seconds", "gauge",
                   "Seconds since the disk's last I/O; growing while the guest waits means a stalled disk; QMP idle_time_ns.",
                   VM_LABELS, "QMP")
DISK_LATENCY = define("kvmscope_vm_disk_latency_seconds", "histogram",
                      "Latency of a VM disk's requests by op, from the histogram that measures that disk (label source): "
                      "libiscsi = iSCSI command time inside QEMU (eBPF uprobes on libiscsi.so.7, submission to task free), "
                      "block = the VM's QEMU process's requests on the host block device under the disk (eBPF "
                      "block:block_rq_*), qmp = guest request time from QEMU's block latency histograms (opt-in, "
                      "stand-alone QEMU; QMP query-blockstats). log2 buckets for the eBPF sources, QEMU's own for qmp.",
                      VM_LABELS + ("op", "source"), "eBPF uprobes (libiscsi), eBPF block tracepoints, QMP")
DISK_ISCSI_INFLIGHT = define("kvmscope_vm_disk_iscsi_commands_in_flight", "gauge",
                             "iSCSI commands of a libiscsi VM disk submitted and not yet completed, now; eBPF uprobes on "
                             "libiscsi.so.7 (iscsi_scsi_command_async, scsi_free_scsi_task).",
                             VM_LABELS, "eBPF uprobes (libiscsi)")
DISK_ISCSI_ABORTS = define("kvmscope_vm_disk_iscsi_aborts_total", "counter",
                           "iSCSI task aborts QEMU sent for a libiscsi VM disk (QEMU giving up on a command) since the "
                           "probe saw its context; eBPF uprobe on libiscsi.so.7 iscsi_task_mgmt_abort_task_async.",
                           VM_LABELS, "eBPF uprobes (libiscsi)")
DISK_ISCSI_RECONNECTS = define("kvmscope_vm_disk_iscsi_reconnects_total", "counter",
                               "iSCSI reconnects (new logins after a lost connection) of a libiscsi VM disk since the probe "
                               "saw its context; eBPF uprobe on libiscsi.so.7 iscsi_reconnect.",
                               VM_LABELS, "eBPF uprobes (libiscsi)")
DISK_INFO = define("kvmscope_vm_disk_info", "gauge",
                   "Always 1: a VM disk's backend (libiscsi, host, network:<proto>), iSCSI target, LUN and portal.",
                   VM_LABELS + ("backend", "target", "lun", "portal"), "libvirt domain XML, QMP query-block")

@renderer(Snapshot.vms)
def render_vms(vms: tuple[Vm, ...]) -> Iterable:
    """Every VM of the host (libvirt's, then stand-alone QEMU's) and its disks."""
    up, ok, req, byt, tim = VM_UP.family(), VM_STATS_OK.family(), DISK_REQUESTS.family(), DISK_BYTES.family(), DISK_TIME.family()
    failed, idle, info = DISK_FAILED.family(), DISK_IDLE.family(), DISK_INFO.family()
    # rows of (label values, value) in the families' label order, added at once (a big host has ~8,000 of them)
    up_r, ok_r, req_r, byt_r, tim_r, failed_r, idle_r, info_r = [], [], [], [], [], [], [], []
    for vm in vms:
        name = vm.name
        vl = (name, vm.manager)
        up_r.append((vl, 1 if vm.state == "running" else 0))
        ok_r.append((vl, 0 if vm.error and not any(d.stats for d in vm.disks) else 1))
        for d in vm.disks:
            lv = (name, d.target)
            portal = fmt_endpoint(*d.hosts[0]) if d.hosts else ""
            info_r.append((lv + (d.backend, d.iqn or "", "" if d.lun is None else str(d.lun), portal), 1))
            s = d.stats
            if s is None:
                continue
            rd, wr, fl = lv + ("read",), lv + ("write",), lv + ("flush",)
            req_r += ((rd, s.rd_reqs), (wr, s.wr_reqs), (fl, s.fl_reqs))
            tim_r += ((rd, s.rd_time_ns / 1e9), (wr, s.wr_time_ns / 1e9), (fl, s.fl_time_ns / 1e9))
            byt_r += ((rd, s.rd_bytes), (wr, s.wr_bytes))  # flushes move no bytes
            if s.failed_reqs is not None:
                failed_r.append((lv, s.failed_reqs))
            if s.idle_time_ns is not None:
                idle_r.append((lv, s.idle_time_ns / 1e9))
    fams = [up, ok, info, req, byt, tim, failed, idle]
    for fam, rows in zip(fams, (up_r, ok_r, info_r, req_r, byt_r, tim_r, failed_r, idle_r)):
        fam.extend_rows(rows)
    return fams


@renderer(Snapshot.vm_disk_latency)
def render_vm_disk_latency(data: VmDiskLatencies) -> Iterable:
    """Every VM disk's latency histograms (agent/records/disk_latency.py), and libiscsi disks' command state."""
    hist = DISK_LATENCY.family()
    for h in data.histograms:
        buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in h.cumulative()]
        # QEMU's histograms keep no sum: the op's total time (same requests) stands in for it
        hist.add_metric([h.vm, h.disk, h.op, h.source], buckets, (h.sum_ns or 0) / 1e9)
    inflight, aborts, reconnects = DISK_ISCSI_INFLIGHT.family(), DISK_ISCSI_ABORTS.family(), DISK_ISCSI_RECONNECTS.family()
    for d in data.iscsi:
        inflight.add_metric([d.vm, d.disk], d.inflight)
        aborts.add_metric([d.vm, d.disk], d.aborts)
        reconnects.add_metric([d.vm, d.disk], d.reconnects)
    return [hist, inflight, aborts, reconnects]


CONN_LABELS = ("portal", "local", "vm", "disk")
CONN_RTT = define("kvmscope_storage_connection_rtt_seconds", "gauge",
                  "Smoothed round-trip time of a TCP connection to a storage portal; inet_diag tcp_info.tcpi_rtt.",
                  CONN_LABELS, "inet_diag")
CONN_RTTVAR = define("kvmscope_storage_connection_rtt_variance_seconds", "gauge",
                     "RTT variance of a storage connection; inet_diag tcp_info.tcpi_rttvar.", CONN_LABELS, "inet_diag")
CONN_RTO = define("kvmscope_storage_connection_rto_seconds", "gauge",
                  "Current retransmission timeout of a storage connection (200 ms minimum; grows with backoff); "
                  "inet_diag tcp_info.tcpi_rto.", CONN_LABELS, "inet_diag")
CONN_CWND = define("kvmscope_storage_connection_cwnd_segments", "gauge",
                   "Congestion window of a storage connection; inet_diag tcp_info.tcpi_snd_cwnd.", CONN_LABELS, "inet_diag")
CONN_UNACKED = define("kvmscope_storage_connection_unacked_segments", "gauge",
                      "Segments in flight, not yet acknowledged; inet_diag tcp_info.tcpi_unacked.", CONN_LABELS, "inet_diag")
CONN_LOST = define("kvmscope_storage_connection_lost_segments", "gauge",
                   "Segments currently presumed lost; inet_diag tcp_info.tcpi_lost.", CONN_LABELS, "inet_diag")
CONN_BACKOFF = define("kvmscope_storage_connection_rto_backoff", "gauge",
                      "Consecutive unrecovered retransmission timeouts now (0 when healthy); inet_diag tcp_info.tcpi_backoff.",
                      CONN_LABELS, "inet_diag")
CONN_RETRANS = define("kvmscope_storage_connection_retransmitted_segments_total", "counter",
                      "Segments retransmitted on this connection since it opened; inet_diag tcp_info.tcpi_total_retrans.",
                      CONN_LABELS, "inet_diag")
CONN_BYTES = define("kvmscope_storage_connection_bytes_total", "counter",
                    "Bytes on a storage connection by direction (sent, received, retransmitted); "
                    "inet_diag tcp_info.tcpi_bytes_sent/received/retrans.",
                    CONN_LABELS + ("direction",), "inet_diag")
CONN_LAST_RECV = define("kvmscope_storage_connection_last_receive_age_seconds", "gauge",
                        "Seconds since data was last received from the portal; inet_diag tcp_info.tcpi_last_data_recv.",
                        CONN_LABELS, "inet_diag")
CONN_MIN_RTT = define("kvmscope_storage_connection_min_rtt_seconds", "gauge",
                      "Minimum RTT of a storage connection over the kernel's window (net.ipv4.tcp_min_rtt_wlen, "
                      "300 s): the path's unloaded round trip; inet_diag tcp_info.tcpi_min_rtt.", CONN_LABELS, "inet_diag")
CONN_RCV_RTT = define("kvmscope_storage_connection_receive_rtt_seconds", "gauge",
                      "Receive-side RTT estimate of a storage connection (time a window of the portal's data takes "
                      "to arrive; 0 before any); inet_diag tcp_info.tcpi_rcv_rtt.", CONN_LABELS, "inet_diag")
CONN_SEGS = define("kvmscope_storage_connection_segments_total", "counter",
                   "Segments on a storage connection by direction (sent, received) and kind (all, data); "
                   "inet_diag tcp_info.tcpi_segs_out/in, tcpi_data_segs_out/in.",
                   CONN_LABELS + ("direction", "kind"), "inet_diag")
CONN_OOO = define("kvmscope_storage_connection_out_of_order_segments_total", "counter",
                  "Segments received from the portal out of order (a hole: loss or reordering toward the host, "
                  "which the host's own retransmit counters do not show); inet_diag tcp_info.tcpi_rcv_ooopack "
                  "(Linux >= 5.4).", CONN_LABELS, "inet_diag")
CONN_DSACK = define("kvmscope_storage_connection_dsacks_total", "counter",
                    "Duplicate SACKs received: segments the portal got twice (spurious retransmits); inet_diag "
                    "tcp_info.tcpi_dsack_dups (Linux >= 4.19).", CONN_LABELS, "inet_diag")
CONN_REORD = define("kvmscope_storage_connection_reordering_events_total", "counter",
                    "Reordering events seen by the sender; inet_diag tcp_info.tcpi_reord_seen (Linux >= 4.19).",
                    CONN_LABELS, "inet_diag")
CONN_DELIVERED = define("kvmscope_storage_connection_delivered_segments_total", "counter",
                        "Segments delivered to the portal (acknowledged, incl. SACKed); inet_diag "
                        "tcp_info.tcpi_delivered (Linux >= 4.18).", CONN_LABELS, "inet_diag")
CONN_BUSY = define("kvmscope_storage_connection_send_busy_seconds_total", "counter",
                   "Time the connection had data in flight; inet_diag tcp_info.tcpi_busy_time (Linux >= 4.10).",
                   CONN_LABELS, "inet_diag")
CONN_LIMITED = define("kvmscope_storage_connection_send_limited_seconds_total", "counter",
                      "Time sending was limited by the portal's receive window (limit=receive_window) or the host's "
                      "send buffer (limit=send_buffer); inet_diag tcp_info.tcpi_rwnd_limited/tcpi_sndbuf_limited "
                      "(Linux >= 4.10).", CONN_LABELS + ("limit",), "inet_diag")
CONN_COUNT = define("kvmscope_storage_connections", "gauge",
                    "TCP connections to storage ports by portal and TCP state; inet_diag.", ("portal", "state"), "inet_diag")
PATH_INFO = define("kvmscope_storage_path_info", "gauge",
                   "Always 1: one storage path, VM disk -> backend -> session -> connection -> portal -> interface "
                   "(kvmscope paths); empty labels where a link is unknown.",
                   ("vm", "disk", "backend", "target", "lun", "portal", "session", "local", "interface", "device"),
                   "join of libvirt/QMP, inet_diag, sysfs")


# The last render's rows of each tcp_info column, with the connections' labels and tcp_info records they came
# from: a column whose labels are the same list and whose records are the same objects (storage_tcp gives back an
# unchanged TcpInfo, a frozen record: an idle connection's) gives back the same rows, whose text the writer then
# reuses without comparing values. Pure memoization: a hit is decided by identity of immutable inputs.
_last_columns: dict[tuple, tuple[list, list, list]] = {}
_last_labels: list = [[]]


def _column(lvs: list, infos: list, suffix: tuple, attr: str, div, keep_none: bool = False) -> list:
    """Rows (labels + suffix, tcp_info ``attr`` / ``div``) of every connection, in order; a connection whose
    kernel lacks the field has no row (or None in its place with ``keep_none``, for :func:`_interleave`)."""
    key = (suffix, attr, div, keep_none)
    last = _last_columns.get(key)
    if last is not None and last[0] is lvs and len(last[1]) == len(infos) and all(map(is_, last[1], infos)):
        return last[2]
    label_list = lvs
    vals = list(map(attrgetter(attr), infos))
    if suffix:
        lvs = [lv + suffix for lv in lvs]
    if div is not None:
        vals = [None if v is None else v / div for v in vals] if None in vals else list(map(truediv, vals, repeat(div)))
    rows = list(zip(lvs, vals))
    if None in vals:
        rows = [r if r[1] is not None else None for r in rows] if keep_none else [r for r in rows if r[1] is not None]
    _last_columns[key] = (label_list, infos, rows)
    return rows


def _interleave(columns) -> list:
    """Each connection's rows of several columns together (a connection's sent, then received, ...), Nones left out."""
    return [r for rows in zip(*columns) for r in rows if r is not None]


@snapshot_renderer(per_snapshot=True)
def render_storage_connections(snap: Snapshot) -> Iterable:
    conns = snap.storage_tcp
    paths = snap.paths
    owner = {}
    for p in paths:
        if p.connection:
            owner.setdefault(p.connection, (p.vm, p.disk))
    fams = [CONN_RTT.family(), CONN_RTTVAR.family(), CONN_RTO.family(), CONN_CWND.family(), CONN_UNACKED.family(),
            CONN_LOST.family(), CONN_BACKOFF.family(), CONN_RETRANS.family(), CONN_BYTES.family(),
            CONN_LAST_RECV.family(), CONN_COUNT.family(), PATH_INFO.family()]
    rtt, rttvar, rto, cwnd, unacked, lost, backoff, retrans, byts, lastrecv, count, pinfo = fams
    recv = [CONN_MIN_RTT.family(), CONN_RCV_RTT.family(), CONN_SEGS.family(), CONN_OOO.family(), CONN_DSACK.family(),
            CONN_REORD.family(), CONN_DELIVERED.family(), CONN_BUSY.family(), CONN_LIMITED.family()]
    minrtt, rcvrtt, segs, ooo, dsack, reord, delivered, busy, limited = recv
    fams += recv
    # rows of (label values, value) per family, a column of every connection at once (a big host has ~10,000)
    counts: dict[tuple[str, str], int] = {}
    lvs, infos = [], []
    for c in conns.connections if conns else ():
        portal = c.portal
        counts[(portal, c.state)] = counts.get((portal, c.state), 0) + 1
        if c.info is None:
            continue
        infos.append(c.info)
        lvs.append((portal, fmt_endpoint(c.src, c.sport)) + owner.get(c.four_tuple, ("", "")))
    if lvs == _last_labels[0]:
        lvs = _last_labels[0]  # the same connections as the last render: its list, so its columns can be reused
    else:
        _last_labels[0] = lvs
    for fam, attr, div in ((rtt, "rtt_us", 1e6), (rttvar, "rttvar_us", 1e6), (rto, "rto_us", 1e6),
                           (cwnd, "snd_cwnd", 1), (unacked, "unacked", 1), (lost, "lost", 1), (backoff, "backoff", 1),
                           (retrans, "total_retrans", 1), (lastrecv, "last_data_recv_ms", 1e3),
                           (minrtt, "min_rtt_us", 1e6), (rcvrtt, "rcv_rtt_us", 1e6), (ooo, "rcv_ooopack", 1),
                           (dsack, "dsack_dups", 1), (reord, "reord_seen", 1), (delivered, "delivered", 1),
                           (busy, "busy_time_us", 1e6)):
        fam.extend_rows(_column(lvs, infos, (), attr, div))
    segs.extend_rows(_interleave(_column(lvs, infos, suffix, attr, None, True) for suffix, attr in (
        (("sent", "all"), "segs_out"), (("received", "all"), "segs_in"), (("sent", "data"), "data_segs_out"),
        (("received", "data"), "data_segs_in"))))
    limited.extend_rows(_interleave(_column(lvs, infos, suffix, attr, 1e6, True) for suffix, attr in (
        (("receive_window",), "rwnd_limited_us"), (("send_buffer",), "sndbuf_limited_us"))))
    byts.extend_rows(_interleave(_column(lvs, infos, suffix, attr, None, True) for suffix, attr in (
        (("sent",), "bytes_sent"), (("received",), "bytes_received"), (("retransmitted",), "bytes_retrans"))))
    for (portal, state), n in sorted(counts.items()):
        count.add_metric([portal, state], n)
    for p in paths:
        local = p.connection.split("->", 1)[0] if p.connection else ""
        device = "/".join(x for x in (p.multipath, p.host_device, p.scsi_device) if x)
        pinfo.add_metric([p.vm, p.disk, p.backend, p.target or "", "" if p.lun is None else str(p.lun), p.portal or "",
                          "" if p.session is None else str(p.session), local, p.interface or "", device], 1)
    return fams
