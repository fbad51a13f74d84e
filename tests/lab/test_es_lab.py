"""The agent on the lab ships to a real Elasticsearch: documents searchable by VM, disk and
portal; a portal going offline makes QEMU log libiscsi reconnects, which arrive once each,
also across an agent restart."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.es.conftest import free_port, wait_for  # es_node: tests/lab/conftest.py

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def start_agent(cfg_path, log):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(cfg_path), "run"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def stop_agent(p):
    p.send_signal(signal.SIGTERM)
    p.wait(60)


def search(node, index, query, size=1000):
    c = node.client()
    c.indices.refresh(index=index, allow_no_indices=True, ignore_unavailable=True)
    r = c.search(index=index, query=query, size=size, allow_no_indices=True, ignore_unavailable=True)
    return [h["_source"] for h in r["hits"]["hits"]]


def test_lab_documents_and_reconnect_lines(lab, es_node, tmp_path):
    ns = "lab" + str(os.getpid())
    vm1 = next(n for n in lab.vm_names if lab.vm_portal(n) == 2)
    cfg = {
        "agent": {"interval": 1, "collectors": {"disable": ["ebpf_block_io", "ebpf_tcp_lifecycle"]}},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "api": {"socket": str(tmp_path / "api.sock")},  # not /run/kvmscope's
        "elasticsearch": {"enabled": True, "hosts": [es_node.url], "namespace": ns,
                          "spool_dir": str(tmp_path / "spool")},
        "storage_log": {"qemu_logs": ["/var/log/libvirt/qemu/kvmslab-*.log"], "kernel_logs": [],
                        "state_dir": str(tmp_path / "positions"), "start_at_end": True},
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "agent.log", "w")
    qlog = f"/var/log/libvirt/qemu/{vm1}.log"
    start_offset = os.path.getsize(qlog)  # start_at_end: lines already there are not shipped
    p = start_agent(cfg_path, log)
    try:
        # 1. searchable by VM, disk and portal
        def disks():
            return search(es_node, f"metrics-kvmscope.vm_disk-{ns}",
                          {"bool": {"filter": [{"term": {"kvmscope.vm.name": vm1}},
                                               {"term": {"kvmscope.disk.target": "vda"}},
                                               {"term": {"kvmscope.portal": "198.18.2.2:3260"}}]}})
        wait_for(lambda: len(disks()) >= 2, 60, "vm_disk documents for the VM on portal 2")
        d = disks()[-1]
        assert d["kvmscope"]["disk"]["backend"] == "libiscsi"
        conns = search(es_node, f"metrics-kvmscope.connection-{ns}",
                       {"term": {"destination.ip": "198.18.2.2"}})
        assert conns and all(c["destination"]["port"] == 3260 for c in conns)

        # 2. portal 2 goes silent: libiscsi logs NOP timeouts and reconnects
        lab.run("target-offline", "--portal", 2)
        wait_for(lambda: "NOP timeout" in _tail(qlog, start_offset), 120, f"'NOP timeout' in {qlog}")
        time.sleep(3)
        stop_agent(p)  # restart in the middle of it: positions must carry over
        p = start_agent(cfg_path, log)
        time.sleep(8)
        lab.run("target-online", "--portal", 2)
        time.sleep(8)
    finally:
        stop_agent(p)
        log.close()
        lab.run("target-online", "--portal", 2, check=False)

    written = [ln for ln in _tail(qlog, start_offset).splitlines() if "NOP" in ln]
    events = search(es_node, f"logs-kvmscope.storage_log-{ns}", {"term": {"kvmscope.vm.name": vm1}})
    nop = [e for e in events if "NOP" in e["message"]]
    offsets = [e["log"]["offset"] for e in nop]
    assert len(offsets) == len(set(offsets)), "a line was shipped twice"
    assert all(o >= start_offset for o in offsets)
    assert written and len(nop) == len(written), (len(nop), written)
    print(json.dumps({"nop_lines": len(written), "shipped": len(nop)}), file=sys.stderr)


def _tail(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")
