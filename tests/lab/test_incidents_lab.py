"""A flap of a few seconds on the real lab -> exactly one incident, with start, end, duration and the
stalled VM, read from the running agent (its local API and /metrics) and from Elasticsearch (the two
documents of the incident), against the down period the lab itself recorded (`lab status --json`).

Costs about 23 s on top of the session's lab and Elasticsearch node (the agent starts without eBPF
probes: the outage is seen in tcp_info and the VMs' block stats). Measured: flap applied 4.07 s,
incident 6.72 s (start 0.09 s before the lab's, end 2.56 s after: TCP's next retransmission), stall 6.45 s.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import free_port, wait_for

pytestmark = [pytest.mark.lab]

EBPF = ["ebpf_block_io", "ebpf_libiscsi", "ebpf_tcp_lifecycle", "ebpf_tcp_retrans"]


def api(sock, path):
    """The agent's local API, through the client the CLI uses (a non-200 answer raises NotAttached)."""
    from agent.api import _get

    return json.loads(_get(str(sock), path, 10)[0])


def test_a_flap_is_one_incident_with_start_end_and_the_stalled_vm(lab, es_node, tmp_path):
    on2 = [n for n in lab.vm_names if lab.vm_portal(n) == 2]
    on1 = [n for n in lab.vm_names if lab.vm_portal(n) == 1]
    ns = "inc" + str(os.getpid())
    port = free_port()
    sock = tmp_path / "api.sock"
    cfg = {
        "agent": {"interval": 1, "collectors": {"disable": EBPF}},
        "metrics": {"listen": f"127.0.0.1:{port}"},
        "api": {"socket": str(sock)},
        "diagnose": {"window_seconds": 20},
        "elasticsearch": {"enabled": True, "hosts": [es_node.url], "namespace": ns,
                          "spool_dir": str(tmp_path / "spool")},
        "storage_log": {"state_dir": str(tmp_path / "positions")},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    log = open(tmp_path / "agent.log", "w")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(tmp_path / "config.yaml"), "run"],
                             env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: sock.exists() and (api(sock, "/api/v1/findings")["seq"] or 0) >= 6, 90,
                 "six cycles of the agent's live diagnosis")
        # an earlier test's fault may still be settling: only the incidents that start with the flap count
        before = {i["id"] for i in api(sock, "/api/v1/incidents")["incidents"]}
        t0 = time.time()
        lab.run("flap", "--portal", 2, "--down", 4)
        period = [p for p in lab.status_json(0.5)["faults"]["flaps"]["periods"] if p["start"] >= t0 - 1][-1]

        def new_incidents():
            incs = api(sock, f"/api/v1/incidents?seconds={time.time() - t0 + 30:.0f}")["incidents"]
            return [i for i in incs if i["id"] not in before and i["start"] >= t0 - 5]

        wait_for(lambda: [i for i in new_incidents() if i["state"] == "resolved"], 40, "the flap's incident, resolved")
        time.sleep(3)  # a second incident (a loss or slow-target finding after it) would show by now
        incidents = new_incidents()
        assert len(incidents) == 1, json.dumps(incidents, indent=1)
        (inc,) = incidents
        assert inc["key"] == "path_down:portal:198.18.2.2:3260" and inc["state"] == "resolved"
        # stop: the last ACK before the silence; end: the host sees the path back at the first
        # retransmission after the lab's end, up to one RTO later (backoff 4-5: 3.2-6.4 s)
        assert abs(inc["start"] - period["start"]) < 1.0, (inc, period)
        assert period["end"] - 0.5 <= inc["end"] <= period["end"] + 7.0, (inc, period)
        assert abs(inc["duration_seconds"] - (inc["end"] - inc["start"])) < 0.01
        assert inc["stalled_vms"] == on2 and not set(on1) & set(inc["vms"]), inc
        assert all(d["stalled_s"] >= 0.8 * period["seconds"] for d in inc["disks"].values()), inc
        print(f"\nflap applied {period['seconds']:.2f} s, incident {inc['duration_seconds']:.2f} s "
              f"(start {inc['start'] - period['start']:+.3f} s, end {inc['end'] - period['end']:+.3f} s "
              f"from the lab's), stall {max(d['stalled_s'] for d in inc['disks'].values()):.2f} s",
              file=sys.stderr)

        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        resolved_total = float(next(ln.split()[1] for ln in text.splitlines()
                                    if ln.startswith("kvmscope_incidents_resolved_total ")))
        assert resolved_total >= 1 and 'cause="path_down:portal:198.18.2.2:3260"' not in text  # not open any more

        def docs():
            c = es_node.client()
            c.indices.refresh(index=f"logs-kvmscope.incidents-{ns}", ignore_unavailable=True)
            r = c.search(index=f"logs-kvmscope.incidents-{ns}", query={"term": {"kvmscope.incident.id": inc["id"]}},
                         ignore_unavailable=True, allow_no_indices=True)
            return [h["_source"] for h in r["hits"]["hits"]]

        wait_for(lambda: len(docs()) == 2, 60, "the incident's two documents in Elasticsearch")
        by_action = {d["event"]["action"]: d for d in docs()}
        done = by_action["incident-resolved"]
        assert set(by_action) == {"incident-opened", "incident-resolved"}
        assert done["event"]["duration"] == int(round(inc["duration_seconds"] * 1e9))
        assert done["kvmscope"]["incident"]["stalled_vms"] == on2
        assert "end" not in by_action["incident-opened"]["event"]  # opened: no end yet
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        log.close()
