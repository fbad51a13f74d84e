"""ECS documents: every builder's fields are in the index templates, ids are deterministic,
rates and state-change events come from two consecutive cycles."""

from __future__ import annotations

import ipaddress
from pathlib import Path


from agent.records.iscsi import IscsiConnection, IscsiSession, IscsiSessions, ScsiDisk
from agent.records.snapshot import Snapshot
from agent.records.storage_log import StorageLogEvent, StorageLogEvents
from agent.records.tcp import HostTcpCounters
from agent.records.tcp import TcpInfo
from agent.records.tcp import StorageConnection, StorageConnections
from agent.records.ebpf import LibiscsiData, LibiscsiLatency
from agent.records.vms import DiskStats, Vm, VmDisk, Vms
from agent.shipping import templates
from agent.shipping.ecs import doc_id, documents, finding_doc
from agent.shipping.fields import DATASETS, all_fields, flatten


def snap(seq, ts, *, rd=100, rd_ns=50_000_000, retrans=3, sess_state="LOGGED_IN", conn_state="ESTABLISHED", log_events=()):
    disk = VmDisk("vda", "network", "iscsi", "iqn.2025-01.io.example:web01/1", (("198.18.0.2", 3260),),
                  "iqn.2025-01.io.example:web01", 1,
                  stats=DiskStats(rd_reqs=rd, rd_bytes=rd * 4096, rd_time_ns=rd_ns, wr_reqs=10, wr_bytes=40960,
                                  wr_time_ns=1_000_000))
    vm = Vm("web01", "0b1c", "running", 4242, (disk,))
    conn = StorageConnection("ipv4", conn_state, "198.18.0.1", 51234, "198.18.0.2", 3260, 777, 4242, "qemu-system-x86",
                             TcpInfo(rtt_us=400, total_retrans=retrans, snd_cwnd=10, bytes_sent=123456))
    sess = IscsiSession(3, "iqn.2025-01.io.example:db", 1, sess_state, 120, "default", "iqn.1993-08.org.debian:01",
                        "host3", None, None,
                        (IscsiConnection("3:0", "198.18.0.2", 3260, "198.18.0.2", 3260, 40000, "up", 5, 5),),
                        (ScsiDisk("3:0:0:1", 1, "sdb", "8:16", "running"),),
                        {"txdata_octets": 1000, "rxdata_octets": 2000, "timeout_err": 1})
    tcp = HostTcpCounters(tcp={"RetransSegs": 10 + retrans, "OutSegs": 1000 * seq, "CurrEstab": 4}, tcp_ext={"TCPTimeouts": 2})
    data = {
        "host_tcp": tcp,
        "libvirt": Vms((vm,)),
        "storage_tcp": StorageConnections((conn,)),
        "iscsi_kernel": IscsiSessions((sess,)),
        # the libiscsi probe: vda's commands (pid 4242, LUN 1), all but 1 in 50 under 2^20 ns
        "ebpf_libiscsi": LibiscsiData((LibiscsiLatency(4242, 0x5F00, 1, "read", {20: rd, 23: rd // 50}, rd + rd // 50,
                                                       rd * 900_000),), (), {(4242, 0x5F00, 1): 3}, {}),
    }
    if log_events:
        data["storage_log"] = StorageLogEvents(tuple(log_events), 1, len(log_events))
    return Snapshot(seq=seq, timestamp=ts, host="kvm1", duration_seconds=0.01, data=data)


ROOT = Path(__file__).resolve().parents[2]

LOG_EVENT = StorageLogEvent(time=1_790_000_000.5, kind="nop_timeout", message="iSCSI: NOP timeout. Reconnecting...",
                            origin="qemu", path="/var/log/libvirt/qemu/web01.log", offset=1234, file_id="2049:77:0", vm="web01")


def _check_types(fields: dict, mapping: dict[str, str]):
    for name, value in fields.items():
        assert name in mapping, f"{name} is not in the index template"
        kind = mapping[name]
        values = value if isinstance(value, list) else [value]
        for v in values:
            if kind == "long":
                assert isinstance(v, int) and not isinstance(v, bool), (name, v)
            elif kind == "double":
                assert isinstance(v, (int, float)), (name, v)
            elif kind == "ip":
                ipaddress.ip_address(v)
            elif kind in ("keyword", "text", "keyword_noindex", "date"):
                assert isinstance(v, str), (name, v)


def test_every_field_is_mapped_with_its_type():
    a = snap(1, 1_790_000_000.0)
    b = snap(2, 1_790_000_005.0, rd=200, rd_ns=150_000_000, retrans=7, sess_state="FAILED", log_events=[LOG_EVENT])
    docs = documents(b, a, "default")
    seen = set()
    for _id, stream, doc in docs:
        ds = next(d for d in DATASETS.values() if stream == d.stream("default"))
        seen.add(ds.name)
        _check_types(flatten(doc), all_fields(ds))
        assert doc["event"]["id"] == _id
        assert doc["data_stream"]["dataset"] == f"kvmscope.{ds.name}"
    assert seen == {"host", "vm_disk", "connection", "iscsi_session", "events", "storage_log"}


def test_vm_disk_document_joins_path_and_computes_latency():
    a = snap(1, 1_790_000_000.0)
    b = snap(2, 1_790_000_005.0, rd=200, rd_ns=150_000_000)
    vd = [d for _i, s, d in documents(b, a, "ns1") if s == "metrics-kvmscope.vm_disk-ns1"]
    assert len(vd) == 1
    k = vd[0]["kvmscope"]
    assert k["vm"]["name"] == "web01" and k["disk"]["target"] == "vda"
    assert k["portal"] == "198.18.0.2:3260"
    assert k["iscsi"]["target"] == "iqn.2025-01.io.example:web01"
    assert k["disk"]["read_iops"] == 20.0  # 100 reads in 5 s
    assert k["disk"]["read_latency_ms"] == 1.0  # 100 ms over 100 reads
    assert k["connection"] == "198.18.0.1:51234->198.18.0.2:3260"
    # the interval's percentiles from the libiscsi histogram: 100 commands under 2^20 ns, 2 under 2^23 ns
    assert (k["disk"]["latency_source"], k["disk"]["latency_requests"]) == ("libiscsi", 102)
    assert (k["disk"]["latency_p50_ms"], k["disk"]["latency_p99_ms"]) == (1.0486, 8.3886)
    assert k["disk"]["iscsi"] == {"in_flight": 3, "aborts": 0, "reconnects": 0}


def test_state_changes_and_retransmit_bursts_become_events():
    a = snap(1, 1_790_000_000.0)
    b = snap(2, 1_790_000_005.0, retrans=7, sess_state="FAILED", conn_state="CLOSE_WAIT")
    ev = [d for _i, s, d in documents(b, a, "default") if s == "logs-kvmscope.events-default"]
    actions = sorted(e["event"]["action"] for e in ev)
    assert actions == ["iscsi-session-state-change", "retransmit-burst", "tcp-connection-state-change"]
    sess = next(e for e in ev if e["event"]["action"] == "iscsi-session-state-change")
    assert sess["kvmscope"]["change"] == {"from": "LOGGED_IN/up", "to": "FAILED/up"}
    burst = next(e for e in ev if e["event"]["action"] == "retransmit-burst")
    assert burst["kvmscope"]["tcp"]["retrans_delta"] == 4
    assert burst["kvmscope"]["vm"]["name"] == "web01"
    # no events on a steady cycle, none on the first
    assert not [s for _i, s, _d in documents(snap(3, 1_790_000_010.0), snap(2, 1_790_000_005.0), "default") if "events" in s]
    assert not [s for _i, s, _d in documents(a, None, "default") if "events" in s]


def test_ids_are_deterministic_and_log_lines_ignore_the_cycle():
    a = snap(1, 1_790_000_000.0, log_events=[LOG_EVENT])
    first = {i for i, _s, _d in documents(a, None, "default")}
    assert first == {i for i, _s, _d in documents(a, None, "default")}
    later = snap(9, 1_790_000_100.0, log_events=[LOG_EVENT])  # the same line read again in a later cycle
    log_id = [i for i, s, _d in documents(later, None, "default") if "storage_log" in s]
    assert log_id and log_id[0] in first
    assert doc_id("host", "h", 1.0, "x") != doc_id("host", "h", 2.0, "x")


def test_storage_log_event_document():
    a = snap(1, 1_790_000_000.0, log_events=[LOG_EVENT])
    d = next(d for _i, s, d in documents(a, None, "default") if "storage_log" in s)
    assert d["@timestamp"] == "2026-09-21T14:13:20.500Z"
    assert d["event"]["action"] == "nop-timeout" and d["event"]["outcome"] == "failure"
    assert d["kvmscope"]["vm"]["name"] == "web01"
    assert d["log"]["offset"] == 1234


def test_finding_document_is_mapped():
    _id, stream, doc = finding_doc({"rule": "retransmits", "severity": "warning", "summary": "web01/vda slow",
                                    "evidence": "x", "vm": "web01", "disk": "vda", "session": 3}, "kvm1", "default", 1.0)
    assert stream == "logs-kvmscope.findings-default"
    _check_types(flatten(doc), all_fields(DATASETS["findings"]))
    assert doc["event"]["kind"] == "alert"


def test_a_broken_builder_does_not_stop_the_others():
    from agent.shipping.ecs import load_builders

    builders = load_builders()
    assert builders.of(Snapshot.iscsi) is not None
    broken = builders.with_records(Snapshot.iscsi, lambda *a: 1 / 0)
    assert "metrics-kvmscope.iscsi_session-default" in {s for _i, s, _d in documents(snap(1, 1.0), None, "default")}
    streams = {s for _i, s, _d in documents(snap(1, 1.0), None, "default", broken)}
    assert "metrics-kvmscope.host-default" in streams and "metrics-kvmscope.iscsi_session-default" not in streams


def test_templates_cover_every_dataset_with_priority_over_the_stack():
    it = templates.index_templates()
    assert set(it) == {d.stream_prefix for d in DATASETS.values()}
    for name, body in it.items():
        assert body["priority"] > 100 and body["data_stream"] == {}
        assert body["index_patterns"] == [name + "-*"]
    ct = templates.component_templates(with_ilm=False)
    assert ct["kvmscope@settings"]["template"]["settings"] == {}
    assert templates.component_templates(with_ilm=True)["kvmscope@settings"]["template"]["settings"] == {
        "index.lifecycle.name": "kvmscope"}


def test_ebpf_probe_events_become_mapped_events():
    import time as _t

    from agent.records.ebpf import ConnEvent
    from agent.records.ebpf import TcpRetransEvent
    from agent.shipping.docs_ebpf import lifecycle_docs, retrans_docs
    from agent.shipping.ecs import finish

    now = _t.monotonic_ns()
    life = type("L", (), {"events": (ConnEvent(now - 2 * 10**9, "reset", "ESTABLISHED", "CLOSE", "initiator", "ipv4",
                                               "198.18.0.1", 51234, "198.18.0.2", 3260, 4242, "qemu-system-x86",
                                               12.0, 11.5, "received", now - 14 * 10**9),)})()
    rt = type("R", (), {"events": (TcpRetransEvent(now, "retransmit", "ESTABLISHED", "ipv4", "198.18.0.1", 51234,
                                                   "198.18.0.2", 3260, True),
                                   TcpRetransEvent(now, "retransmit", "ESTABLISHED", "ipv4", "10.0.0.1", 22,
                                                   "10.0.0.2", 5555, False))})()
    docs = list(lifecycle_docs(life, None, None, None)) + list(retrans_docs(rt, None, None, None))
    assert [d.fields["event.action"] for d in docs] == ["tcp-reset", "tcp-retransmit"]  # non-storage left out
    assert abs(docs[0].timestamp - (_t.time() - 2)) < 1
    for d in docs:
        _id, stream, doc = finish(d, "kvm1", "default", 0.0)
        assert stream == "logs-kvmscope.events-default"
        _check_types(flatten(doc), all_fields(DATASETS["events"]))


def _edge(seq, ts, n):
    """A VM without uuid or pid, a QMP-style disk (failed requests, idle time), a file disk, a disk without
    counters, and a connection without tcp_info: the fields left out must stay left out."""
    qmp = VmDisk("vda", "network", "iscsi", "iqn.2025-01.io.example:edge/0", (), "iqn.2025-01.io.example:edge", 0,
                 stats=DiskStats(rd_reqs=n, rd_time_ns=n * 700_000, wr_reqs=n // 3, wr_time_ns=n * 100_000,
                                 fl_reqs=1, fl_time_ns=5, failed_reqs=n // 50, idle_time_ns=1_000 * n))
    f = VmDisk("vdb", "file", None, "/var/lib/images/edge.img", host_devno="253:0",
               stats=DiskStats(rd_reqs=n, wr_reqs=n, rd_time_ns=n * 1_000, wr_time_ns=n * 3_000))
    none = VmDisk("vdc", "unknown")
    vms = Vms((Vm("edge", None, "paused", None, (qmp, f, none), manager="qmp"),))
    conns = StorageConnections((StorageConnection("ipv6", "SYN_SENT", "fd00::1", 40000, "fd00::2", 3260, 9, None, None,
                                                  None),))
    return Snapshot(seq=seq, timestamp=ts, host="kvm2", duration_seconds=0.01,
                    data={"qmp": vms, "storage_tcp": conns})


def _nones(obj, where=""):
    if obj is None:
        yield where
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nones(v, f"{where}.{k}")
        if not obj and where:
            yield where + " (empty object)"
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _nones(v, f"{where}[{i}]")


def test_documents_are_byte_for_byte_the_golden_ones(golden):
    """Every builder's documents as the spool stores them, for lab recordings, the snapshots above and the
    edge cases: the builders write nested objects themselves (fast), and must write exactly what the
    dotted field lists of docs/elasticsearch.md nest to (the golden was made from those flat lists)."""
    from agent import __version__
    from agent.codec import load_recording
    from agent.shipping.spool import _BODY

    rec = ROOT / "tests" / "fixtures" / "recordings"
    pairs = [(snap(1, 1_790_000_000.0), snap(2, 1_790_000_005.0, rd=200, rd_ns=150_000_000, retrans=7,
                                              sess_state="FAILED", log_events=[LOG_EVENT])),
             (None, _edge(1, 1_790_000_000.0, 100)), (_edge(1, 1_790_000_000.0, 100), _edge(2, 1_790_000_005.0, 400)),
             (_edge(1, 1_790_000_000.0, 400), _edge(2, 1_790_000_005.0, 100))]  # counters reset: no rates
    for name, last in (("healthy-4vms.json", 2), ("offline-portal1-4vms.json", 3)):
        with open(rec / name) as fp:
            snaps = load_recording(fp)
        pairs += [(snaps[i - 1], snaps[i]) for i in range(len(snaps) - last, len(snaps))]
    lines = []
    for a, b in pairs:
        for _id, stream, doc in documents(b, a, "default"):
            assert not list(_nones(doc)), (stream, list(_nones(doc)))
            lines.append(f"{stream}\t{_id}\t{_BODY.encode(doc)}".replace(
                f'"version":"{__version__}"', '"version":"VERSION"'))
    golden("es-documents.ndjson", "\n".join(lines) + "\n")


def test_builders_may_hand_over_nested_objects():
    """A builder's fields: dotted names, or objects it nested itself; both end in one nested document, an
    object merged into one of the same name (the common event.* too), None values left out."""
    from agent.shipping.ecs import Doc, finish

    d = Doc("vm_disk", "x", {"event.category": ["host"], "kvmscope": {"vm": {"name": "a"}}, "kvmscope.disk.target": "vda",
                             "event": {"type": ["info"]}, "process.pid": None, "kvmscope.vm.uuid": "u"})
    _id, _stream, doc = finish(d, "h", "default", 1.0)
    assert doc["kvmscope"] == {"vm": {"name": "a", "uuid": "u"}, "disk": {"target": "vda"}}
    assert doc["event"] == {"module": "kvmscope", "dataset": "kvmscope.vm_disk", "kind": "metric",
                            "category": ["host"], "type": ["info"], "id": _id}
    assert "process" not in doc


def test_document_ids_from_a_shared_prefix_are_the_plain_ids():
    from agent.shipping.ecs import _doc_id_fast

    for ds, host, ts, subject in (("vm_disk", "kvm1", 1_790_000_000.0, "web01/vda"), ("storage_log", "h", None, "x@1"),
                                  ("vm_disk", "kvm1", 1_790_000_000.0, "wéb/vdb"), ("host", None, 0.0005, "")):
        assert _doc_id_fast(ds, host, ts, subject) == doc_id(ds, host, ts, subject)
        assert _doc_id_fast(ds, host, ts, subject) == doc_id(ds, host, ts, subject)  # from the kept prefix
