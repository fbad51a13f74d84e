"""Every Prometheus metric kvmscope exports, defined once.

The renderers build their families from these definitions (so name, type,
help and labels cannot drift), and ``docs/metrics.md`` is generated from this
table (``kvmscope metrics-doc``) and kept in sync by a test.

Naming: ``kvmscope_<subsystem>_<quantity>_<unit>``, base units, counters end
in ``_total`` (prometheus_client appends it to counter families), HELP says
where the value comes from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample

# Families of the catalog keep their samples as rows: (label values in the family's label order, value) for
# gauges and counters, (label values, buckets, sum) for histograms. The text writer (exposition.write_family)
# and the series caps (caps.SeriesCap) read the rows directly; prometheus_client Samples, each with a label dict
# (~2.5 us apiece, ~20,000 per scrape of a big host: docs/performance.md), are built only when someone reads
# ``samples`` (the collect() path of prometheus_client, tests), exactly as prometheus_client's add_metric builds them.
_new_tuple = tuple.__new__
_materializing = threading.Lock()
_TAIL = tuple(Sample._field_defaults.get(f) for f in Sample._fields[3:])  # timestamp, exemplar, ...: all None
assert Sample._fields[:3] == ("name", "labels", "value") and _TAIL == (None,) * len(_TAIL)


class _Rows:
    """Samples kept as rows until read (see above). ``samples`` is the materialized Samples followed by the
    rows' (order kept); writing ``samples`` replaces both."""

    _rows: list

    @property
    def samples(self) -> list:
        if self._rows:
            with _materializing:  # two scrapes of one cached family must not both turn its rows into samples
                rows = self._rows
                if rows:
                    self._samples.extend(self._materialize(rows))
                    self._rows = []
        return self._samples

    @samples.setter
    def samples(self, value) -> None:
        self._rows = []
        self._samples = value

    def rows(self) -> list | None:
        """The rows, when every sample still is one (none materialized); else None."""
        return None if self._samples else self._rows

    def has_samples(self) -> bool:
        return bool(self._rows) or bool(self._samples)

    def extend_rows(self, rows) -> None:
        """add_metric of many samples at once: ``rows`` of (tuple of label values, value) (histograms: (tuple of
        label values, buckets, sum)), for renderers of many series."""
        self._rows.extend(rows)

    def set_rows(self, rows: list) -> None:
        self._samples = []
        self._rows = rows

    def row_samples(self, row) -> int:
        """Samples one row stands for."""
        return 1


class _Gauge(_Rows, GaugeMetricFamily):
    def add_metric(self, labels, value, timestamp=None) -> None:
        if timestamp is not None:
            return super().add_metric(labels, value, timestamp)
        self._rows.append((tuple(labels), value))

    def _materialize(self, rows):
        name, names = self.name, self._labelnames
        return [_new_tuple(Sample, (name, dict(zip(names, lv)), v) + _TAIL) for lv, v in rows]


class _Counter(_Rows, CounterMetricFamily):
    def __init__(self, name: str, documentation: str, labels=None):
        super().__init__(name, documentation, labels=labels)
        self._sample_name = self.name + "_total"

    def add_metric(self, labels, value, created=None, timestamp=None, exemplar=None) -> None:
        if created is not None or timestamp is not None or exemplar is not None:
            return super().add_metric(labels, value, created, timestamp, exemplar)
        self._rows.append((tuple(labels), value))

    def _materialize(self, rows):
        name, names = self._sample_name, self._labelnames
        return [_new_tuple(Sample, (name, dict(zip(names, lv)), v) + _TAIL) for lv, v in rows]


