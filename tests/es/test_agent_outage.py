"""`kvmscope run` as a real process against a real Elasticsearch: a 60 s outage and a kill -9.

Truth for "every document": the agent's own JSON-lines file output, written
right after the spool for the same documents (same ``event.id``), plus the
QEMU log lines a writer thread appends while the agent runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from tests.es.conftest import ROOT, free_port, wait_for

KVMSCOPE_CMD = [sys.executable, "-m", "agent"]  # the interpreter running the tests has kvmscope installed


class QemuLogWriter(threading.Thread):
    """Appends libiscsi lines in QEMU's -msg timestamp=on format, like a VM whose path flaps."""

    def __init__(self, path: Path, every: float = 0.3):
        super().__init__(daemon=True)
        self.path, self.every, self.stop = path, every, threading.Event()
        self.written = 0

    def run(self):
        with open(self.path, "a", buffering=1) as f:
            while not self.stop.is_set():
                ts = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                f.write(f"{ts} qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
                self.written += 1
                self.stop.wait(self.every)


class Agent:
    def __init__(self, tmp_path: Path, es_url: str, namespace: str):
        from agent.sources import load_registry

        self.tmp = tmp_path
        self.port = free_port()
        keep = {"host_tcp", "storage_log"}
        (tmp_path / "qemu").mkdir(exist_ok=True)
        self.cfg = tmp_path / "kvmscope.yaml"
        self.cfg.write_text(yaml.safe_dump({
            "agent": {"interval": 0.5, "collectors": {"disable": sorted(set(load_registry()) - keep)}},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            "api": {"socket": str(tmp_path / "api.sock")},  # not /run/kvmscope's
            "elasticsearch": {"enabled": True, "hosts": [es_url], "namespace": namespace,
                              "spool_dir": str(tmp_path / "spool"), "retry_initial": 0.2, "retry_max": 1.0,
                              "request_timeout": 5, "stop_timeout": 3},
            "file_output": {"enabled": True, "path": str(tmp_path / "out" / "docs.ndjson"), "max_bytes": 256 * 1024,
                            "keep": 100},
            # QEMU lines only (counted below): not this host's kernel ring, where other tests' iSCSI messages land
            "storage_log": {"qemu_logs": [str(tmp_path / "qemu" / "*.log")], "kernel_logs": [],
                            "kernel_source": "files", "state_dir": str(tmp_path / "storage_log")},
        }))
        self.proc = None

    def start(self):
        self.console = open(self.tmp / "console.log", "ab")
        self.proc = subprocess.Popen([*KVMSCOPE_CMD, "--config", str(self.cfg), "run"], stdout=self.console,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: self.metrics() is not None, 30, "the agent's /metrics")

    def metrics(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        out = {}
        for line in text.splitlines():
            if line.startswith("kvmscope_shipping_"):
                name, _, v = line.rpartition(" ")
                out[name.removeprefix("kvmscope_shipping_")] = float(v)
        return out or None

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> float:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        return time.monotonic() - t0

    def file_ids(self) -> list[str]:
        ids = []
        for p in sorted((self.tmp / "out").glob("docs.ndjson*")):
            for line in p.read_text().splitlines():
                ids.append(json.loads(line)["event"]["id"])
        return ids

    def drained(self):
        m = self.metrics()
        return m is not None and m.get("queued_documents") == 0 and m.get("up") == 1


@pytest.mark.slow
def test_es_stopped_for_60s_while_the_agent_runs_every_document_arrives_once(es_node, namespace, tmp_path):
    a = Agent(tmp_path, es_node.url, namespace)
    a.start()
    writer = QemuLogWriter(tmp_path / "qemu" / "web01.log")
    try:
        wait_for(lambda: (a.metrics() or {}).get("shipped_documents_total", 0) > 0, 30, "first documents shipped")
        writer.start()
        es_node.stop()
        t_down = time.monotonic()
        wait_for(lambda: (a.metrics() or {}).get("up") == 0, 20, "the agent to notice the outage")
        time.sleep(max(0.0, 60 - (time.monotonic() - t_down)))
        m = a.metrics()
        assert m["queued_documents"] > 100, m  # produced during the outage, waiting in the spool
        assert m["oldest_queued_age_seconds"] >= 55
        restart = es_node.start()
        outage = time.monotonic() - t_down
        wait_for(a.drained, 120, "the spool to drain after the outage")
        writer.stop.set()
        writer.join()
        time.sleep(1.5)  # the last lines read and shipped
        wait_for(a.drained, 30, "the last documents")
        took = a.terminate()
    finally:
        writer.stop.set()
        if a.proc and a.proc.poll() is None:
            a.proc.kill()
    assert outage >= 60
    assert took < 3 + 5 + 2, f"SIGTERM took {took:.1f}s"
    produced = a.file_ids()
    in_es = es_node.ids(namespace)
    assert len(produced) == len(set(produced))
    assert set(in_es) == set(produced), "lost or extra documents"
    assert set(in_es.values()) == {1}, "a document arrived twice"
    c = es_node.client()
    n_lines = c.count(index=f"logs-kvmscope.storage_log-{namespace}")["count"]
    assert n_lines == writer.written, (n_lines, writer.written)
    print(f"\noutage {outage:.1f}s (ES restart {restart:.1f}s); {len(produced)} documents, "
          f"{writer.written} QEMU lines, each once in Elasticsearch")


def test_kill_9_during_an_outage_loses_and_doubles_nothing(es_node, proxy, namespace, tmp_path):
    a = Agent(tmp_path, proxy.url, namespace)
    a.start()
    writer = QemuLogWriter(tmp_path / "qemu" / "web02.log", every=0.2)
    try:
        wait_for(lambda: (a.metrics() or {}).get("shipped_documents_total", 0) > 0, 30, "first documents shipped")
        writer.start()
        proxy.down()
        time.sleep(3)
        assert a.metrics()["queued_documents"] > 0
        a.kill9()
        time.sleep(1)  # lines keep coming while no agent runs
        a.start()
        time.sleep(3)
        proxy.up()
        wait_for(a.drained, 60, "the spool to drain")
        writer.stop.set()
        writer.join()
        time.sleep(1.5)
        wait_for(a.drained, 30, "the last documents")
        a.terminate()
    finally:
        writer.stop.set()
        if a.proc and a.proc.poll() is None:
            a.proc.kill()
    produced = set(a.file_ids())
    in_es = es_node.ids(namespace)
    assert set(in_es.values()) == {1}, "a document arrived twice"
    assert produced <= set(in_es), f"{len(produced - set(in_es))} documents lost"
    # kill -9 can land between the spool append and the file write: at most one cycle's documents
    assert len(set(in_es) - produced) <= 4
    n_lines = es_node.client().count(index=f"logs-kvmscope.storage_log-{namespace}")["count"]
    assert n_lines == writer.written, (n_lines, writer.written)
