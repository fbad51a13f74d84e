"""`kvmscope fleet` against a real Prometheus holding data from two real agents.

Host A is this machine: the lab's VMs (QEMU libiscsi) reach the portals
198.18.1.2 and 198.18.2.2 over the lab's veths, and `kvmscope run` scrapes
them. Host B is a network namespace made here (kvmsfleet-b): a veth to the
lab's storage namespace (kvmslab-stor) reaching the same portal addresses
through a route, one libiscsi initiator per portal (`iscsi-perf`, two requests
in flight) on a LUN of its own in the lab's tgtd, and a second `kvmscope run`
inside the namespace; a second veth to the host (198.18.20.0/24) lets the
Prometheus on this machine scrape it. inet_diag is per network namespace, so
each agent sees only its own host's connections. The eBPF collectors are off
in both agents: tracepoints fire for every namespace and would mix the hosts.

Prometheus (Debian, 127.0.0.1, 2 s scrape) uses the example file_sd
relabeling of deploy/prometheus/prometheus.yml, so the hosts are named
127.0.0.1 (A) and 198.18.20.2 (B). Host B listens beyond loopback, which the
agent allows only with TLS and authentication: both agents serve HTTPS with
basic auth (a CA, a server certificate and a bcrypt hash made here), and
Prometheus scrapes them as the example job does (https, CA, basic_auth). Three phases, each judged by the real CLI
(`kvmscope fleet --window 20s --json`) once the window holds only that phase:

1. clean: every path clean, exit 0;
2. 5% loss to portal 1 from both hosts (`lab loss 5 --portal 1` for A, the same
   rules on B's link): portal 1 portal-wide (bad from both hosts), portal 2 ok,
   no host-local finding, exit 3;
3. 5% loss on host B's link only, both portals: both portals host-local, host B
   host-local with every portal bad (its NIC), host A clean, exit 3.

Loss is dropped on the receiving side (INPUT of the storage namespace for
host -> target, INPUT of host B for target -> host), as the lab does.
Everything made here (namespace, veths, iptables chain, tgtd target, files,
processes) is removed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from tests.conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.lab

ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
SCRAPE = 2
WINDOW = 20
STOR_NS = "kvmslab-stor"
NS = "kvmsfleet-b"
HOST_IF, NS_HOST_IF = "kvmsfl-h", "kvmsfl-b0"   # host <-> B (scraping): 198.18.20.1 <-> .2
STOR_IF, NS_STOR_IF = "kvmsfl-s", "kvmsfl-b1"   # kvmslab-stor <-> B (iSCSI): 198.18.21.1 <-> .2
B_ADDR, STOR_GW = "198.18.20.2", "198.18.21.1"
PORTAL1, PORTAL2 = "198.18.1.2", "198.18.2.2"
HOST_A, HOST_B = "127.0.0.1", B_ADDR
CHAIN = "KVMSFLEET"
TGT = ["tgtadm", "-C", "42", "--lld", "iscsi"]
TID = 90
IQN = "iqn.2025-01.io.kvmscope.lab:fleet-b"
EBPF_OFF = ["ebpf_tcp_retrans", "ebpf_tcp_lifecycle", "ebpf_block_io", "ebpf_libiscsi"]
EXAMPLE = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def sh(*cmd, check=True, ns=None):
    full = (["ip", "netns", "exec", ns] if ns else []) + [str(c) for c in cmd]
    p = subprocess.run(full, capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(full)} failed rc={p.returncode}: {p.stderr.strip()}")
    return p




def prom_query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def make_web_config(tmp) -> dict:
    """A CA, a server certificate for both agents' addresses, a bcrypt password: the agents' web
    config and the Prometheus job's https + basic_auth settings."""
    import bcrypt

    d = tmp / "pki"
    d.mkdir()

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    (d / "san.ext").write_text(f"subjectAltName=IP:127.0.0.1,IP:{B_ADDR}\n")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", "/CN=kvmscope fleet test CA", "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=agent",
            "-keyout", "server.key", "-out", "server.csr")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.ext", "-out", "server.crt")
    password = os.urandom(12).hex()
    (d / "password").write_text(password)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()
    (d / "web.yml").write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
        "basic_auth_users": {"prometheus": hashed}}))
    return {"web_config": str(d / "web.yml"),
            "scrape": {"scheme": "https", "tls_config": {"ca_file": str(d / "ca.crt")},
                       "basic_auth": {"username": "prometheus", "password_file": str(d / "password")}}}


