"""Storage-path inventory on the real lab: VMs on libiscsi LUNs, checked against ss(8) and virsh."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.lab

ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
ODD_NAME = "kvmslab-odd 'single' \"double\" ü spaces"


def kvmscope(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "agent", "--standalone", *args], capture_output=True, text=True, env=ENV, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def ss_qemu_sockets():
    """{(src, sport, dst, dport): pid} for qemu sockets to port 3260, from ss -tnp."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", "( dport = :3260 )"], capture_output=True,
                         text=True, check=True).stdout
    res = {}
    for line in out.splitlines():
        f = line.split()
        (src, sport), (dst, dport) = f[2].rsplit(":", 1), f[3].rsplit(":", 1)
        m = re.search(r"pid=(\d+)", line)
        res[(src, int(sport), dst, int(dport))] = int(m.group(1)) if m else None
    return res


def virsh_block(vm):
    out = subprocess.run(["virsh", "-c", "qemu:///system", "domstats", "--block", vm], capture_output=True,
                         text=True, check=True).stdout
    vals = dict(re.findall(r"^\s+(block\.\S+)=(\S+)$", out, re.M))
    names = {vals[k]: k.split(".")[1] for k in vals if re.fullmatch(r"block\.\d+\.name", k)}
    return {name: {op: int(vals[f"block.{i}.{op}.reqs"]) for op in ("rd", "wr")} for name, i in names.items()}


def test_paths_json_matches_ss_and_lab(lab):
    paths = json.loads(kvmscope("paths", "--json").stdout)
    sockets = ss_qemu_sockets()
    by = {(p["vm"], p["disk"]): p for p in paths}
    for vm in lab.status["vms"]:
        name = vm["name"]
        vda = next(d for d in vm["disks"] if d["dev"] == "vda")
        p = by[(name, "vda")]
        assert p["backend"] == "libiscsi"
        assert p["portal"] == f"{vda['address']}:3260"
        assert (p["target"], p["lun"]) == (vda["iqn"], vda["lun"])
        src, dst = p["connection"].split("->")
        s_addr, s_port = src.rsplit(":", 1)
        d_addr, d_port = dst.rsplit(":", 1)
        key = (s_addr, int(s_port), d_addr, int(d_port))
        assert key in sockets, f"{p['connection']} not among ss sockets {sockets}"
        assert sockets[key] == p["pid"], "the socket belongs to this VM's qemu process"
        assert p["interface"] == f"kvmslab-h{vm['portal']}"
        assert p["unknown"] == []
        q = by[(name, "vdb")]
        assert q["backend"] == "host" and q["host_device"] == "vda"  # the file sits on the host's /dev/vda
        assert q["connection"] is None


def test_vm_request_counts_agree_with_virsh(lab):
    before = {vm: virsh_block(vm) for vm in lab.vm_names}
    rows = json.loads(kvmscope("vms", "--json").stdout)
    after = {vm: virsh_block(vm) for vm in lab.vm_names}
    seen, moved = 0, []
    for r in rows:
        if r["vm"] not in lab.vm_names:
            continue
        for op, key in (("rd", "rd_reqs"), ("wr", "wr_reqs")):
            lo, hi = before[r["vm"]][r["disk"]][op], after[r["vm"]][r["disk"]][op]
            assert lo <= r["stats"][key] <= hi, (r["vm"], r["disk"], op, lo, r["stats"][key], hi)
            if hi > lo:
                moved.append((r["vm"], r["disk"], op))
        seen += 1
    assert seen == 2 * len(lab.vm_names)
    # the window proves something only while the guests' load moves counters; one
    # disk's loop may stall for a moment under TCG on a loaded machine, all of them not
    assert moved, "the guest load moved no counter between the two virsh reads"


def test_vms_sample_gives_rates(lab):
    rows = json.loads(kvmscope("vms", "--sample", "2", "--json").stdout)
    vda = [r for r in rows if r["disk"] == "vda" and r["vm"] in lab.vm_names]
    assert len(vda) == len(lab.vm_names)
    for r in vda:
        i = r["interval"]
        assert 1.5 < i["seconds"] < 5
        assert i["read_ops_per_second"] > 10 and i["write_ops_per_second"] > 10
        assert 0 < i["read_avg_ms"] < 50


@pytest.fixture
def odd_vm(lab):
    """A paused extra domain whose name has quotes, spaces and unicode."""
    import libvirt

    from .conftest import LAB_DIR

    img = os.path.join(LAB_DIR, "kvmslab-odd.img")  # readable by the libvirt-qemu user, removed by lab down
    with open(img, "wb") as f:
        f.write(b"\0" * (1 << 20))
    os.chmod(img, 0o666)
    from xml.sax.saxutils import escape

    xml = f"""<domain type='qemu'><name>{escape(ODD_NAME)}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
      <os><type arch='x86_64' machine='pc'>hvm</type></os>
      <devices><disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source file='{img}'/><target dev='vdb' bus='virtio'/></disk></devices></domain>"""
    conn = lab.connect()
    dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        yield dom
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        os.unlink(img)


def test_odd_vm_name_survives_tables_json_and_metrics(odd_vm):
    rows = json.loads(kvmscope("vms", "--json").stdout)
    odd = [r for r in rows if r["vm"] == ODD_NAME]
    assert len(odd) == 1 and odd[0]["state"] == "paused" and odd[0]["disk"] == "vdb"
    table = kvmscope("vms").stdout
    assert ODD_NAME in table
    # metrics: a live agent, then promtool and an exact escaped label
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{port}", "--interval", "1", "-q"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(ENV, KVMSCOPE_API__SOCKET=f"/tmp/kvmscope-inventory-{os.getpid()}/api.sock"))
    try:
        body = ""
        for _ in range(60):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if "kvmscope_vm_running" in body:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert 'kvmscope_vm_running{manager="libvirt",vm="kvmslab-odd \'single\' \\"double\\" ü spaces"} 0.0' in body
        for vm in ("kvmslab-vm0", "kvmslab-vm1"):
            assert f'kvmscope_vm_disk_requests_total{{disk="vda",op="read",vm="{vm}"}}' in body
            assert re.search(rf'kvmscope_storage_connection_rtt_seconds{{disk="vda",local="[0-9.:]+",portal="198\.18\.\d\.2:3260",vm="{vm}"}}', body)
        r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        p.terminate()
        p.wait(10)
