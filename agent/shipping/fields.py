"""Every field kvmscope writes to Elasticsearch, with its type: the one truth.

The index templates (:mod:`agent.shipping.templates`) are generated from
these tables, the document builders are checked against them by a test (a
document may only hold mapped fields), and so are the Kibana saved objects.
docs/elasticsearch.md lists them for humans.

ECS where ECS has a field (``@timestamp``, ``host.*``, ``event.*``,
``source.*``/``destination.*``, ``process.*``, ``network.*``, ``log.*``),
the rest under ``kvmscope.*``. Only core field types are used (keyword,
long, double, date, ip, boolean, text): the templates install on any
Elasticsearch 8/9, including the minimal integ-test distribution that lacks
the mapper-extras module (no ``constant_keyword``, ``match_only_text``).

Data streams: ``<type>-kvmscope.<dataset>-<namespace>``.
"""

from __future__ import annotations

from dataclasses import dataclass

ECS_VERSION = "8.11.0"

# fields every document carries
BASE: dict[str, str] = {
    "@timestamp": "date",
    "message": "text",
    "tags": "keyword",
    "ecs.version": "keyword",
    "data_stream.type": "keyword",
    "data_stream.dataset": "keyword",
    "data_stream.namespace": "keyword",
    "agent.name": "keyword",
    "agent.type": "keyword",
    "agent.version": "keyword",
    "host.name": "keyword",
    "host.hostname": "keyword",
    "event.id": "keyword",
    "event.kind": "keyword",
    "event.category": "keyword",
    "event.type": "keyword",
    "event.dataset": "keyword",
    "event.module": "keyword",
    "event.action": "keyword",
    "event.outcome": "keyword",
    "event.reason": "keyword",
    "event.severity": "long",
    "event.created": "date",
    "event.duration": "long",
    "event.original": "keyword_noindex",
    "error.message": "text",
}

# who: the VM and disk a document is about (shared by several datasets)
_VM = {
    "kvmscope.vm.name": "keyword",
    "kvmscope.vm.uuid": "keyword",
    "kvmscope.vm.state": "keyword",
    "kvmscope.vm.manager": "keyword",
    "kvmscope.disk.target": "keyword",
}
_PATH = {
    "kvmscope.portal": "keyword",  # ADDR:PORT
    "kvmscope.iscsi.target": "keyword",  # IQN
    "kvmscope.iscsi.lun": "long",
    "kvmscope.iscsi.session.sid": "long",
}
_CONN = {
    "source.ip": "ip",
    "source.port": "long",
    "destination.ip": "ip",
    "destination.port": "long",
    "network.transport": "keyword",
    "network.type": "keyword",
    "process.pid": "long",
    "process.name": "keyword",
}

_HOST_TCP = {
    f"kvmscope.host.tcp.{k}": "long"
    for k in (
        "active_opens passive_opens attempt_fails estab_resets curr_estab in_segs out_segs retrans_segs "
        "in_errs out_rsts rto_timeouts fast_retrans lost_retransmit syn_retrans loss_probes abort_on_timeout"
    ).split()
}

_TCP_INFO = {
    f"kvmscope.tcp.{k}": "long"
    for k in (
        "retransmits probes backoff rto_us ato_us snd_mss rcv_mss unacked sacked lost retrans pmtu rtt_us "
        "rttvar_us snd_ssthresh snd_cwnd total_retrans bytes_acked bytes_received segs_out segs_in notsent_bytes "
        "min_rtt_us delivery_rate bytes_sent bytes_retrans dsack_dups reord_seen snd_wnd total_rto "
        "total_rto_recoveries total_rto_time_ms last_data_sent_ms last_data_recv_ms last_ack_recv_ms "
        "reordering rcv_rtt_us rcv_space data_segs_in data_segs_out busy_time_us rwnd_limited_us sndbuf_limited_us "
        "delivered delivered_ce rcv_ooopack rcv_wnd"
    ).split()
}

_DISK_STATS = {
    f"kvmscope.disk.stats.{k}": "long"
    for k in "rd_reqs rd_bytes rd_time_ns wr_reqs wr_bytes wr_time_ns fl_reqs fl_time_ns failed_reqs idle_time_ns".split()
}

