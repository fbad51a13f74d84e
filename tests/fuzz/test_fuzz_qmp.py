"""Fuzz the QMP source (agent/sources/qmp_vms.py) with what a hostile or broken
QEMU can say: a fake QMP server on a unix socket answers the source's real
exchange (greeting, qmp_capabilities, query-name/status/uuid, optional
latency-histogram set-up, query-blockstats, query-block) with real answers
whose JSON nodes are replaced, deleted or added, or with random JSON and bytes.

Property: ``QmpSource._query`` (one VM) raises nothing but QmpError (its
documented error: the VM is then listed as failed) and returns a well-typed Vm;
``parse_blockstats`` alone raises nothing but QmpError and returns well-typed disks."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.config import Config
from agent.hostpaths import HostPaths
from agent.records.vms import Vm, VmDisk
from agent.sources import SourceContext
from agent.sources.qmp_vms import QmpError, QmpSource, parse_blockstats
from tests.fixtures.fake_qmp import answer_lines
from tests.fuzz.mutate import JSON, mutated_bytes, mutated_json
from tests.fuzz.typecheck import check

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "Debian 1:7.2"},
                    "capabilities": ["oob"]}}
STATS = {"rd_operations": 10, "rd_bytes": 40960, "rd_total_time_ns": 5000000, "wr_operations": 4, "wr_bytes": 16384,
         "wr_total_time_ns": 2000000, "flush_operations": 1, "flush_total_time_ns": 300, "failed_rd_operations": 2,
         "failed_wr_operations": 0, "failed_flush_operations": 0, "idle_time_ns": 12345,
         "rd_latency_histogram": {"boundaries": [1000, 1000000], "bins": [1, 2, 3]}}
BLOCKSTATS = [{"device": "drive-vda", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend", "stats": STATS},
              {"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend", "node-name": "n1",
               "stats": STATS}]
BLOCK = [{"device": "drive-vda", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
          "inserted": {"file": "iscsi://198.18.1.2:3260/iqn.2025-01.io.kvmscope.lab:vm0-vda/1"}},
         {"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
          "inserted": {"file": "/var/lib/vm.img", "image": {"filename": "/var/lib/vm.img"}}}]
ANSWERS = {
    "qmp_capabilities": {},
    "query-name": {"name": "vm0"},
    "query-status": {"status": "running", "running": True},
    "query-uuid": {"UUID": "6B0A1E44-1111-4A4A-9C9C-000000000001"},
    "block-latency-histogram-set": {},
    "query-blockstats": BLOCKSTATS,
    "query-block": BLOCK,
}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


class FakeQmp:
    """One unix socket; each connection is answered from ``self.script``:
    the greeting bytes, then per command the bytes for that command."""

    def __init__(self, path: Path):
        self.path = path
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen()
        self.script = (line(GREETING), {})
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            with conn:
                greeting, answers = self.script
                answer_lines(conn, greeting, lambda cmd: answers.get(cmd, line({"return": ANSWERS.get(cmd, {})})))


_tmp = tempfile.TemporaryDirectory(prefix="kvmscope-fuzz-qmp-")
SERVER = FakeQmp(Path(_tmp.name) / "vm.qmp")
cfg = Config()
cfg.qmp.sockets = [str(SERVER.path)]
cfg.qmp.timeout = 0.5  # an answer without its newline waits for the deadline: keep it short
cfg.qmp.latency_histograms = True
SOURCE = QmpSource(SourceContext(cfg, HostPaths()))

answer = st.one_of(
    mutated_json([{"return": v} for v in ANSWERS.values()]).map(line),
    st.builds(lambda v: line({"return": v}), JSON),
    st.builds(lambda v: line({"error": v}), JSON),
    st.just(line({"event": "BLOCK_IO_ERROR", "data": {}}) + line({"return": {}})),
    mutated_bytes([line({"return": v}) for v in ANSWERS.values()]),
)


@given(st.one_of(st.just(line(GREETING)), mutated_json([GREETING]).map(line), mutated_bytes([line(GREETING)])),
       st.dictionaries(st.sampled_from(sorted(ANSWERS)), answer, max_size=4))
def test_query_one_vm(greeting, answers):
    SERVER.script = (greeting, answers)
    SOURCE._hist_done.clear()  # every example sets the histograms up again
    try:
        vm, bad = SOURCE._query(str(SERVER.path))[:2]
    except QmpError:
        return
    check(vm, Vm)
    assert isinstance(bad, list)


@given(mutated_json([BLOCKSTATS]) | JSON, mutated_json([BLOCK]) | JSON)
def test_parse_blockstats(blockstats, block):
    bad: list = []
    try:
        disks = parse_blockstats(blockstats, block, bad)
    except QmpError:
        return
    check(disks, list[VmDisk])


def test_the_fake_server_speaks_qmp():
    SERVER.script = (line(GREETING), {})
    vm, bad = SOURCE._query(str(SERVER.path))[:2]
    assert vm.name == "vm0" and vm.uuid == "6b0a1e44-1111-4a4a-9c9c-000000000001" and bad == []
    assert [d.target for d in vm.disks] == ["drive-vda", "device[0]"] and vm.disks[0].stats.rd_reqs == 10