class _Histogram(_Rows, HistogramMetricFamily):
    def add_metric(self, labels, buckets, sum_value, timestamp=None) -> None:
        if timestamp is not None:
            return super().add_metric(labels, buckets, sum_value, timestamp)
        self._rows.append((tuple(labels), buckets, sum_value))

    def row_samples(self, row) -> int:
        _lv, buckets, sum_value = row
        return len(buckets) + (2 if sum_value is not None and float(buckets[0][0]) >= 0 else 0)

    def _materialize(self, rows):  # HistogramMetricFamily.add_metric's samples, without a timestamp
        out: list = []
        bucket, count, total, names = self.name + "_bucket", self.name + "_count", self.name + "_sum", self._labelnames
        for lv, buckets, sum_value in rows:
            for b in buckets:
                out.append(Sample(bucket, dict(list(zip(names, lv)) + [("le", b[0])]), b[1], None,
                                  b[2] if len(b) == 3 else None))
            if float(buckets[0][0]) >= 0 and sum_value is not None:
                out.append(Sample(count, dict(zip(names, lv)), buckets[-1][1], None))
                out.append(Sample(total, dict(zip(names, lv)), sum_value, None))
        return out


def has_samples(fam) -> bool:
    """Whether a family has a sample, without building Samples out of rows."""
    return fam.has_samples() if isinstance(fam, _Rows) else bool(fam.samples)


@dataclass(frozen=True)
class MetricDef:
    name: str  # full name; counters include the _total suffix
    type: str  # counter | gauge | histogram | info
    help: str
    labels: tuple[str, ...] = ()
    source: str = ""

    def family(self):
        if self.type == "counter":
            return _Counter(self.name.removesuffix("_total"), self.help, labels=self.labels)
        if self.type == "gauge":
            return _Gauge(self.name, self.help, labels=self.labels)
        if self.type == "histogram":
            return _Histogram(self.name, self.help, labels=self.labels)
        raise ValueError(self.type)


CATALOG: dict[str, MetricDef] = {}


def define(name: str, type: str, help: str, labels: tuple[str, ...] = (), source: str = "") -> MetricDef:
    d = MetricDef(name, type, help, labels, source)
    CATALOG[name] = d
    return d


# -- the agent itself -----------------------------------------------------
COLLECTOR_SUCCESS = define(
    "kvmscope_collector_success",
    "gauge",
    "1 if the collector's last run succeeded or found nothing to report (no data), 0 if it failed.",
    ("collector",),
    "agent loop",
)
COLLECTOR_NODATA = define(
    "kvmscope_collector_nodata",
    "gauge",
    "1 if the collector's last run found nothing to report for a normal reason (e.g. no iSCSI sessions).",
    ("collector",),
    "agent loop",
)
COLLECTOR_DURATION = define(
    "kvmscope_collector_duration_seconds",
    "gauge",
    "Wall time of the collector's last run.",
    ("collector",),
    "agent loop",
)
COLLECTOR_DROPPED = define(
    "kvmscope_collector_dropped_samples_total",
    "counter",
    "Samples or tracked objects the collector left out since the agent started, by reason: invalid_value (a value "
    "from outside of the wrong type or out of range, e.g. a QMP counter that is not an integer), evicted (a "
    "per-object table was full), expired (an object not seen for a while was forgotten); storage_log: line_too_long (a "
    "log line over 1 MiB, skipped), event_cap (events over storage_log.max_events in one cycle), "
    "untrusted_kernel_line (a syslog line tagged kernel whose facility is not kern).",
    ("collector", "reason"),
    "agent loop",
)
SNAPSHOT_TIMESTAMP = define(
    "kvmscope_snapshot_timestamp_seconds",
    "gauge",
    "UNIX time at which the latest collection cycle started.",
    (),
    "agent loop",
)
SNAPSHOT_AGE = define(
    "kvmscope_snapshot_age_seconds",
    "gauge",
    "Seconds since the latest collection cycle started, at scrape time.",
    (),
    "agent loop",
)
CYCLE_DURATION = define(
    "kvmscope_cycle_duration_seconds",
    "gauge",
    "Wall time of the latest whole collection cycle.",
    (),
    "agent loop",
)
BUILD_INFO = define(
    "kvmscope_build_info",
    "gauge",
    "Always 1; labels carry the kvmscope and Python versions.",
    ("version", "python"),
    "agent",
)

