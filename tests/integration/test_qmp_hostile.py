"""A hostile QEMU cannot blind the host: a stand-alone QMP server socket (our own,
speaking the QMP protocol) answers query-blockstats with values of the wrong type
or out of range, next to a well-behaved one. The agent loop collects both, a real
/metrics page is served over loopback, and the ES documents are built: the good
VM's series and documents are all there, the bad samples are left out and counted."""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from agent.config import Config
from agent.exporters.server import MetricsServer
from agent.hostpaths import HostPaths
from agent.loop import Agent
from agent.shipping.ecs import documents
from agent.sources import SourceContext
from agent.sources.qmp_vms import QmpSource, parse_blockstats
from tests.fixtures.fake_qmp import answer_lines

GOOD_STATS = {"rd_operations": 10, "rd_bytes": 40960, "rd_total_time_ns": 5_000_000, "wr_operations": 4,
              "wr_bytes": 16384, "wr_total_time_ns": 2_000_000, "flush_operations": 1, "flush_total_time_ns": 300,
              "failed_rd_operations": 0, "idle_time_ns": 12345}


class FakeQmp:
    """A QMP server on a unix socket: greeting, qmp_capabilities, then canned answers per command."""

    def __init__(self, path: Path, answers: dict):
        self.path, self.answers = path, answers
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        self.srv.settimeout(0.2)
        while not self.stop.is_set():
            try:
                c, _ = self.srv.accept()
            except OSError:
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            answer_lines(c, b'{"QMP": {"version": {}, "capabilities": []}}\n', self._reply)

    def _reply(self, cmd: str) -> bytes:
        if cmd == "qmp_capabilities":
            reply = '{"return": {}}'
        elif cmd in self.answers:
            reply = '{"return": ' + self.answers[cmd] + "}"  # raw JSON text: 10**400 is a literal
        else:
            reply = json.dumps({"error": {"class": "CommandNotFound", "desc": cmd}})
        return reply.encode() + b"\n"

    def close(self):
        self.stop.set()
        self.t.join(2)
        self.srv.close()


def answers(name: str, stats_json: str, device: str = '"drive0"') -> dict:
    block = f'[{{"device": {device}, "qdev": "/machine/peripheral/disk0/virtio-backend", "inserted": {{"file": "/nonexistent/{name}.img"}}}}]'
    return {
        "query-name": json.dumps({"name": name}),
        "query-status": '{"status": "running"}',
        "query-uuid": '{"UUID": "6b0a1e44-1111-4a4a-9c9c-00000000000%d"}' % (1 if name == "good" else 2),
        "query-block": block,
        "query-blockstats": f'[{{"device": {device}, "qdev": "/machine/peripheral/disk0/virtio-backend", "stats": {stats_json}}}]',
    }


HOSTILE = [
    ("string", '{"rd_operations": "x", "rd_bytes": 1, "wr_operations": 2}'),
    ("huge", '{"rd_operations": 1, "rd_bytes": 1' + "0" * 400 + ', "wr_operations": 2}'),
    ("float", '{"rd_operations": 1.5, "rd_bytes": 1, "wr_operations": 2}'),
    ("negative", '{"rd_operations": -3, "rd_bytes": 1, "wr_operations": 2}'),
    ("nan", '{"rd_operations": NaN, "rd_bytes": Infinity, "wr_operations": 2}'),
    ("bool", '{"rd_operations": true, "rd_bytes": 1, "wr_operations": 2}'),
    ("object", '{"rd_operations": {"a": 1}, "rd_bytes": [1], "wr_operations": 2, "idle_time_ns": "soon"}'),
]