_ISCSI_STATS = {
    f"kvmscope.iscsi.stats.{k}": "long"
    for k in (
        "txdata_octets rxdata_octets noptx_pdus scsicmd_pdus tmfcmd_pdus login_pdus text_pdus dataout_pdus "
        "logout_pdus snack_pdus noprx_pdus scsirsp_pdus tmfrsp_pdus textrsp_pdus datain_pdus logoutrsp_pdus "
        "r2t_pdus async_pdus rjt_pdus digest_err timeout_err"
    ).split()
}


@dataclass(frozen=True)
class Dataset:
    name: str  # kvmscope.<name>
    type: str  # metrics | logs
    fields: dict[str, str]
    description: str

    @property
    def stream_prefix(self) -> str:
        return f"{self.type}-kvmscope.{self.name}"

    def stream(self, namespace: str) -> str:
        return f"{self.stream_prefix}-{namespace}"


DATASETS: dict[str, Dataset] = {}


def _ds(name: str, type: str, description: str, *groups: dict[str, str]) -> Dataset:
    fields: dict[str, str] = {}
    for g in groups:
        fields.update(g)
    d = Dataset(name, type, fields, description)
    DATASETS[name] = d
    return d


HOST = _ds(
    "host", "metrics", "host-wide TCP counters per cycle (host_tcp)", _HOST_TCP,
    {"kvmscope.host.tcp.retrans_per_second": "double", "kvmscope.host.tcp.retrans_ratio": "double",
     "kvmscope.interval_seconds": "double"},
)
VM_DISK = _ds(
    "vm_disk", "metrics", "one document per VM disk per cycle (libvirt / QMP), joined to its storage path",
    _VM, _PATH, _DISK_STATS,
    {
        "kvmscope.disk.kind": "keyword",
        "kvmscope.disk.protocol": "keyword",
        "kvmscope.disk.backend": "keyword",
        "kvmscope.disk.source": "keyword",
        "kvmscope.disk.host_device": "keyword",
        "kvmscope.disk.read_iops": "double",
        "kvmscope.disk.write_iops": "double",
        "kvmscope.disk.read_latency_ms": "double",
        "kvmscope.disk.write_latency_ms": "double",
        "kvmscope.disk.latency_ms": "double",
        "kvmscope.disk.latency_source": "keyword",
        "kvmscope.disk.latency_requests": "long",
        "kvmscope.disk.latency_p50_ms": "double",
        "kvmscope.disk.latency_p90_ms": "double",
        "kvmscope.disk.latency_p99_ms": "double",
        "kvmscope.disk.latency_hist_mean_ms": "double",
        "kvmscope.disk.iscsi.in_flight": "long",
        "kvmscope.disk.iscsi.aborts": "long",
        "kvmscope.disk.iscsi.reconnects": "long",
        "kvmscope.connection": "keyword",
        "kvmscope.interval_seconds": "double",
        "process.pid": "long",
    },
)
ISCSI_SESSION = _ds(
    "iscsi_session", "metrics", "one document per open-iscsi session per cycle (sysfs, iscsiadm)",
    _PATH, _ISCSI_STATS,
    {
        "kvmscope.iscsi.session.state": "keyword",
        "kvmscope.iscsi.session.recovery_tmo": "long",
        "kvmscope.iscsi.session.iface": "keyword",
        "kvmscope.iscsi.session.initiator": "keyword",
        "kvmscope.iscsi.session.tpgt": "long",
        "kvmscope.iscsi.connection.cid": "keyword",
        "kvmscope.iscsi.connection.state": "keyword",
        "kvmscope.iscsi.connection.local_port": "long",
        "kvmscope.iscsi.connection.ping_tmo": "long",
        "kvmscope.iscsi.connection.recv_tmo": "long",
        "kvmscope.iscsi.disks": "keyword",
        "destination.ip": "ip",
        "destination.port": "long",
    },
)
CONNECTION = _ds(
    "connection", "metrics", "one document per storage TCP connection per cycle (inet_diag tcp_info)",
    _CONN, _TCP_INFO, _VM,
    {
        "kvmscope.tcp.state": "keyword",
        "kvmscope.tcp.retrans_delta": "long",
        "kvmscope.connection": "keyword",
        "kvmscope.portal": "keyword",
        "kvmscope.interval_seconds": "double",
    },
)
EVENTS = _ds(
    "events", "logs", "state changes and retransmit bursts, from comparing consecutive cycles (and eBPF events)",
    _VM, _PATH, _CONN,
    {
        "kvmscope.change.from": "keyword",
        "kvmscope.change.to": "keyword",
        "kvmscope.tcp.retrans_delta": "long",
        "kvmscope.tcp.state": "keyword",
        "kvmscope.connection": "keyword",
        "kvmscope.multipath.map": "keyword",
        "kvmscope.multipath.path": "keyword",
        "kvmscope.multipath.path_state": "keyword",
        "kvmscope.multipath.checker_state": "keyword",
        "kvmscope.multipath.active_paths": "long",
        "kvmscope.multipath.paths": "long",
        "kvmscope.multipath.queueing": "boolean",
    },
)
FINDINGS = _ds(
    "findings", "logs", "diagnosis findings (kvmscope diagnose rules)",
    _VM, _PATH,
    {
        "kvmscope.finding.rule": "keyword",
        "kvmscope.finding.cause_key": "keyword",
        "kvmscope.finding.severity": "keyword",
        "kvmscope.finding.summary": "text",
        "kvmscope.finding.evidence": "text",
        "kvmscope.connection": "keyword",
    },
)
INCIDENTS = _ds(
    "incidents", "logs", "diagnosis incidents: a finding's cause with its start, end (resolved), duration and the "
    "stall of each disk; one document when it opens, one when it is resolved (same incident id)",
    {
        "event.start": "date",
        "event.end": "date",
        "kvmscope.vm.name": "keyword",
        "kvmscope.portal": "keyword",
        "kvmscope.incident.id": "keyword",
        "kvmscope.incident.key": "keyword",
        "kvmscope.incident.rule": "keyword",
        "kvmscope.incident.severity": "keyword",
        "kvmscope.incident.state": "keyword",
        "kvmscope.incident.title": "text",
        "kvmscope.incident.scope": "keyword",
        "kvmscope.incident.duration_seconds": "double",
        "kvmscope.incident.cycles": "long",
        "kvmscope.incident.stalled_vms": "keyword",
        "kvmscope.incident.max_stall_seconds": "double",
        "kvmscope.incident.worst_latency_ms": "double",
        "kvmscope.incident.disks": "keyword_noindex",
        "kvmscope.incident.outage.start": "date",
        "kvmscope.incident.outage.end": "date",
        "kvmscope.incident.outage.max_backoff": "long",
        "kvmscope.incident.outage.retransmits": "long",
    },
)
STORAGE_LOG = _ds(
    "storage_log", "logs", "storage-path log lines: QEMU per-VM logs (libiscsi), kernel and iscsid messages",
    _VM,
    {
        "log.file.path": "keyword",
        "log.offset": "long",
        "log.logger": "keyword",
        "process.name": "keyword",
        "process.pid": "long",
        "kvmscope.log.kind": "keyword",
        "kvmscope.log.file_id": "keyword",
        "kvmscope.iscsi.connection.cid": "keyword",
        "kvmscope.iscsi.session.sid": "long",
        "kvmscope.iscsi.error_code": "long",
        "kvmscope.iscsi.error_name": "keyword",
        "kvmscope.scsi.sense_key": "keyword",
        "kvmscope.scsi.ascq": "keyword",
        "kvmscope.multipath.map": "keyword",
        "kvmscope.multipath.path": "keyword",
        "kvmscope.multipath.active_paths": "long",
        "kvmscope.multipath.no_path_retry": "long",
    },
)


def all_fields(dataset: Dataset) -> dict[str, str]:
    out = dict(BASE)
    out.update(dataset.fields)
    return out


def field_mapping(kind: str) -> dict:
    if kind == "keyword":
        return {"type": "keyword", "ignore_above": 1024}
    if kind == "keyword_noindex":
        return {"type": "keyword", "index": False, "doc_values": False}
    if kind == "text":
        return {"type": "text"}
    if kind == "date":
        return {"type": "date"}
    if kind in ("long", "double", "ip", "boolean"):
        return {"type": kind}
    raise ValueError(kind)


def properties(fields: dict[str, str]) -> dict:
    """Dotted field names → nested ``properties`` mapping."""
    root: dict = {}
    for name in sorted(fields):
        node = root
        parts = name.split(".") if not name.startswith("@") else [name]
        for p in parts[:-1]:
            node = node.setdefault(p, {"properties": {}})["properties"]
        node[parts[-1]] = field_mapping(fields[name])
    return root


def flatten(doc: dict, prefix: str = "") -> dict[str, object]:
    """A document's leaf fields by dotted name (lists are leaves)."""
    out: dict[str, object] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
