"""An IPv6 portal end to end: one bracketed string in /metrics, `paths`, `diagnose` and Elasticsearch.

Real pieces only. The test makes a network namespace joined to the host by a
veth with unique-local IPv6 addresses (host end ``fd00:6b76:6d73:6::1``,
namespace end ``::2``, ``nodad``), runs tgtd inside it listening on
``[fd00:6b76:6d73:6::2]:3260`` (its own control socket, ``-C 61``; the lab
uses 42) with one LUN on a file, and boots a stand-alone QEMU (TCG) whose
guest does O_DIRECT reads and writes on ``-drive
file=iscsi://[fd00:6b76:6d73:6::2]:3260/IQN/1`` (QEMU's libiscsi: the qemu
process owns the TCP connection), with a QMP socket the agent's qmp source
reads. The guest is the lab's Debian kernel with a busybox initramfs built
from deploy/lab's kvmslab.guest parts (one disk, so its own /init).

`kvmscope run` (a subprocess, /metrics on ``[::1]``, Elasticsearch output to
the session's real node) watches it; packet loss (ip6tables ``statistic``
DROP at both receiving ends: INPUT inside the namespace for the target's
side, the host's INPUT on the veth for the initiator's side) gives
``diagnose`` a finding about the portal. Then the very same
``[fd00:6b76:6d73:6::2]:3260`` must be the portal in the /metrics labels,
``paths --json`` and its table, ``diagnose --json`` and its text, and the
documents' ``kvmscope.portal``; and no endpoint of the namespace's addresses
may appear unbracketed anywhere (a bare address is right only in an IP
field such as ECS ``destination.ip``).

Everything made here is removed in the fixtures' finalizers, also on failure.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port, wait_for

pytestmark = pytest.mark.slow

KVMSCOPE_CMD = [sys.executable, "-m", "agent"]
PREFIX = "fd00:6b76:6d73:6"  # 6b76:6d73 = "kvms"
HOST_ADDR, TARGET_ADDR = f"{PREFIX}::1", f"{PREFIX}::2"
PORTAL = f"[{TARGET_ADDR}]:3260"
IQN = "iqn.2026-11.io.kvmscope.test:ipv6-vda"
TGT_CONTROL = 61  # tgtd -C: /var/run/tgtd/socket.61 (the lab's tgtd is 42)
VM_NAME, VM_UUID = "ipv6-vm", "6b766d73-0006-4a4a-9c9c-000000000006"
LOSS = "0.08"  # random drop probability at each receiving end
# an endpoint (address followed by :port) of the namespace's addresses written without brackets
UNBRACKETED = re.compile(rf"(?<!\[){re.escape(PREFIX)}::[12]:\d")


def sh(*args, check=True, ns=None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: rc={r.returncode}: {r.stderr.strip()}")
    return r


# -- the storage host: namespace, veth, tgtd ---------------------------------------------------------------------------

@pytest.fixture
def storage_ns(tmp_path):
    tag = str(os.getpid() % 100000)
    ns, host_if, ns_if = f"kvms6-{tag}", f"k6h{tag}", f"k6n{tag}"
    tgtd = None
    made = []
    try:
        sh("ip", "netns", "add", ns)
        made.append("ns")
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        made.append("veth")
        sh("ip", "link", "set", ns_if, "netns", ns)
        # nodad: the addresses are usable at once (no duplicate address detection wait)
        sh("ip", "addr", "add", f"{HOST_ADDR}/64", "dev", host_if, "nodad")
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "addr", "add", f"{TARGET_ADDR}/64", "dev", ns_if, "nodad", ns=ns)
        sh("ip", "link", "set", ns_if, "up", ns=ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)

        lun = tmp_path / "lun.img"
        with open(lun, "wb") as f:
            f.truncate(32 << 20)
        log = open(tmp_path / "tgtd.log", "wb")
        tgtd = subprocess.Popen(["ip", "netns", "exec", ns, "tgtd", "-f", "-C", str(TGT_CONTROL),
                                 "--iscsi", f"portal={PORTAL}"], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        adm = ["tgtadm", "-C", str(TGT_CONTROL), "--lld", "iscsi"]

        def answers():
            assert tgtd.poll() is None, f"tgtd exited: {(tmp_path / 'tgtd.log').read_text()[-2000:]}"
            return sh(*adm, "--op", "show", "--mode", "sys", check=False).returncode == 0

        wait_for(answers, 15, "tgtd's control socket", step=0.2)
        assert PORTAL in sh(*adm, "--op", "show", "--mode", "portal").stdout  # tgtd writes its portal bracketed
        sh(*adm, "--op", "new", "--mode", "target", "--tid", 1, "-T", IQN)
        sh(*adm, "--op", "new", "--mode", "logicalunit", "--tid", 1, "--lun", 1, "-b", lun)
        sh(*adm, "--op", "bind", "--mode", "target", "--tid", 1, "--initiator-address", "ALL")
        yield {"ns": ns, "host_if": host_if, "ns_if": ns_if}
    finally:
        if tgtd is not None:
            if tgtd.poll() is None:
                adm = ["tgtadm", "-C", str(TGT_CONTROL), "--lld", "iscsi"]
                sh(*adm, "--op", "delete", "--mode", "target", "--tid", 1, "--force", check=False)
                sh(*adm, "--op", "delete", "--mode", "system", check=False)
                try:
                    tgtd.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(tgtd.pid, signal.SIGKILL)
                    tgtd.wait(5)
            for p in (f"/var/run/tgtd/socket.{TGT_CONTROL}", f"/var/run/tgtd/socket.{TGT_CONTROL}.lock"):
                Path(p).unlink(missing_ok=True)
        if "veth" in made:
            sh("ip", "link", "del", host_if, check=False)  # gone with the namespace too, unless it never moved
        if "ns" in made:
            sh("ip", "netns", "del", ns, check=False)


# -- the VM: Debian kernel + busybox initramfs, disk over libiscsi to the IPv6 portal ----------------------------------

GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1
for m in @MODULES@; do insmod "/lib/modules/$m.ko" || echo "ipv6-vm: insmod $m failed"; done
while [ ! -b /dev/vda ]; do sleep 0.2; done
span=$(( $(cat /sys/block/vda/size) / 8 - 16 ))
echo "ipv6-vm: load started"
while true; do
    dd if=/dev/vda of=/dev/null bs=4k count=16 skip=$((RANDOM % span)) iflag=direct 2>/dev/null
    dd if=/dev/zero of=/dev/vda bs=4k count=16 seek=$((RANDOM % span)) oflag=direct 2>/dev/null
done
"""