def build_host_b(tmp):
    """Namespace B with its two veths and routes to the portals through the storage namespace."""
    sh("ip", "netns", "add", NS)
    sh("ip", "-n", NS, "link", "set", "lo", "up")
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_HOST_IF)
    sh("ip", "link", "set", NS_HOST_IF, "netns", NS)
    sh("ip", "addr", "add", "198.18.20.1/24", "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    sh("ip", "-n", NS, "addr", "add", f"{B_ADDR}/24", "dev", NS_HOST_IF)
    sh("ip", "-n", NS, "link", "set", NS_HOST_IF, "up")
    sh("ip", "-n", STOR_NS, "link", "add", STOR_IF, "type", "veth", "peer", "name", NS_STOR_IF)
    sh("ip", "-n", STOR_NS, "link", "set", NS_STOR_IF, "netns", NS)
    sh("ip", "-n", STOR_NS, "addr", "add", f"{STOR_GW}/24", "dev", STOR_IF)
    sh("ip", "-n", STOR_NS, "link", "set", STOR_IF, "up")
    sh("ip", "-n", NS, "addr", "add", "198.18.21.2/24", "dev", NS_STOR_IF)
    sh("ip", "-n", NS, "link", "set", NS_STOR_IF, "up")
    for net in ("198.18.1.0/24", "198.18.2.0/24"):
        sh("ip", "-n", NS, "route", "add", net, "via", STOR_GW)
    # host B is a small initiator: cap what the target sends it (no drops: two 4 KiB requests in
    # flight per portal never fill the queue) so that it does not take a CPU from the lab's VMs
    sh("tc", "qdisc", "add", "dev", STOR_IF, "root", "tbf", "rate", "8mbit", "burst", "32kb",
       "limit", "4mb", ns=STOR_NS)
    # a LUN of its own in the lab's tgtd, reachable on both portals
    lun = tmp / "fleet-b.img"
    with open(lun, "wb") as f:
        f.truncate(32 * 2**20)
    have = sh(*TGT, "--op", "show", "--mode", "target").stdout
    assert f"Target {TID}:" not in have, f"tgtd target {TID} already exists:\n{have}"
    sh(*TGT, "--op", "new", "--mode", "target", "--tid", TID, "-T", IQN)
    sh(*TGT, "--op", "new", "--mode", "logicalunit", "--tid", TID, "--lun", 1, "-b", lun)
    sh(*TGT, "--op", "bind", "--mode", "target", "--tid", TID, "--initiator-address", "ALL")
    # the fault chain, jumped to first from INPUT, in the storage namespace and in B
    for ns in (STOR_NS, NS):
        sh("iptables", "-w", "-N", CHAIN, ns=ns)
        sh("iptables", "-w", "-I", "INPUT", "1", "-j", CHAIN, ns=ns)


def teardown_host_b(errors):
    def attempt(*cmd, ns=None):
        p = sh(*cmd, check=False, ns=ns)
        if p.returncode != 0 and "No such" not in p.stderr and "does not exist" not in p.stderr \
                and "Cannot find" not in p.stderr and "can't find" not in p.stderr.lower():
            errors.append(f"{' '.join(map(str, cmd))}: {p.stderr.strip()}")

    if os.path.exists(f"/run/netns/{STOR_NS}"):
        while sh("iptables", "-w", "-C", "INPUT", "-j", CHAIN, check=False, ns=STOR_NS).returncode == 0:
            attempt("iptables", "-w", "-D", "INPUT", "-j", CHAIN, ns=STOR_NS)
        if sh("iptables", "-w", "-S", CHAIN, check=False, ns=STOR_NS).returncode == 0:
            attempt("iptables", "-w", "-F", CHAIN, ns=STOR_NS)
            attempt("iptables", "-w", "-X", CHAIN, ns=STOR_NS)
        if sh("ip", "-n", STOR_NS, "link", "show", STOR_IF, check=False).returncode == 0:
            attempt("ip", "-n", STOR_NS, "link", "del", STOR_IF)
    if f"Target {TID}:" in sh(*TGT, "--op", "show", "--mode", "target", check=False).stdout:
        attempt(*TGT, "--op", "delete", "--mode", "target", "--tid", TID, "--force")
    if sh("ip", "link", "show", HOST_IF, check=False).returncode == 0:
        attempt("ip", "link", "del", HOST_IF)
    if os.path.exists(f"/run/netns/{NS}"):
        attempt("ip", "netns", "del", NS)


def set_loss_b(pct: float, portals=(PORTAL1, PORTAL2)):
    """pct% random drop of host B's iSCSI traffic with `portals`, at each receiver's INPUT."""
    for ns in (STOR_NS, NS):
        sh("iptables", "-w", "-F", CHAIN, ns=ns)
    if pct <= 0:
        return
    stat = ["-m", "statistic", "--mode", "random", "--probability", f"{pct / 100:.6f}"]
    for portal in portals:
        # host B -> target: dropped where the target receives it
        sh("iptables", "-w", "-A", CHAIN, "-i", STOR_IF, "-d", portal, "-p", "tcp", "--dport", 3260, *stat,
           "-j", "DROP", ns=STOR_NS)
        # target -> host B: dropped where host B receives it
        sh("iptables", "-w", "-A", CHAIN, "-i", NS_STOR_IF, "-s", portal, "-p", "tcp", "--sport", 3260, *stat,
           "-j", "DROP", ns=NS)


def stop(proc):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def fleet(lab, tmp_path_factory):
    missing = [b for b in ("prometheus", "iscsi-perf", "tc") if shutil.which(b) is None]
    if missing:
        reason = f"missing {', '.join(missing)} (Debian prometheus, libiscsi-bin, iproute2)"
        print(f"SKIP fleet lab test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("fleet")
    errors: list[str] = []
    procs: list[subprocess.Popen] = []
    logs = []

    def spawn(name, cmd):
        log = open(tmp / f"{name}.log", "w")
        logs.append(log)
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        procs.append(p)
        return p

    teardown_host_b(errors)  # leftovers of an interrupted run
    errors.clear()
    try:
        build_host_b(tmp)
        for i, portal in enumerate((PORTAL1, PORTAL2)):
            spawn(f"iscsi-perf-{i + 1}", ["ip", "netns", "exec", NS, "iscsi-perf", "-m", "2", "-b", "8",
                                          "-i", f"iqn.2025-01.io.kvmscope.lab:host-b-{i + 1}",
                                          f"iscsi://{portal}:3260/{IQN}/1"])
        port_a, port_b, port_p = free_port(), free_port(), free_port()
        web = make_web_config(tmp)
        for name, extra in (("a", []), ("b", ["libvirt", "qmp", "storage_log"])):
            (tmp / f"agent-{name}.yaml").write_text(yaml.safe_dump(
                {"agent": {"collectors": {"disable": EBPF_OFF + extra}},
                 "metrics": {"web_config": web["web_config"]},
                 "api": {"socket": str(tmp / f"agent-{name}" / "api.sock")}}))
        spawn("agent-a", [sys.executable, "-m", "agent", "-c", tmp / "agent-a.yaml", "--standalone", "run",
                          "--listen", f"127.0.0.1:{port_a}", "--interval", "1", "-q"])
        spawn("agent-b", ["ip", "netns", "exec", NS, sys.executable, "-m", "agent", "-c", tmp / "agent-b.yaml",
                          "--standalone", "run", "--listen", f"{B_ADDR}:{port_b}", "--interval", "1", "-q"])
        example = yaml.safe_load(EXAMPLE.read_text())["scrape_configs"][0]
        (tmp / "targets").mkdir()
        (tmp / "targets" / "kvmscope-fleet.json").write_text(json.dumps(
            [{"targets": [f"127.0.0.1:{port_a}", f"{B_ADDR}:{port_b}"], "labels": {"site": "lab"}}]))
        (tmp / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": f"{SCRAPE}s", "evaluation_interval": f"{SCRAPE}s",
                       "scrape_timeout": "1s"},
            "scrape_configs": [{
                "job_name": example["job_name"],
                **web["scrape"],
                "file_sd_configs": [{"files": [str(tmp / "targets" / "*.json")], "refresh_interval": "5s"}],
                "relabel_configs": example["relabel_configs"],
            }],
        }))
        spawn("prometheus", ["prometheus", f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port_p}",
                             "--storage.tsdb.retention.time=1h"])
        base = f"http://127.0.0.1:{port_p}"

        def both_hosts_both_portals():
            r = prom_query(base, 'count by (host, portal) (kvmscope_storage_connections{state="ESTABLISHED"})')
            got = {(x["metric"]["host"], x["metric"]["portal"]) for x in r}
            want = {(h, f"{p}:3260") for h in (HOST_A, HOST_B) for p in (PORTAL1, PORTAL2)}
            assert want <= got, f"have only {sorted(got)}"
            return True

        t0 = time.monotonic()
        wait_for(both_hosts_both_portals, 90, "both agents' connections to both portals in Prometheus")
        print(f"\nfleet stack ready in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield {"base": base, "lab": lab, "tmp": tmp}
    finally:
        lab.run("loss", 0, check=False)
        for p in reversed(procs):
            stop(p)
        for log in logs:
            log.close()
        teardown_host_b(errors)
        for i in (1, 2):
            log = tmp / f"iscsi-perf-{i}.log"
            if log.exists():
                print(f"iscsi-perf {i} (last lines): {log.read_text()[-300:]!r}", file=sys.stderr)
        assert not errors, f"cleanup failed: {errors}"


def run_fleet(base, *args):
    p = subprocess.run([sys.executable, "-m", "agent", "fleet", "--prometheus", base, "--window", f"{WINDOW}s",
                        *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert p.returncode in (0, 3), f"rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def judge(fleet, label):
    """Wait until the window holds only this phase, then run the CLI: (rc, json, table)."""
    time.sleep(WINDOW + 2 * SCRAPE)
    pj = run_fleet(fleet["base"], "--json")
    pt = run_fleet(fleet["base"])
    rep = json.loads(pj.stdout)
    print(f"\n--- {label}: exit {pj.returncode}\n{pt.stdout}", file=sys.stderr)
    assert pt.returncode == pj.returncode
    return pj.returncode, rep, pt.stdout


def verdicts(rep):
    portals = {p["portal"]: p["verdict"] for p in rep["portals"]}
    hosts = {h["host"]: h["verdict"] for h in rep["hosts"]}
    paths = {(p["host"], p["portal"]): p for p in rep["paths"]}
    return portals, hosts, paths


P1, P2 = f"{PORTAL1}:3260", f"{PORTAL2}:3260"


def test_clean_fleet(fleet):
    rc, rep, text = judge(fleet, "clean")
    portals, hosts, paths = verdicts(rep)
    assert {a["host"] for a in rep["agents"]} == {HOST_A, HOST_B}
    assert all(a["up"] == 1 for a in rep["agents"]), rep["agents"]
    assert set(paths) == {(h, p) for h in (HOST_A, HOST_B) for p in (P1, P2)}
    assert not [p for p in paths.values() if p["bad"]], paths
    assert portals == {P1: "ok", P2: "ok"} and hosts == {HOST_A: "ok", HOST_B: "ok"}
    assert rc == 0 and rep["findings"] == []
    assert "no storage path problems across the fleet" in text


def test_portal_wide_loss(fleet):
    lab = fleet["lab"]
    lab.run("loss", 5, "--portal", 1)
    set_loss_b(5, portals=(PORTAL1,))
    try:
        rc, rep, text = judge(fleet, "5% loss to portal 1 from both hosts")
    finally:
        lab.run("loss", 0)
        set_loss_b(0)
    portals, hosts, paths = verdicts(rep)
    assert paths[(HOST_A, P1)]["bad"] and paths[(HOST_B, P1)]["bad"], paths
    assert not paths[(HOST_A, P2)]["bad"] and not paths[(HOST_B, P2)]["bad"], paths
    assert portals == {P1: "portal-wide", P2: "ok"}
    assert [(f["scope"], f["subject"], f["verdict"], sorted(f["bad"])) for f in rep["findings"]] == \
        [("portal", P1, "portal-wide", sorted([HOST_A, HOST_B]))]
    assert f"PORTAL-WIDE: portal {P1} is bad from 2 of 2 hosts" in text
    assert rc == 3


def test_host_local_loss(fleet):
    set_loss_b(5)
    try:
        rc, rep, text = judge(fleet, "5% loss on host B's link only")
    finally:
        set_loss_b(0)
    portals, hosts, paths = verdicts(rep)
    assert paths[(HOST_B, P1)]["bad"] and paths[(HOST_B, P2)]["bad"], paths
    assert not paths[(HOST_A, P1)]["bad"] and not paths[(HOST_A, P2)]["bad"], paths
    assert portals == {P1: "host-local", P2: "host-local"}
    assert hosts == {HOST_A: "ok", HOST_B: "host-local"}
    (f,) = rep["findings"]
    assert (f["scope"], f["subject"], f["verdict"], sorted(f["bad"])) == ("host", HOST_B, "host-local", [P1, P2])
    assert "NIC" in f["look_at"]
    assert f"HOST-LOCAL: host {HOST_B} has bad paths to {P1}, {P2}" in text
    assert rc == 3
