"""The systemd unit: accepted by systemd-analyze, its exposure score, and its
hardening applied for real to the agent with its eBPF probes.

This machine has no systemd as PID 1, so tests/deploy/sandbox_exec.py applies
the unit's options with the kernel mechanisms systemd itself uses:
ProtectSystem=strict + ReadWritePaths (read-only bind remounts), ProtectHome
(empty mode-000 tmpfs), PrivateTmp (fresh tmpfs), ProtectKernelTunables and
ProtectControlGroups (/proc/sys and /sys read-only), MemoryDenyWriteExecute
(prctl PR_SET_MDWE), SystemCallFilter + SystemCallErrorNumber=EPERM and
RestrictAddressFamilies (a libseccomp filter built from systemd-analyze's own
syscall groups), then CapabilityBoundingSet + NoNewPrivileges (setpriv).
Not emulated: the cgroup options (DevicePolicy/DeviceAllow, MemoryMax,
CPUQuota) and the seccomp filters of RestrictNamespaces, RestrictRealtime,
RestrictSUIDSGID, LockPersonality, ProtectClock and ProtectHostname, which
block calls the agent never makes.

Two controls show the emulation bites, and why the unit leaves
ProtectKernelModules= out and lists `bpf` in SystemCallFilter=.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, scrape, wait_for

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]
SANDBOX = Path(__file__).with_name("sandbox_exec.py")
PROBES = ("tcp_retrans", "block_io", "tcp_lifecycle")
README = ROOT / "README.md"


@pytest.fixture
def installed(bundle, install_dir):
    install_dir.install_bundle(bundle)
    return install_dir


def unit_of(inst, installer) -> dict:
    return installer.parse_unit((inst.paths["unit_dir"] / "kvmscope.service").read_text())


def spec_from_unit(unit: dict, **override) -> dict:
    svc = {k: " ".join(v) for k, v in unit["Service"].items()}
    yes = lambda k: svc.get(k, "no") in ("yes", "true", "1", "on")  # noqa: E731
    rw = svc.get("ReadWritePaths", "").split()
    rw += [f"/var/lib/{d}" for d in svc.get("StateDirectory", "").split()]
    rw += [f"/var/log/{d}" for d in svc.get("LogsDirectory", "").split()]
    rw += [f"/var/cache/{d}" for d in svc.get("CacheDirectory", "").split()]
    rw += [f"/run/{d}" for d in svc.get("RuntimeDirectory", "").split()]
    spec = {
        "read_only_all": svc.get("ProtectSystem") == "strict",
        "read_write": [p for p in rw if os.path.isdir(p)],
        "inaccessible": ["/home", "/root", "/run/user"] if svc.get("ProtectHome") == "yes" else [],
        "private_tmp": yes("PrivateTmp"),
        "kernel_tunables": yes("ProtectKernelTunables") or yes("ProtectControlGroups"),
        "mdwe": yes("MemoryDenyWriteExecute"),
        "syscalls": svc["SystemCallFilter"].split() if "SystemCallFilter" in svc else None,
        "address_families": svc["RestrictAddressFamilies"].split() if "RestrictAddressFamilies" in svc else None,
    }
    assert svc.get("SystemCallErrorNumber") == "EPERM", "the emulation returns EPERM like the unit says"
    spec.update(override)
    return spec


def sandboxed(unit: dict, installer, argv: list[str], spec: dict) -> list[str]:
    return (["unshare", "--mount", "--propagation", "private", "--", "/usr/bin/python3", str(SANDBOX),
             "--spec", json.dumps(spec), "--"] + installer.setpriv_argv(unit) + argv)


def unit_env(unit, installer) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    env.update(installer.unit_environment(unit))
    return env


def test_systemd_analyze_verify_accepts_the_unit(installed):
    unit = installed.paths["unit_dir"] / "kvmscope.service"
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (p.stdout + p.stderr).splitlines() if "kvmscope" in ln]
    assert p.returncode == 0 and not problems, p.stdout + p.stderr


def test_security_exposure_is_low_and_documented(installed):
    unit = installed.paths["unit_dir"] / "kvmscope.service"
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for kvmscope\.service: (\d+\.\d+) (\w+)", p.stdout)
    assert m, p.stdout + p.stderr
    score = float(m[1])
    print(f"\nsystemd-analyze security: {score} {m[2]}")
    assert score <= 4.0, p.stdout
    # also for the unit as shipped (default paths: StateDirectory= etc. instead of ReadWritePaths=)
    shipped = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                              str(ROOT / "deploy" / "systemd" / "kvmscope.service")],
                             capture_output=True, text=True, timeout=60).stdout
    m2 = re.search(r"Overall exposure level for kvmscope\.service: (\d+\.\d+) (\w+)", shipped)
    assert m2, shipped
    assert f"exposure level {m2[1]} {m2[2]}" in README.read_text(), \
        f"README must state the measured score: exposure level {m2[1]} {m2[2]}"


def test_agent_runs_with_probes_under_the_units_sandbox(installed, installer, tmp_path):
    unit = unit_of(installed, installer)
    argv = installer.exec_line(unit["Service"]["ExecStart"][-1])
    installed.paths["run_dir"].mkdir(exist_ok=True)  # what RuntimeDirectory=/kvmscope-install make
    spec = spec_from_unit(unit)
    notify = installed.base / "notify.sock"  # not in /tmp: PrivateTmp= hides the test's /tmp from the agent
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.5)
    env = unit_env(unit, installer)
    env["NOTIFY_SOCKET"] = str(notify)
    log = open(tmp_path / "agent.log", "wb")
    os.chmod(tmp_path, 0o755)
    proc = subprocess.Popen(sandboxed(unit, installer, argv, spec), stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd="/", umask=int(unit["Service"]["UMask"][-1], 8))
    try:
        ready = None
        end = time.monotonic() + 90
        while time.monotonic() < end and proc.poll() is None and ready is None:
            try:
                data = sock.recv(4096).decode()
            except socket.timeout:
                continue
            ready = data if "READY=1" in data.splitlines() else None
        assert ready, f"no READY=1 (exit {proc.poll()}):\n{(tmp_path / 'agent.log').read_text()[-3000:]}"

        agent = _agent_pid(proc.pid)
        status = Path(f"/proc/{agent}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "seccomp filter in force"
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
        mounts = {ln.split()[4]: ln for ln in Path(f"/proc/{agent}/mountinfo").read_text().splitlines()}
        assert " ro," in mounts["/"] or mounts["/"].split()[5].startswith("ro"), mounts["/"]
        assert "tmpfs" in mounts["/tmp"]
        assert mounts["/proc/sys"].split()[5].startswith("ro")

        def healthy():
            m = scrape(installed.port)
            ok = all(m.get(f'kvmscope_collector_success{{collector="ebpf_{p}"}}') == 1.0 and
                     m.get(f'kvmscope_collector_nodata{{collector="ebpf_{p}"}}') == 0.0 for p in PROBES)
            ok = ok and all(m.get(f'kvmscope_collector_success{{collector="{c}"}}') == 1.0
                            for c in ("host_tcp", "storage_tcp", "block_devices", "net_ifaces", "storage_log"))
            return ok and m

        m = wait_for(healthy, 60, "probes attached and every source healthy in the sandbox")
        assert m["kvmscope_shipping_file_documents_total"] > 0  # writes to its ReadWritePaths work
        out = installed.paths["log_dir"] / "kvmscope.ndjson"
        assert out.stat().st_size > 0
        # the local API on its root-only socket in the run directory, attachable from outside the sandbox
        from agent.api import fetch_snapshots

        api_sock = installed.paths["run_dir"] / "api.sock"
        assert oct(api_sock.lstat().st_mode & 0o777) == "0o600"
        assert fetch_snapshots(str(api_sock), last=1)[0][0].host_tcp is not None
        print(f"\nunder the unit's sandbox: {ready.strip()!r}; probes attached; "
              f"{int(m['kvmscope_shipping_file_documents_total'])} documents written to {out}")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        sock.close()
        log.close()


def _agent_pid(top: int) -> int:
    """The kvmscope process under unshare -> python sandbox -> setpriv (exec chain: same pid or child)."""
    def kids(pid):
        try:
            return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []
    todo = [top]
    while todo:
        pid = todo.pop()
        try:
            if b"kvmscope" in Path(f"/proc/{pid}/cmdline").read_bytes() and b"sandbox_exec" not in Path(
                    f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
        todo += kids(pid)
    raise AssertionError("agent process not found")


def probes_check(installed, installer, spec) -> tuple[int, dict]:
    unit = unit_of(installed, installer)
    kvmscope = str(installed.paths["prefix"] / "bin" / "kvmscope")
    argv = [kvmscope, "-c", str(installed.paths["config_dir"] / "config.yaml"), "--standalone", "probes", "--json",
            "--seconds", "0"]
    p = subprocess.run(sandboxed(unit, installer, argv, spec), capture_output=True, text=True,
                       env=unit_env(unit, installer), cwd="/", timeout=120)
    try:
        return p.returncode, {x["name"]: x for x in json.loads(p.stdout)["probes"]}
    except (ValueError, KeyError):
        raise AssertionError(f"exit {p.returncode}: {p.stdout[-2000:]} {p.stderr[-2000:]}") from None


def test_controls_protect_kernel_modules_and_no_bpf_syscall_break_the_probes(installed, installer):
    unit = unit_of(installed, installer)
    base = spec_from_unit(unit)
    _, ok = probes_check(installed, installer, base)
    # the libiscsi uprobes need CAP_SYS_ADMIN, which the unit does not grant (README, test_capabilities.py)
    assert {n: p["state"] for n, p in ok.items()} == {**{n: "attached" for n in PROBES}, "libiscsi": "failed"}, ok
    assert "CAP_SYS_ADMIN" in ok["libiscsi"]["reason"], ok["libiscsi"]

    # ProtectKernelModules=yes makes /usr/lib/modules inaccessible: bcc loses the kernel headers
    _, hidden = probes_check(installed, installer, dict(base, inaccessible=base["inaccessible"] + ["/usr/lib/modules"]))
    for name, p in hidden.items():
        assert p["state"] != "attached", name
        assert "header" in json.dumps(p).lower(), p
    # without `bpf` in SystemCallFilter= the filter refuses bpf(2): nothing loads
    filt = [s for s in base["syscalls"] if s != "bpf"]
    _, nobpf = probes_check(installed, installer, dict(base, syscalls=filt))
    assert all(p["state"] != "attached" for p in nobpf.values()), nobpf
