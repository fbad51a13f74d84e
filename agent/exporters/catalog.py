"""Every Prometheus metric kvmscope exports, defined once.

The renderers build their families from these definitions (so name, type,
help and labels cannot drift), and ``docs/metrics.md`` is generated from this
table (``kvmscope metrics-doc``) and kept in sync by a test.

Naming: ``kvmscope_<subsystem>_<quantity>_<unit>``, base units, counters end
in ``_total`` (prometheus_client appends it to counter families), HELP says
where the value comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily


@dataclass(frozen=True)
class MetricDef:
    name: str  # full name; counters include the _total suffix
    type: str  # counter | gauge | histogram | info
    help: str
    labels: tuple[str, ...] = ()
    source: str = ""

    def family(self):
        if self.type == "counter":
            return CounterMetricFamily(self.name.removesuffix("_total"), self.help, labels=self.labels)
        if self.type == "gauge":
            return GaugeMetricFamily(self.name, self.help, labels=self.labels)
        if self.type == "histogram":
            return HistogramMetricFamily(self.name, self.help, labels=self.labels)
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