# -- host TCP (/proc/net/snmp, /proc/net/netstat) ----------------------------
# (group, field) -> metric. Counters unless noted.
HOST_TCP_FIELDS: dict[tuple[str, str], MetricDef] = {
    ("Tcp", "RetransSegs"): define(
        "kvmscope_host_tcp_retransmitted_segments_total", "counter",
        "TCP segments retransmitted by this host (all connections); /proc/net/snmp Tcp RetransSegs.",
        source="/proc/net/snmp"),
    ("Tcp", "OutSegs"): define(
        "kvmscope_host_tcp_sent_segments_total", "counter",
        "TCP segments sent, excluding retransmissions; /proc/net/snmp Tcp OutSegs.", source="/proc/net/snmp"),
    ("Tcp", "InSegs"): define(
        "kvmscope_host_tcp_received_segments_total", "counter",
        "TCP segments received, including errors; /proc/net/snmp Tcp InSegs.", source="/proc/net/snmp"),
    ("Tcp", "InErrs"): define(
        "kvmscope_host_tcp_receive_errors_total", "counter",
        "TCP segments received in error (bad checksum etc.); /proc/net/snmp Tcp InErrs.", source="/proc/net/snmp"),
    ("Tcp", "OutRsts"): define(
        "kvmscope_host_tcp_sent_resets_total", "counter",
        "TCP segments sent with the RST flag; /proc/net/snmp Tcp OutRsts.", source="/proc/net/snmp"),
    ("Tcp", "ActiveOpens"): define(
        "kvmscope_host_tcp_active_opens_total", "counter",
        "TCP connections opened by this host (SYN sent); /proc/net/snmp Tcp ActiveOpens.", source="/proc/net/snmp"),
    ("Tcp", "AttemptFails"): define(
        "kvmscope_host_tcp_attempt_fails_total", "counter",
        "TCP connection attempts that failed; /proc/net/snmp Tcp AttemptFails.", source="/proc/net/snmp"),
    ("Tcp", "EstabResets"): define(
        "kvmscope_host_tcp_established_resets_total", "counter",
        "Established TCP connections reset; /proc/net/snmp Tcp EstabResets.", source="/proc/net/snmp"),
    ("Tcp", "CurrEstab"): define(
        "kvmscope_host_tcp_established_connections", "gauge",
        "TCP connections currently ESTABLISHED or CLOSE_WAIT; /proc/net/snmp Tcp CurrEstab.", source="/proc/net/snmp"),
    ("TcpExt", "TCPTimeouts"): define(
        "kvmscope_host_tcp_rto_timeouts_total", "counter",
        "Retransmission timer (RTO) expiries; /proc/net/netstat TcpExt TCPTimeouts.", source="/proc/net/netstat"),
    ("TcpExt", "TCPFastRetrans"): define(
        "kvmscope_host_tcp_fast_retransmits_total", "counter",
        "Fast retransmits (loss detected by duplicate ACKs/SACK); /proc/net/netstat TcpExt TCPFastRetrans.",
        source="/proc/net/netstat"),
    ("TcpExt", "TCPLostRetransmit"): define(
        "kvmscope_host_tcp_lost_retransmits_total", "counter",
        "Retransmitted segments that were lost again; /proc/net/netstat TcpExt TCPLostRetransmit.",
        source="/proc/net/netstat"),
    ("TcpExt", "TCPSynRetrans"): define(
        "kvmscope_host_tcp_syn_retransmits_total", "counter",
        "SYN and SYN-ACK retransmits (connects struggling); /proc/net/netstat TcpExt TCPSynRetrans.",
        source="/proc/net/netstat"),
    ("TcpExt", "TCPLossProbes"): define(
        "kvmscope_host_tcp_loss_probes_total", "counter",
        "Tail loss probes sent; /proc/net/netstat TcpExt TCPLossProbes.", source="/proc/net/netstat"),
    ("TcpExt", "TCPAbortOnTimeout"): define(
        "kvmscope_host_tcp_aborts_on_timeout_total", "counter",
        "Connections aborted after too many retransmission timeouts; /proc/net/netstat TcpExt TCPAbortOnTimeout.",
        source="/proc/net/netstat"),
}

