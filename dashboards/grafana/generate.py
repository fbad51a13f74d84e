"""Generate the Grafana dashboards (dashboards/grafana/*.json) from code.

    python -m dashboards.grafana.generate          # rewrite the JSON files
    python -m dashboards.grafana.generate --check  # exit 1 if a file is stale

Grafana 10+ dashboard schema (schemaVersion 39). Every panel queries the
Prometheus datasource picked by the ``datasource`` variable; ``host`` comes
from the ``host`` target label (deploy/prometheus/prometheus.yml sets it from
file_sd or from the target address), read from ``kvmscope_build_info``.

No maintained generator library installs here (grafana-foundation-sdk is not
on PyPI's index we can reach), so this is a small one: a panel is a title,
a type, a unit and its PromQL targets; layout is computed. Every query is
run against a real Prometheus scraping a live agent by
tests/lab/test_prometheus_lab.py, and every metric name it uses is checked
against the catalog by tests/unit/test_dashboards.py.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}
H = 'host=~"$host"'
RI = "$__rate_interval"
MP = "dm-multipath (multipath source)"


@dataclass
class Target:
    expr: str
    legend: str = ""
    instant: bool = False
    format: str = "time_series"  # time_series | table | heatmap


@dataclass
class Panel:
    title: str
    type: str  # timeseries | stat | table | bargauge | heatmap | state-timeline
    targets: list[Target]
    unit: str = "short"
    description: str = ""
    w: int = 12
    h: int = 8
    fault: str | None = None  # which lab fault makes this panel show data (tests/lab)
    needs: str | None = None  # data only on hosts with this (e.g. the kernel iSCSI initiator)
    options: dict = field(default_factory=dict)


def _target(t: Target, ref: str) -> dict:
    d = {"datasource": DS, "refId": ref, "expr": t.expr, "legendFormat": t.legend or "__auto",
         "range": not t.instant, "instant": t.instant, "format": t.format, "editorMode": "code"}
    return d


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    d = {
        "id": pid,
        "type": p.type,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.h, "w": p.w, "x": x, "y": y},
        "targets": [_target(t, chr(65 + i)) for i, t in enumerate(p.targets)],
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
        "options": dict(p.options),
    }
    if p.type == "timeseries":
        d["options"].setdefault("legend", {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]})
        d["options"].setdefault("tooltip", {"mode": "multi", "sort": "desc"})
    if p.type == "heatmap":
        d["options"].setdefault("calculate", False)
        d["options"].setdefault("yAxis", {"unit": p.unit})
        d["options"].setdefault("cellGap", 1)
        d["options"].setdefault("color", {"mode": "scheme", "scheme": "Oranges", "steps": 64})
    if p.type == "table":
        d["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "__name__": True}}}]
    meta = {k: v for k, v in (("fault", p.fault), ("needs", p.needs)) if v}
    if meta:
        d["kvmscope"] = meta  # read by the lab test; Grafana ignores unknown keys
    return d


def _variable_query(name: str, label: str, query: str, *, multi: bool, include_all: bool, label_text: str) -> dict:
    return {
        "name": name,
        "label": label_text,
        "type": "query",
        "datasource": DS,
        "query": {"query": f"label_values({query}, {label})", "refId": f"{name}-var"},
        "definition": f"label_values({query}, {label})",
        "refresh": 2,  # on time range change
        "sort": 1,
        "multi": multi,
        "includeAll": include_all,
        "allValue": ".*" if include_all else None,
        "current": {},
        "hide": 0,
        "options": [],
        "regex": "",
    }


def variables(extra: list[dict]) -> list[dict]:
    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        _variable_query("host", "host", "kvmscope_build_info", multi=True, include_all=True, label_text="host"),
        *extra,
    ]


def dashboard(uid: str, title: str, description: str, panels: list[Panel], extra_vars: list[dict]) -> dict:
    laid, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(panels, start=1):
        if x + p.w > 24:
            x, y, row_h = 0, y + row_h, 0
        laid.append(_panel(p, i, x, y))
        x += p.w
        row_h = max(row_h, p.h)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["kvmscope", "iscsi", "kvm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [{"title": "kvmscope", "type": "dashboards", "tags": ["kvmscope"], "asDropdown": True}],
        "templating": {"list": variables(extra_vars)},
        "panels": laid,
    }


# -- the dashboards --------------------------------------------------------------
def mean_latency(sel: str, by: str) -> str:
    return (f"sum by ({by}) (rate(kvmscope_vm_disk_time_seconds_total{{{sel}}}[{RI}]))\n"
            f"/ (sum by ({by}) (rate(kvmscope_vm_disk_requests_total{{{sel}}}[{RI}])) > 0)")


def host_overview() -> dict:
    vm_sel = f'{H},op!="flush"'
    panels = [
        Panel("Agents reporting", "stat", [Target(f"count by (host) (kvmscope_build_info{{{H}}})", "{{host}}")],
              w=4, h=4),
        Panel("Snapshot age", "stat", [Target(f"max by (host) (kvmscope_snapshot_age_seconds{{{H}}})", "{{host}}")],
              unit="s", w=4, h=4, description="Seconds since the agent's last collection cycle started."),
        Panel("VMs running", "stat", [Target(f"sum by (host) (kvmscope_vm_running{{{H}}})", "{{host}}")], w=4, h=4),
        Panel("Storage connections established", "stat",
              [Target(f'sum by (host) (kvmscope_storage_connections{{{H},state="ESTABLISHED"}})', "{{host}}")],
              w=4, h=4),
        Panel("iSCSI sessions logged in", "stat",
              [Target(f"sum by (host) (kvmscope_iscsi_session_up{{{H}}})", "{{host}} up"),
               Target(f"count by (host) (kvmscope_iscsi_session_up{{{H}}})", "{{host}} total")],
              w=4, h=4, needs="kernel iSCSI initiator (open-iscsi)"),
        Panel("Multipath paths per map", "stat",
              [Target(f"sum by (host) (kvmscope_multipath_map_active_paths{{{H}}})", "{{host}} usable"),
               Target(f"sum by (host) (kvmscope_multipath_map_paths{{{H}}})", "{{host}} total")],
              w=4, h=4, needs=MP),
        Panel("Series left out by caps", "stat",
              [Target(f"sum by (kind) (kvmscope_exporter_capped_objects{{{H}}})", "{{kind}}")], w=4, h=4,
              description="VMs/disks/connections above metrics.max_* that the exporter did not export."),
        Panel("VM disks ranked by mean latency", "bargauge",
              [Target(f"topk(15, {mean_latency(vm_sel, 'host, vm, disk')})", "{{vm}} {{disk}} ({{host}})",
                      instant=True)],
              unit="s", w=12, h=10, options={"orientation": "horizontal", "displayMode": "gradient",
                                             "reduceOptions": {"calcs": ["lastNotNull"], "values": False}},
              description="rate(time)/rate(requests) of read+write, libvirt bulk stats / QMP."),
        Panel("VM disk mean latency", "timeseries",
              [Target(mean_latency(vm_sel, "host, vm, disk"), "{{vm}} {{disk}}")], unit="s", w=12, h=10),
        Panel("iSCSI sessions and states", "table",
              [Target(f"kvmscope_iscsi_session_state{{{H}}} == 1", instant=True, format="table")],
              w=12, needs="kernel iSCSI initiator (open-iscsi)"),
        Panel("Storage connections by portal and state", "timeseries",
              [Target(f"sum by (host, portal, state) (kvmscope_storage_connections{{{H}}})",
                      "{{portal}} {{state}}")], w=12),
        Panel("Retransmits per portal (eBPF tcp_retransmit_skb)", "timeseries",
              [Target(f'sum by (host, remote_address, remote_port) (rate(kvmscope_tcp_retransmits_total'
                      f'{{{H},remote_address!="other"}}[{RI}]))', "{{remote_address}}:{{remote_port}}")],
              unit="pps", w=12, fault="loss"),
        Panel("Retransmitted segments per portal (tcp_info)", "timeseries",
              [Target(f"sum by (host, portal) (rate(kvmscope_storage_connection_retransmitted_segments_total"
                      f"{{{H}}}[{RI}]))", "{{portal}}")], unit="pps", w=12, fault="loss"),
        Panel("Host TCP retransmit ratio", "timeseries",
              [Target(f"rate(kvmscope_host_tcp_retransmitted_segments_total{{{H}}}[{RI}])\n"
                      f"/ (rate(kvmscope_host_tcp_sent_segments_total{{{H}}}[{RI}]) > 0)", "{{host}}")],
              unit="percentunit", w=12),
        Panel("Collector health", "state-timeline",
              [Target(f"kvmscope_collector_success{{{H}}} - on (host, instance, job, collector) "
                      f"(0.5 * kvmscope_collector_nodata{{{H}}})", "{{collector}}")],
              w=12, description="1 = ok, 0.5 = no data (normal absence), 0 = failed.",
              options={"showValue": "never"}),
        Panel("Collector duration", "timeseries",
              [Target(f"kvmscope_collector_duration_seconds{{{H}}}", "{{collector}}")], unit="s", w=12),
        Panel("Probe events and lost events", "timeseries",
              [Target(f"rate(kvmscope_probe_events_total{{{H}}}[{RI}])", "{{probe}} events"),
               Target(f"rate(kvmscope_probe_lost_events_total{{{H}}}[{RI}])", "{{probe}} lost")],
              unit="cps", w=12),
        Panel("Probe kernel CPU", "timeseries",
              [Target(f"rate(kvmscope_probe_run_time_seconds_total{{{H}}}[{RI}])", "{{probe}}")],
              unit="percentunit", w=12,
              description="Share of one CPU spent in the probes' BPF programs (needs kernel.bpf_stats_enabled=1)."),
    ]
    return dashboard("kvmscope-host", "kvmscope / Host storage overview",
                     "Per KVM host: which VM disks are slow, iSCSI sessions, retransmits per portal, agent health.",
                     panels, [])


def vm_drilldown() -> dict:
    sel = f'{H},vm=~"$vm",disk=~"$disk"'
    # eBPF block histograms of the host device under the VM's disk (file/block backends),
    # joined through kvmscope_storage_path_info's device label
    block = (f"rate(kvmscope_block_io_latency_seconds_bucket{{{H}}}[{RI}])\n"
             f"* on (host, instance, device) group_left () "
             f"max by (host, instance, device) (kvmscope_storage_path_info{{{sel},device!=\"\"}})")
    qemu = f"rate(kvmscope_vm_disk_latency_seconds_bucket{{{sel}}}[{RI}])"
    portal_join = (f'* on (host, instance, remote_address, remote_port) group_left (vm, disk) max by '
                   f'(host, instance, remote_address, remote_port, vm, disk) (label_replace(label_replace('
                   f'kvmscope_vm_disk_info{{{sel},portal!=""}}, "remote_address", "$1", "portal", '
                   f'"\\\\[?(.*?)\\\\]?:[0-9]+"), "remote_port", "$1", "portal", ".*:([0-9]+)"))')
    panels = [
        Panel("Mean latency per disk and op", "timeseries",
              [Target(mean_latency(sel, "vm, disk, op"), "{{vm}} {{disk}} {{op}}")], unit="s", w=12,
              description="rate(kvmscope_vm_disk_time_seconds_total) / rate(kvmscope_vm_disk_requests_total)."),
        Panel("Latency percentiles per disk (p50, p99)", "timeseries",
              [Target(f"histogram_quantile({q}, sum by (vm, disk, op, source, le) ({qemu}))",
                      f"p{int(q * 100)} {{{{vm}}}} {{{{disk}}}} {{{{op}}}} ({{{{source}}}})") for q in (0.5, 0.99)],
              unit="s", w=12,
              description="kvmscope_vm_disk_latency_seconds, one histogram per disk and op from the source that "
                          "measures it: libiscsi (iSCSI command time inside QEMU, eBPF uprobes), block (the VM's QEMU "
                          "process on the host device under a file/block disk, eBPF block tracepoints), qmp (QEMU's "
                          "own histograms, stand-alone QEMU)."),
        Panel("Host device latency under the disk (eBPF, all processes)", "timeseries",
              [Target(f"histogram_quantile({q}, sum by (device, op, le) ({block}))",
                      f"p{int(q * 100)} host {{{{device}}}} {{{{op}}}}") for q in (0.5, 0.99)],
              unit="s", w=12,
              description="The eBPF block histogram of the whole host device under a file/block-backed disk "
                          "(every process's I/O on it, not only this VM's)."),
        Panel("Latency heatmap", "heatmap",
              [Target(f"sum by (le) ({qemu})", "{{le}}", format="heatmap")], unit="s", w=12),
        Panel("iSCSI commands in flight, aborts, reconnects (libiscsi)", "timeseries",
              [Target(f"kvmscope_vm_disk_iscsi_commands_in_flight{{{sel}}}", "{{vm}} {{disk}} in flight"),
               Target(f"increase(kvmscope_vm_disk_iscsi_aborts_total{{{sel}}}[5m])", "{{vm}} {{disk}} aborts /5m"),
               Target(f"increase(kvmscope_vm_disk_iscsi_reconnects_total{{{sel}}}[5m])",
                      "{{vm}} {{disk}} reconnects /5m")], w=12,
              description="Per libiscsi disk (eBPF uprobes on QEMU's libiscsi.so.7): commands submitted and not "
                          "completed; task aborts QEMU sent (it gave up on a command); new logins after a lost "
                          "connection."),
        Panel("Operations per second", "timeseries",
              [Target(f"sum by (vm, disk, op) (rate(kvmscope_vm_disk_requests_total{{{sel}}}[{RI}]))",
                      "{{vm}} {{disk}} {{op}}")], unit="ops", w=12),
        Panel("Throughput", "timeseries",
              [Target(f"sum by (vm, disk, op) (rate(kvmscope_vm_disk_bytes_total{{{sel}}}[{RI}]))",
                      "{{vm}} {{disk}} {{op}}")], unit="Bps", w=12),
        Panel("Storage path", "table",
              [Target(f"kvmscope_storage_path_info{{{sel}}}", instant=True, format="table")], w=12,
              description="VM disk -> backend -> session -> connection -> portal -> interface (kvmscope paths)."),
        Panel("Connection retransmits (tcp_info)", "timeseries",
              [Target(f"rate(kvmscope_storage_connection_retransmitted_segments_total{{{sel}}}[{RI}])",
                      "{{disk}} {{local}} -> {{portal}}")], unit="pps", w=12, fault="loss"),
        Panel("Retransmits to the disk's portal (eBPF)", "timeseries",
              [Target(f"sum by (host, instance, remote_address, remote_port) (rate(kvmscope_tcp_retransmits_total"
                      f"{{{H}}}[{RI}]))\n{portal_join}", "{{vm}} {{disk}} -> {{remote_address}}")],
              unit="pps", w=12, fault="loss"),
        Panel("Multipath: usable paths per map", "timeseries",
              [Target(f"kvmscope_multipath_map_active_paths{{{H}}}", "{{map}} usable"),
               Target(f"kvmscope_multipath_map_paths{{{H}}}", "{{map}} total")], w=12, needs=MP,
              description="Paths the kernel may send the map's I/O to (dmsetup status A) against all its paths."),
        Panel("Multipath path state", "state-timeline",
              [Target(f"kvmscope_multipath_path_up{{{H}}}", "{{map}} {{path}} {{portal}}")], w=12, needs=MP,
              description="1 = the kernel uses the path, 0 = failed (I/O runs on the map's other paths)."),
        Panel("Multipath failovers (path failures)", "timeseries",
              [Target(f"sum by (host, map, path, portal) (increase(kvmscope_multipath_path_failures_total{{{H}}}"
                      f"[5m]))", "{{map}} {{path}} {{portal}}")], w=12, needs=MP,
              description="Times the kernel failed a path in 5 minutes (dmsetup status fail count)."),
        Panel("Multipath maps queueing with no path", "timeseries",
              [Target(f"kvmscope_multipath_map_queueing{{{H}}}", "{{map}} queueing"),
               Target(f"kvmscope_multipath_map_queueing_remaining_seconds{{{H}}}", "{{map}} seconds left")],
              w=12, needs=MP,
              description="1 = every path failed and the map holds I/O: its VMs hang (no_path_retry counts down)."),
        Panel("Connection RTT", "timeseries",
              [Target(f"kvmscope_storage_connection_rtt_seconds{{{sel}}}", "{{disk}} rtt"),
               Target(f"kvmscope_storage_connection_rtt_variance_seconds{{{sel}}}", "{{disk}} rttvar")],
              unit="s", w=12),
        Panel("Connection RTO and backoff", "timeseries",
              [Target(f"kvmscope_storage_connection_rto_seconds{{{sel}}}", "{{disk}} rto"),
               Target(f"kvmscope_storage_connection_rto_backoff{{{sel}}}", "{{disk}} backoff")], unit="s", w=12),
    ]
    extra = [
        _variable_query("vm", "vm", 'kvmscope_vm_running{host=~"$host"}', multi=True, include_all=False,
                        label_text="VM"),
        _variable_query("disk", "disk", 'kvmscope_vm_disk_info{host=~"$host",vm=~"$vm"}', multi=True,
                        include_all=True, label_text="disk"),
    ]
    return dashboard("kvmscope-vm", "kvmscope / VM disk drill-down",
                     "One VM's disks: latency (mean, percentiles, heatmap), ops, throughput, storage path, "
                     "and the TCP connection under each iSCSI disk.", panels, extra)


def iscsi_tcp() -> dict:
    s = f'{H},portal=~"$portal"'
    panels = [
        Panel("iSCSI sessions", "table",
              [Target(f"kvmscope_iscsi_session_state{{{s}}} == 1", instant=True, format="table")], w=12,
              needs="kernel iSCSI initiator (open-iscsi)"),
        Panel("Session up", "state-timeline",
              [Target(f"kvmscope_iscsi_session_up{{{s}}}", "{{portal}} sid {{session}}")], w=12,
              needs="kernel iSCSI initiator (open-iscsi)"),
        Panel("PDUs per second by type", "timeseries",
              [Target(f"sum by (portal, session, type) (rate(kvmscope_iscsi_session_pdus_total{{{s}}}[{RI}]))",
                      "{{portal}} sid {{session}} {{type}}")], unit="cps", w=12,
              needs="kernel iSCSI initiator (open-iscsi)"),
        Panel("iSCSI errors", "timeseries",
              [Target(f"sum by (portal, session, type) (increase(kvmscope_iscsi_session_errors_total{{{s}}}[{RI}]))",
                      "{{portal}} sid {{session}} {{type}}")], w=12, needs="kernel iSCSI initiator (open-iscsi)"),
        Panel("iSCSI data rate", "timeseries",
              [Target(f"sum by (portal, session, direction) (rate(kvmscope_iscsi_session_data_bytes_total{{{s}}}"
                      f"[{RI}]))", "{{portal}} sid {{session}} {{direction}}")], unit="Bps", w=12,
              needs="kernel iSCSI initiator (open-iscsi)"),
        Panel("Storage connections by state", "timeseries",
              [Target(f"sum by (portal, state) (kvmscope_storage_connections{{{s}}})", "{{portal}} {{state}}")],
              w=12),
        Panel("Retransmitted segments per connection (tcp_info)", "timeseries",
              [Target(f"rate(kvmscope_storage_connection_retransmitted_segments_total{{{s}}}[{RI}])",
                      "{{local}} -> {{portal}} ({{vm}} {{disk}})")], unit="pps", w=12, fault="loss"),
        Panel("Retransmits and resets per storage remote (eBPF)", "timeseries",
              [Target(f'sum by (remote_address, remote_port) (rate(kvmscope_tcp_retransmits_total'
                      f'{{{H},remote_address!="other"}}[{RI}]))', "{{remote_address}} retransmits"),
               Target(f'sum by (remote_address, remote_port) (rate(kvmscope_tcp_resets_received_total'
                      f'{{{H},remote_address!="other"}}[{RI}]))', "{{remote_address}} resets received")],
              unit="pps", w=12, fault="loss"),
        Panel("Connection RTT", "timeseries",
              [Target(f"kvmscope_storage_connection_rtt_seconds{{{s}}}", "{{local}} -> {{portal}}")], unit="s", w=12),
        Panel("Segments lost and in flight", "timeseries",
              [Target(f"kvmscope_storage_connection_lost_segments{{{s}}}", "{{local}} lost"),
               Target(f"kvmscope_storage_connection_unacked_segments{{{s}}}", "{{local}} unacked")], w=12),
        Panel("Reconnects (connect events, eBPF)", "timeseries",
              [Target(f'sum by (remote_address, remote_port) (increase(kvmscope_storage_tcp_connection_events_total'
                      f'{{{H},event="connect"}}[5m]))', "{{remote_address}}:{{remote_port}}")], w=12,
              fault="reconnect",
              description="Connections opened to a storage port in 5 minutes: reconnect churn when > 1."),
        Panel("Storage connection events (eBPF)", "timeseries",
              [Target(f'sum by (remote_address, event) (rate(kvmscope_storage_tcp_connection_events_total'
                      f'{{{H}}}[{RI}]))', "{{remote_address}} {{event}}")], unit="cps", w=12, fault="reconnect"),
    ]
    extra = [_variable_query("portal", "portal", 'kvmscope_storage_connections{host=~"$host"}', multi=True,
                             include_all=True, label_text="portal")]
    return dashboard("kvmscope-iscsi-tcp", "kvmscope / iSCSI and TCP",
                     "Per iSCSI session and portal: state, PDU and error counters, retransmits, RTT, reconnects.",
                     panels, extra)


DASHBOARDS = {
    "kvmscope-host-overview.json": host_overview,
    "kvmscope-vm-drilldown.json": vm_drilldown,
    "kvmscope-iscsi-tcp.json": iscsi_tcp,
}


def render(fn) -> str:
    return json.dumps(fn(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, fn in DASHBOARDS.items():
        path, text = OUT / name, render(fn)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}", file=sys.stderr)
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m dashboards.grafana.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
