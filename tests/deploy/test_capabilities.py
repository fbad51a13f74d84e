"""Each capability the unit grants is needed: take one away and what the
README says breaks does break. The installed agent runs as root under the
unit's bounding set minus one capability (setpriv), like systemd would run it.

  CAP_BPF, CAP_PERFMON  the eBPF probes do not load
  CAP_DAC_READ_SEARCH   a storage connection of a process of another user (QEMU runs as
  CAP_SYS_PTRACE        libvirt-qemu) loses its owner, so its VM: /proc/<pid>/fd is mode 0500
                        of that user (listing it needs the first), its links need ptrace
                        access (the second)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from agent.codec import read_recording
from tests.conftest import free_port
from tests.deploy.conftest import new_install

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(bundle, installer):
    for inst in new_install():
        inst.install_bundle(bundle)
        inst.unit = installer.parse_unit((inst.paths["unit_dir"] / "kvmscope.service").read_text())
        yield inst


def run_as_unit(inst, installer, argv, drop: str | None = None, add: str | None = None, **kw):
    unit = json.loads(json.dumps(inst.unit))
    caps = installer.unit_capabilities(unit)
    if drop:
        assert drop in caps, f"the unit does not grant {drop}"
        unit["Service"]["CapabilityBoundingSet"] = [" ".join(c for c in caps if c != drop)]
    if add:  # what a drop-in with CapabilityBoundingSet=<add> gives
        assert add not in caps, f"the unit grants {add} already"
        unit["Service"]["CapabilityBoundingSet"] = [" ".join([*caps, add])]
    return subprocess.run(installer.setpriv_argv(unit) + argv, capture_output=True, text=True, cwd="/",
                          timeout=120, **kw)


def probe_reports(inst, installer, drop=None, add=None) -> dict[str, dict]:
    kvmscope = str(inst.paths["prefix"] / "bin" / "kvmscope")
    p = run_as_unit(inst, installer, [kvmscope, "--standalone", "probes", "--json", "--seconds", "0"], drop, add)
    return {x["name"]: x for x in json.loads(p.stdout)["probes"]}


def probe_states(inst, installer, drop=None, add=None) -> dict[str, str]:
    return {name: r["state"] for name, r in probe_reports(inst, installer, drop, add).items()}


def test_unit_declares_exactly_these(installed, installer):
    assert sorted(installer.unit_capabilities(installed.unit)) == ["CAP_BPF", "CAP_DAC_READ_SEARCH", "CAP_PERFMON",
                                                               "CAP_SYS_PTRACE"]


def test_probes_need_cap_bpf_and_cap_perfmon(installed, installer):
    full = probe_reports(installed, installer)
    # the tracepoint probes attach under the unit; the libiscsi uprobes need the uprobe PMU, which the
    # kernel opens only with CAP_SYS_ADMIN: under the unit they fail with the fix in the reason, and a
    # drop-in granting CAP_SYS_ADMIN attaches them (README "Running as a service")
    uprobe = full.pop("libiscsi")
    assert {r["state"] for r in full.values()} == {"attached"}, full
    assert uprobe["state"] == "failed" and "CAP_SYS_ADMIN" in uprobe["reason"], uprobe
    assert probe_states(installed, installer, add="CAP_SYS_ADMIN")["libiscsi"] == "attached"
    for cap in ("CAP_BPF", "CAP_PERFMON"):
        states = probe_states(installed, installer, drop=cap)
        assert "attached" not in states.values(), (cap, states)
        print(f"\nwithout {cap}: {states}")


def test_vm_attribution_needs_cap_dac_read_search_and_cap_sys_ptrace(installed, installer, tmp_path):
    port = free_port()
    srv = socket.socket()
    srv.bind(("127.0.0.1", port))
    srv.listen(4)
    # a "QEMU" of another user holding a connection to the storage port
    client = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c",
         f"import socket,time; s=socket.create_connection(('127.0.0.1',{port})); time.sleep(120)"])
    conn, _ = srv.accept()
    try:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"storage:\n  ports: [{port}]\nagent:\n  collectors:\n    disable: "
                       "[ebpf_tcp_retrans, ebpf_block_io, ebpf_tcp_lifecycle, libvirt, qmp, storage_log]\n")
        os.chmod(tmp_path, 0o755)
        cfg.chmod(0o644)
        kvmscope = str(installed.paths["prefix"] / "bin" / "kvmscope")

        def owner(drop=None):
            out = tmp_path / f"rec-{drop}.json"
            p = run_as_unit(installed, installer, [kvmscope, "-c", str(cfg), "--standalone", "record",
                                                   "--seconds", "1", "--every", "0.5", "-o", str(out)], drop)
            assert p.returncode == 0, p.stderr
            conns = [c for s in read_recording(str(out)) if s.get("storage_tcp")
                     for c in s.get("storage_tcp").connections if c.dport == port]
            assert conns, "the storage connection was seen"
            return {c.pid for c in conns}

        t0 = time.monotonic()
        assert owner() == {client.pid}
        assert owner("CAP_SYS_PTRACE") == {None}
        assert owner("CAP_DAC_READ_SEARCH") == {None}
        print(f"\nowner of the nobody-owned storage connection: pid {client.pid} with the unit's capabilities, "
              f"unknown without CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH ({time.monotonic() - t0:.1f}s)")
    finally:
        client.kill()
        client.wait()
        conn.close()
        srv.close()