# -- eBPF probes (probes/*.bpf.c, docs/probes.md) ------------------------------
TCP_RETRANSMITS = define(
    "kvmscope_tcp_retransmits_total", "counter",
    "TCP segments retransmitted; tracepoint tcp:tcp_retransmit_skb. Per remote address/port for connections to a "
    "storage port (storage.ports), remote_address=\"other\" for all other connections.",
    ("remote_address", "remote_port"), "tcp:tcp_retransmit_skb")
TCP_SYNACK_RETRANSMITS = define(
    "kvmscope_tcp_synack_retransmits_total", "counter",
    "SYN-ACKs retransmitted; tracepoint tcp:tcp_retransmit_synack (same labels as kvmscope_tcp_retransmits_total).",
    ("remote_address", "remote_port"), "tcp:tcp_retransmit_synack")
TCP_RESETS_SENT = define(
    "kvmscope_tcp_resets_sent_total", "counter",
    "TCP resets sent; tracepoint tcp:tcp_send_reset (same labels as kvmscope_tcp_retransmits_total).",
    ("remote_address", "remote_port"), "tcp:tcp_send_reset")
TCP_RESETS_RECEIVED = define(
    "kvmscope_tcp_resets_received_total", "counter",
    "TCP resets received; tracepoint tcp:tcp_receive_reset (same labels as kvmscope_tcp_retransmits_total).",
    ("remote_address", "remote_port"), "tcp:tcp_receive_reset")
BLOCK_IO_LATENCY = define(
    "kvmscope_block_io_latency_seconds", "histogram",
    "Block request latency, start to completion: the kernel's own request start (struct request start_time_ns, "
    "as /sys/block/*/stat) -> block_rq_complete (BTF raw tracepoints; on kernels without them insert, or issue, "
    "-> complete with the block:block_rq_* tracepoints), log2 buckets.",
    ("device", "op"), "block:block_rq_complete")
BLOCK_IO_QUEUE = define(
    "kvmscope_block_io_queue_seconds", "histogram",
    "Block request time queued, start to dispatch to the driver (struct request io_start_time_ns, on queues "
    "that keep I/O statistics; classic tracepoints: insert -> issue, requests that were inserted), log2 buckets.",
    ("device", "op"), "block:block_rq_complete")
BLOCK_IO_DEVICE = define(
    "kvmscope_block_io_device_seconds", "histogram",
    "Block request time at the device driver, dispatch to completion (struct request io_start_time_ns, on "
    "queues that keep I/O statistics; classic tracepoints: issue -> complete), log2 buckets.",
    ("device", "op"), "block:block_rq_complete")
BLOCK_IO_BYTES = define(
    "kvmscope_block_io_bytes_total", "counter",
    "Bytes of completed block requests (block_rq_complete).",
    ("device", "op"), "block:block_rq_complete")
STORAGE_CONN_EVENTS = define(
    "kvmscope_storage_tcp_connection_events_total", "counter",
    "Storage-port TCP connection events (connect, established, close, reset, failed, abort); tracepoint "
    "sock:inet_sock_set_state (+ tcp:tcp_receive_reset/tcp_send_reset). Reconnect churn = rate of connect.",
    ("remote_address", "remote_port", "event"), "sock:inet_sock_set_state")
STORAGE_CONN_OPEN = define(
    "kvmscope_storage_tcp_connections_tracked", "gauge",
    "Storage-port TCP connections open now, as seen by tracepoint sock:inet_sock_set_state since the probe loaded.",
    ("remote_address", "remote_port"), "sock:inet_sock_set_state")
PROBE_EVENTS = define(
    "kvmscope_probe_events_total", "counter",
    "Tracepoint events handled by the eBPF probe (its in-kernel counters).", ("probe",), "eBPF maps")
PROBE_LOST = define(
    "kvmscope_probe_lost_events_total", "counter",
    "Events the eBPF probe could not account for (stream drops, unmatched completions, recursion misses).",
    ("probe",), "eBPF maps, /proc/self/fdinfo")
