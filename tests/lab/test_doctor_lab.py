"""`kvmscope doctor --json` on the real lab: libiscsi disks single-path, cache='none' ok, no
error_policy = warning, one MTU over kvmslab-h1/h2, eBPF requirements met."""

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.lab

ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}


def test_doctor_on_the_lab(lab):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "agent", "doctor", "--json"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    took = time.monotonic() - t0
    print(f"\nkvmscope doctor took {took:.1f}s\n{r.stderr}", file=sys.stderr)
    assert r.returncode == 3, r.stderr  # the lab's VMs have no error_policy: warnings
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 3
    res = doc["results"]

    def of(check):
        return [x for x in res if x["check"] == check]

    vda = {f"{vm}/vda" for vm in lab.vm_names}
    single = {x["subject"]: x for x in of("single_path")}
    assert vda <= set(single), single
    for s in vda:
        assert single[s]["status"] == "info" and single[s]["values"]["backend"] == "libiscsi"
        assert "single path" in single[s]["finding"]

    cache = {x["subject"]: x for x in of("disk_cache")}
    assert {s: cache[s]["status"] for s in vda} == {s: "ok" for s in vda}
    assert all(cache[s]["values"]["cache"] == "none" for s in vda)
    assert not any(s.endswith("/vdb") for s in cache)  # vdb is a host file, not iSCSI

    pol = {x["subject"]: x for x in of("disk_error_policy")}
    for s in vda:
        assert pol[s]["status"] == "warning" and pol[s]["values"]["error_policy"] is None
        assert pol[s]["values"]["effective_write"] == "enospace"

    mtu = [x for x in of("mtu") if x["status"] != "info"]
    assert len(mtu) == 1 and mtu[0]["status"] == "ok", mtu
    ifaces = mtu[0]["values"]["interfaces"]
    assert set(ifaces) == {"kvmslab-h1", "kvmslab-h2"}, ifaces
    assert len(set(ifaces.values())) == 1

    (ebpf,) = of("ebpf_readiness")
    assert ebpf["status"] == "ok", ebpf

    ka = {x["subject"]: x for x in of("libiscsi_keepalive")}
    for s in vda:
        assert ka[s]["status"] == "ok" and ka[s]["values"]["connections"], ka[s]
        print(f"{s}: {ka[s]['finding']}", file=sys.stderr)
    assert {x["status"] for x in of("iscsi_timeouts")} <= {"skipped", "ok", "info"}  # no open-iscsi in the lab

    text = subprocess.run([sys.executable, "-m", "agent", "doctor"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    print(text.stdout, file=sys.stderr)
    assert text.returncode == 3 and text.stdout.splitlines()[2].split() == ["CHECK", "STATUS", "FINDING"]