def build_initramfs(out: Path) -> str:
    """The lab's guest parts (kernel choice, virtio modules in order, cpio writer), this test's /init; -> kernel path."""
    sys.path.insert(0, str(ROOT / "deploy" / "lab"))
    try:
        from kvmslab import guest
    finally:
        sys.path.remove(str(ROOT / "deploy" / "lab"))
    ver, kernel = guest.pick_guest_kernel()
    mods = guest.ordered_modules(ver)
    c = guest.Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", Path("/bin/busybox").read_bytes(), 0o755)
    c.file("init", GUEST_INIT.replace("@MODULES@", " ".join(mods)).encode(), 0o755)
    for m in mods:
        c.file(f"lib/modules/{m}.ko", guest.read_module(guest.module_file(ver, m)))
    out.write_bytes(gzip.compress(c.finish(), compresslevel=1))
    return kernel


@pytest.fixture
def vm(tmp_path, storage_ns):
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 not installed (deploy/setup.sh installs it)"
    kernel = build_initramfs(tmp_path / "initrd.gz")
    qmp = tmp_path / "qmp" / f"{VM_NAME}.qmp"
    qmp.parent.mkdir()
    console = tmp_path / "console.log"
    log = open(tmp_path / "qemu.log", "wb")
    p = subprocess.Popen([
        qemu, "-M", "pc", "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
        "-name", f"guest={VM_NAME}", "-uuid", VM_UUID, "-no-reboot",
        "-kernel", kernel, "-initrd", str(tmp_path / "initrd.gz"), "-append", "console=ttyS0 quiet panic=-1",
        "-serial", f"file:{console}", "-qmp", f"unix:{qmp},server=on,wait=off",
        "-drive", f"file=iscsi://{PORTAL}/{IQN}/1,if=none,id=drive0,format=raw,cache=none",
        "-device", "virtio-blk-pci,drive=drive0,id=disk0",
    ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    try:
        def started():
            assert p.poll() is None, f"QEMU exited: {(tmp_path / 'qemu.log').read_text()[-2000:]}"
            return console.exists() and "ipv6-vm: load started" in console.read_text(errors="replace")

        wait_for(started, 90, "the guest's disk load on the IPv6 portal")
        yield {"pid": p.pid, "qmp_glob": str(qmp.parent / "*.qmp")}
    finally:
        p.kill()
        p.wait(10)


# -- loss at both receiving ends ---------------------------------------------------------------------------------------

@pytest.fixture
def loss(storage_ns):
    """add() puts the DROP rules in; they are taken out at the end whatever happened."""
    ns = storage_ns["ns"]
    tag = ["-m", "comment", "--comment", f"kvmscope-test-ipv6-{os.getpid()}"]
    stat = ["-m", "statistic", "--mode", "random", "--probability", LOSS, "-j", "DROP"]
    rules = [
        (None, ["INPUT", "-i", storage_ns["host_if"], "-s", TARGET_ADDR, "-p", "tcp", "--sport", "3260", *tag, *stat]),
        (ns, ["INPUT", "-i", storage_ns["ns_if"], "-d", TARGET_ADDR, "-p", "tcp", "--dport", "3260", *tag, *stat]),
    ]
    added = []

    def add():
        for where, rule in rules:
            sh("ip6tables", "-I", *rule, ns=where)
            added.append((where, rule))

    yield add
    for where, rule in added:
        sh("ip6tables", "-D", *rule, ns=where, check=False)
    if added:
        left = sh("ip6tables", "-S", "INPUT").stdout
        assert f"kvmscope-test-ipv6-{os.getpid()}" not in left, left


# -- the agent -----------------------------------------------------------------------------------------------------

@pytest.fixture
def agent(tmp_path, es_node, namespace, vm):
    from agent.sources import load_registry

    port = free_port()
    keep = {"qmp", "storage_tcp", "net_ifaces", "host_tcp", "block_devices"}
    cfg = tmp_path / "kvmscope.yaml"
    cfg.write_text(yaml.safe_dump({
        "agent": {"interval": 1.0, "collectors": {"disable": sorted(set(load_registry()) - keep)}},
        "metrics": {"listen": f"[::1]:{port}"},
        "api": {"socket": str(tmp_path / "api.sock")},  # the CLI below attaches here, not to /run/kvmscope's
        "qmp": {"sockets": [vm["qmp_glob"]]},
        "diagnose": {"window_seconds": 10},  # the agent's live diagnosis: findings in /metrics and shipped
        "elasticsearch": {"enabled": True, "hosts": [es_node.url], "namespace": namespace,
                          "spool_dir": str(tmp_path / "spool"), "retry_initial": 0.2, "retry_max": 1.0,
                          "request_timeout": 5, "stop_timeout": 3},
    }))
    console = open(tmp_path / "agent.log", "ab")
    p = subprocess.Popen([*KVMSCOPE_CMD, "--config", str(cfg), "run"], stdout=console, stderr=subprocess.STDOUT)
    console.close()
    url = f"http://[::1]:{port}/metrics"

    def metrics():
        assert p.poll() is None, f"kvmscope run exited: {(tmp_path / 'agent.log').read_text()[-3000:]}"
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.read().decode()

    try:
        wait_for(metrics, 30, "the agent's /metrics on [::1]")
        yield {"cfg": cfg, "metrics": metrics, "log": tmp_path / "agent.log"}
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def cli(cfg: Path, *args: str, ok=(0,)) -> str:
    r = subprocess.run([*KVMSCOPE_CMD, "--config", str(cfg), *args], capture_output=True, text=True, timeout=90)
    assert r.returncode in ok, f"kvmscope {' '.join(args)}: rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "attached to the running agent" in r.stderr, r.stderr  # the agent's view, not a second collection
    return r.stdout


def strings(obj, path=""):
    """(dotted key, string) for every string in a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v, path)
    elif isinstance(obj, str):
        yield path, obj


def mine(values) -> set[str]:
    """The values that name the namespace's target address."""
    return {v for v in values if v and TARGET_ADDR in v}


# -- the test ------------------------------------------------------------------------------------------------------

def test_one_bracketed_ipv6_portal_in_metrics_paths_diagnose_and_elasticsearch(agent, vm, loss, es_node, namespace):
    cfg = agent["cfg"]

    # the path is joined: QMP disk -> the qemu's own TCP socket to the portal -> the host's veth
    def joined():
        ps = [p for p in json.loads(cli(cfg, "paths", "--json")) if p["vm"] == VM_NAME]
        return ps if ps and ps[0]["connection"] else None

    (path,) = wait_for(joined, 30, "paths to join the VM disk to its TCP connection")
    assert (path["backend"], path["target"], path["lun"], path["pid"]) == ("libiscsi", IQN, 1, vm["pid"])
    assert path["portal"] == PORTAL and path["connection"].endswith(f"->{PORTAL}")
    assert path["connection"].startswith(f"[{HOST_ADDR}]:") and path["interface"] is not None
    assert path["unknown"] == []
    table = cli(cfg, "paths")
    row = next(line for line in table.splitlines() if line.startswith(VM_NAME))
    assert PORTAL in row.split() and f"->{PORTAL}" in row

    # loss on the path: diagnose names the portal
    loss()
    t_loss = time.monotonic()
    findings = None
    while time.monotonic() - t_loss < 60:
        time.sleep(8)
        out = json.loads(cli(cfg, "diagnose", "--window", "8s", "--json", ok=(0, 3)))
        findings = [f for f in out["findings"] if PORTAL in json.dumps(f)]
        if any(f["subject"].get("id") == PORTAL for f in findings):
            break
    assert findings and any(f["subject"].get("id") == PORTAL for f in findings), json.dumps(out, indent=1)[-4000:]
    diag_text = cli(cfg, "diagnose", "--window", "8s", ok=(3,))
    assert PORTAL in diag_text

    # /metrics: every portal label naming the address is the bracketed portal, on the disk and the connection series,
    # and the agent's own live finding names it as its subject
    live = re.compile(r'^kvmscope_diagnosis_findings\{(?=[^}]*subject_kind="portal")[^}]*subject="'
                      + re.escape(PORTAL) + '"', re.M)

    def with_live_finding():
        t = agent["metrics"]()
        return t if live.search(t) else None

    try:
        text = wait_for(with_live_finding, 30, "the live finding in /metrics")
    except AssertionError as e:
        lines = [ln for ln in agent["metrics"]().splitlines() if ln.startswith("kvmscope_diagnosis")]
        raise AssertionError(f"{e}; the agent's diagnosis series: {lines}") from None
    labelled = {}
    for line in text.splitlines():
        for m in re.finditer(r'(\w+)="([^"]*)"', line):
            if TARGET_ADDR in m.group(2):
                labelled.setdefault(m.group(1), set()).add(m.group(2))
                if m.group(1) == "portal":
                    labelled.setdefault("portal series", set()).add(line.split("{", 1)[0])
    assert labelled.get("portal") == {PORTAL}, labelled
    # every other label naming the address names it as the bracketed portal: a finding's subject is the portal,
    # its cause key (rule:portal:PORTAL) holds it whole
    assert labelled.get("subject") == {PORTAL}, labelled
    assert all(TARGET_ADDR not in x.replace(PORTAL, "") for k, v in labelled.items() if k != "portal series"
               for x in v), labelled
    assert len(labelled["portal series"]) >= 2, labelled  # the VM disk's and the connection's series at least

    # Elasticsearch: every kvmscope.portal naming the address is the bracketed portal
    client = es_node.client()

    def shipped():
        client.indices.refresh(index=f"*-kvmscope.*-{namespace}", allow_no_indices=True, ignore_unavailable=True)
        r = client.search(index=f"*-kvmscope.*-{namespace}", size=2000, allow_no_indices=True,
                          ignore_unavailable=True, query={"term": {"kvmscope.portal": PORTAL}})
        hits = r["hits"]["hits"]
        kinds = {re.search(r"kvmscope\.[\w.]+", h["_index"]).group(0) for h in hits}
        finding = any(h["_source"]["event"].get("action") == "diagnosis-finding" for h in hits)
        return hits if len(kinds) >= 3 and finding else None

    shipped_hits = wait_for(shipped, 60, "disk, connection and finding documents with kvmscope.portal")
    everything = client.search(index=f"*-kvmscope.*-{namespace}", size=5000, allow_no_indices=True,
                               ignore_unavailable=True, query={"match_all": {}})["hits"]["hits"]
    portals = mine(h["_source"].get("kvmscope", {}).get("portal") for h in everything)
    assert portals == {PORTAL}, portals

    # nowhere an unbracketed endpoint; a bare address only in IP fields
    outputs = {"metrics": text, "paths --json": cli(cfg, "paths", "--json"), "paths": table,
               "diagnose --json": json.dumps(out), "diagnose": diag_text,
               "elasticsearch": json.dumps([h["_source"] for h in everything])}
    for name, body in outputs.items():
        assert not UNBRACKETED.search(body), f"{name}: {UNBRACKETED.search(body).group(0)!r} unbracketed"
    bare = {k for h in everything for k, v in strings(h["_source"]) if v in (HOST_ADDR, TARGET_ADDR)}
    assert bare and all(k.endswith(".ip") for k in bare), bare
    sys.stderr.write(f"\n{PORTAL}: findings {sorted({(f['rule'], f['subject']['kind']) for f in findings})} "
                     f"{time.monotonic() - t_loss:.0f}s after the drop; /metrics series {sorted(labelled['portal series'])}; "
                     f"{len(everything)} documents ({len(shipped_hits)} with the portal), bare address only in {sorted(bare)}\n")