@pytest.mark.parametrize("kind,stats", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_blockstats_never_fail_the_page(tmp_path, kind, stats):
    good = FakeQmp(tmp_path / "a-good.qmp", answers("good", json.dumps(GOOD_STATS)))
    bad = FakeQmp(tmp_path / "b-bad.qmp", answers("bad", stats))
    cfg = Config()
    cfg.qmp.sockets = [str(tmp_path / "*.qmp")]
    cfg.qmp.timeout = 2.0
    src = QmpSource(SourceContext(cfg, HostPaths()))
    agent = Agent([src], interval=1.0, timeout=4.0, hostname="h")
    server = MetricsServer("127.0.0.1", 0, lambda: agent.latest).start()
    try:
        snap = agent.collect_once()
        assert snap.health["qmp"].success, snap.health["qmp"]
        vms = {v.name: v for v in snap.data["qmp"].vms}
        assert set(vms) == {"good", "bad"}
        assert vms["bad"].disks[0].stats is None and "invalid values from QMP left out: drive0 " in vms["bad"].error
        assert vms["good"].disks[0].stats.rd_bytes == 40960 and vms["good"].error is None

        url = f"http://127.0.0.1:{server.address[1]}/metrics"
        for _ in range(2):  # every scrape, not only the first
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200
                text = r.read().decode()
        assert 'kvmscope_vm_disk_bytes_total{disk="drive0",op="read",vm="good"} 40960.0' in text
        assert 'kvmscope_vm_disk_requests_total{disk="drive0",op="read",vm="bad"}' not in text
        assert 'kvmscope_vm_running{manager="qmp",vm="bad"} 1.0' in text  # the VM itself is still seen
        assert 'kvmscope_vm_stats_success{manager="qmp",vm="bad"} 0.0' in text
        dropped = [ln for ln in text.splitlines()
                   if ln.startswith('kvmscope_collector_dropped_samples_total{collector="qmp",reason="invalid_value"}')]
        assert dropped and float(dropped[0].rsplit(" ", 1)[1]) >= 1, text

        docs = documents(snap, None, "default")
        disks = {d["kvmscope"]["vm"]["name"]: d for _, _, d in docs if d.get("data_stream", {}).get("dataset") == "kvmscope.vm_disk"}
        assert set(disks) == {"good", "bad"}
        assert disks["good"]["kvmscope"]["disk"]["stats"]["rd_bytes"] == 40960
        assert "stats" not in disks["bad"]["kvmscope"]["disk"]
        json.dumps([d for _, _, d in docs], allow_nan=False)  # what the bulk body needs

        # the count is cumulative: a second cycle adds the same bad values again
        first = snap.health["qmp"].dropped["invalid_value"]
        snap2 = agent.collect_once()
        assert snap2.health["qmp"].dropped["invalid_value"] == 2 * first
        # documents with rates against the previous cycle: still one per disk
        docs = [d for _, _, d in documents(snap2, snap, "default") if d["data_stream"]["dataset"] == "kvmscope.vm_disk"]
        assert sorted(d["kvmscope"]["vm"]["name"] for d in docs) == ["bad", "good"]
        json.dumps(docs, allow_nan=False)
    finally:
        server.stop()
        src.close()
        good.close()
        bad.close()


def test_hostile_names_and_shapes(tmp_path):
    """Wrong-shaped answers (a name that is not a string, blockstats that is not a list) cost that VM only."""
    a = answers("x", json.dumps(GOOD_STATS))
    a["query-name"] = '{"name": {"evil": 1}}'
    a["query-uuid"] = '{"UUID": 42}'
    a["query-status"] = '{"status": ["running"]}'
    odd = FakeQmp(tmp_path / "odd.qmp", a)
    b = answers("shape", json.dumps(GOOD_STATS))
    b["query-blockstats"] = '{"not": "a list"}'
    shape = FakeQmp(tmp_path / "shape.qmp", b)
    c = answers("dev", json.dumps(GOOD_STATS), device="7")
    dev = FakeQmp(tmp_path / "dev.qmp", c)
    good = FakeQmp(tmp_path / "zgood.qmp", answers("good", json.dumps(GOOD_STATS)))
    cfg = Config()
    cfg.qmp.sockets = [str(tmp_path / "*.qmp")]
    src = QmpSource(SourceContext(cfg, HostPaths()))
    agent = Agent([src], hostname="h")
    server = MetricsServer("127.0.0.1", 0, lambda: agent.latest).start()
    try:
        snap = agent.collect_once()
        vms = {v.name: v for v in snap.data["qmp"].vms}
        assert vms["good"].disks[0].stats.rd_bytes == 40960
        assert all(isinstance(v.name, str) and (v.uuid is None or isinstance(v.uuid, str))
                   and isinstance(v.state, str) for v in vms.values())
        assert all(isinstance(d.target, str) for v in vms.values() for d in v.disks)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'kvmscope_vm_disk_bytes_total{disk="drive0",op="read",vm="good"} 40960.0' in text
    finally:
        server.stop()
        src.close()
        for s in (odd, shape, dev, good):
            s.close()


def test_parse_blockstats_counts_what_it_drops():
    stats = dict(GOOD_STATS, rd_bytes="x", wr_bytes=10**400)
    block = [{"device": "d0", "inserted": {"file": "/x"}}]
    bad = []
    (d,) = parse_blockstats([{"device": "d0", "stats": stats}], block, bad)
    assert d.stats is None
    assert sorted(f for f, _ in bad) == ["d0 rd_bytes", "d0 wr_bytes"]
    # a histogram of the wrong shape is dropped alone; the counters stay
    stats = dict(GOOD_STATS, rd_latency_histogram={"boundaries": [10, "y"], "bins": [1, 2, 3]},
                 wr_latency_histogram={"boundaries": [10], "bins": [1, 2]})
    bad = []
    (d,) = parse_blockstats([{"device": "d0", "stats": stats}], block, bad)
    assert d.stats.rd_bytes == 40960 and set(d.stats.histograms) == {"wr"}
    assert [f for f, _ in bad] == ["d0 rd_latency_histogram"]


def test_iscsi_url_with_odd_lun_is_named():
    block = [{"device": "d0", "inserted": {"file": "iscsi://198.18.1.2:3260/iqn.2025-01.io.kvmscope:t/²"}}]
    bad = []
    (d,) = parse_blockstats([{"device": "d0", "stats": GOOD_STATS}], block, bad)
    assert (d.iqn, d.lun, d.stats.rd_bytes) == ("iqn.2025-01.io.kvmscope:t", None, 40960)
    assert [w for w, _ in bad] == ["d0 iscsi URL"]


def test_state_of_vanished_sockets_is_forgotten(tmp_path):
    """Per-socket state (histogram set-up, finished queries) is dropped with the socket: QEMU churn
    does not grow the source's memory."""
    cfg = Config()
    cfg.qmp.sockets = [str(tmp_path / "*.qmp")]
    cfg.qmp.latency_histograms = True
    src = QmpSource(SourceContext(cfg, HostPaths()))
    servers = []
    try:
        for i in range(5):
            a = answers(f"vm{i}", json.dumps(GOOD_STATS))
            a["block-latency-histogram-set"] = "{}"
            servers.append(FakeQmp(tmp_path / f"vm{i}.qmp", a))
        assert len(src.collect().vms) == 5
        assert len(src._hist_done) == 5 and len(src._busy) == 5
        for s in servers[1:]:
            s.close()
            s.path.unlink()
        assert [v.name for v in src.collect().vms] == ["vm0"]
        assert len(src._hist_done) == 1 and set(src._busy) == {str(tmp_path / "vm0.qmp")}
        assert src.dropped["expired"] == 8
    finally:
        src.close()
        servers[0].close()