PROBE_RUN_TIME = define(
    "kvmscope_probe_run_time_seconds_total", "counter",
    "Kernel CPU time spent in the probe's BPF programs; /proc/self/fdinfo run_time_ns (BPF_ENABLE_STATS).",
    ("probe",), "/proc/self/fdinfo")
PROBE_RUNS = define(
    "kvmscope_probe_runs_total", "counter",
    "Runs of the probe's BPF programs counted while BPF stats were on; /proc/self/fdinfo run_cnt.",
    ("probe",), "/proc/self/fdinfo")

# -- the exporter's own bounds (agent/exporters/caps.py, metrics.max_*) --
SERIES_DROPPED = define(
    "kvmscope_exporter_series_dropped_total", "counter",
    "Series left out of /metrics because a cap (metrics.max_vms, max_disks, max_connections) was reached, by kind "
    "of object (vm, disk, connection), summed over scrapes.",
    ("kind",), "exporter")
CAPPED_OBJECTS = define(
    "kvmscope_exporter_capped_objects", "gauge",
    "Objects (VMs, VM disks, storage connections/remotes) left out of the last scrape because their cap was reached.",
    ("kind",), "exporter")

# -- shipping to Elasticsearch / JSON-lines files (agent/shipping) ---------
SHIPPING_QUEUED = define(
    "kvmscope_shipping_queued_documents", "gauge",
    "Documents in the local spool not yet acknowledged by Elasticsearch (shipped or set aside).", (), "shipping spool")
SHIPPING_SHIPPED = define(
    "kvmscope_shipping_shipped_documents_total", "counter",
    "Documents Elasticsearch holds after a bulk request (created, or already there from a replay: HTTP 409).", (),
    "shipping bulk responses")
SHIPPING_RETRIED = define(
    "kvmscope_shipping_retried_documents_total", "counter",
    "Document sends retried after a connection error, HTTP 429 or 5xx (whole request or single item).", (),
    "shipping bulk responses")
SHIPPING_FAILED = define(
    "kvmscope_shipping_failed_documents_total", "counter",
    "Documents Elasticsearch refused (e.g. mapping conflict), set aside in the spool's dead-letter.ndjson with the reason.",
    (), "shipping bulk responses")
SHIPPING_DROPPED = define(
    "kvmscope_shipping_dropped_documents_total", "counter",
    "Documents deleted unshipped because the spool reached elasticsearch.spool_max_bytes (oldest first).", (),
    "shipping spool")
SHIPPING_SPOOL_BYTES = define(
    "kvmscope_shipping_spool_bytes", "gauge", "Bytes of spool segment files on disk.", (), "shipping spool")
SHIPPING_OLDEST_AGE = define(
    "kvmscope_shipping_oldest_queued_age_seconds", "gauge",
    "Age of the oldest document not yet acknowledged (0 when the spool is drained).", (), "shipping spool")
SHIPPING_UP = define(
    "kvmscope_shipping_up", "gauge",
    "1 if the last request to Elasticsearch got an answer and the last local write (spool, file output) worked; "
    "0 if either failed (see kvmscope_shipping_local_errors_total for the local side).", (),
    "shipping bulk responses, local writes")
SHIPPING_BULK_REQUESTS = define(
    "kvmscope_shipping_bulk_requests_total", "counter", "Bulk requests sent to Elasticsearch.", (),
    "shipping bulk responses")
SHIPPING_BULK_ERRORS = define(
    "kvmscope_shipping_bulk_errors_total", "counter",
    "Bulk requests (or template installs) that failed as a whole: connection error, timeout, 429, 5xx, 401/403.", (),
    "shipping bulk responses")
SHIPPING_LOCAL_ERRORS = define(
    "kvmscope_shipping_local_errors_total", "counter",
    "Local writes that failed (disk full, read-only file system, I/O error): a cycle's documents not written to the "
    "spool or the file output (they are not shipped), or a save of the spool position (retried).", (),
    "shipping spool, file output")
SHIPPING_FILE_DOCS = define(
    "kvmscope_shipping_file_documents_total", "counter",
    "Documents written to the JSON-lines file output (file_output.path).", (), "shipping file output")
