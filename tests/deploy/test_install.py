"""Install, run, upgrade and remove kvmscope the way a host gets it.

The release bundle is built from this checkout (deploy/dist.py, offline),
installed by deploy/install.py into throw-away directories, and started with
the unit's own ExecStart line under exactly the capability set the unit
declares (setpriv: this machine has no systemd as PID 1). The agent must
become ready (sd_notify READY=1) and serve /metrics with every eBPF probe
attached, from a fresh virtual environment, with the current directory at /.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, scrape, wait_for
from tests.deploy.conftest import build_bundle, wheel

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]
PROBES = ("tcp_retrans", "block_io", "tcp_lifecycle")


def cap_mask(names: list[str]) -> int:
    """Bit mask of capability names, numbered by the kernel's own list (capsh --decode)."""
    mask = 0
    for n in names:
        out = subprocess.run(["capsh", f"--explain={n.lower()}"], capture_output=True, text=True).stdout
        m = re.match(r"\w+ \((\d+)\)", out)
        assert m, f"capsh does not know {n}: {out!r}"
        mask |= 1 << int(m[1])
    return mask


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def test_wheel_carries_the_probe_sources(bundle):
    with zipfile.ZipFile(wheel(bundle)) as z:
        names = set(z.namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("agent/ebpf/probes/")}
    expected = {p.name for p in (ROOT / "probes").iterdir() if p.suffix in (".c", ".h")}
    assert shipped == expected
    for n in ("install.py", "kvmscope.service", "config.example.yaml", "README.md"):
        assert (bundle / n).is_file(), n


def test_install_run_upgrade_uninstall(bundle, install_dir, installer, tmp_path):
    inst = install_dir
    cfg = tmp_path / "config.yaml"
    cfg.write_text(inst.config_text())
    w = wheel(bundle)
    args = ["install", "--wheel", str(w), "--wheelhouse", str(bundle / "wheels"), "--config", str(cfg), "--no-apt",
            *inst.args]

    # fresh install, then the same again: nothing to do
    p = inst.run(*args, script=bundle / "install.py")
    assert inst.result(p) == "installed", p.stderr
    first = inst.manifest()
    assert first["version"] == "0.1.0"
    p = inst.run(*args, script=bundle / "install.py")
    assert inst.result(p) == "unchanged", p.stderr

    prefix = inst.paths["prefix"]
    release = prefix / "releases" / first["release"]
    kvmscope = prefix / "bin" / "kvmscope"
    # the installed package finds its probes inside the release, from any directory
    out = subprocess.run([str(release / "bin" / "python"), "-c",
                          "from agent.ebpf.loader import PROBES_DIR; print(PROBES_DIR)"],
                         capture_output=True, text=True, cwd="/", check=True).stdout.strip()
    assert Path(out).is_relative_to(release), out
    assert (Path(out) / "block_io.bpf.c").is_file()

    # start it as the unit says, without systemd: kvmscope-install service start
    unit_path = inst.paths["unit_dir"] / "kvmscope.service"
    unit = installer.parse_unit(unit_path.read_text())
    declared = installer.unit_capabilities(unit)
    assert unit["Service"]["ExecStart"] == [f"{kvmscope} -c {inst.paths['config_dir'] / 'config.yaml'} run --quiet"]
    helper = prefix / "libexec" / "kvmscope-install"
    p = inst.run("service", "start", *inst.args, script=helper, timeout=120)
    assert inst.result(p) == "started", p.stderr
    pid = inst.pid()
    st = proc_status(pid)
    mask = cap_mask(declared)
    assert int(st["CapEff"], 16) == mask, f"CapEff {st['CapEff']} != unit's {declared}"
    assert int(st["CapBnd"], 16) == mask and int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"] == "1"

    def probes_up():
        m = scrape(inst.port)
        return all(m.get(f'kvmscope_collector_success{{collector="ebpf_{p}"}}') == 1.0
                   and m.get(f'kvmscope_collector_nodata{{collector="ebpf_{p}"}}') == 0.0 for p in PROBES) and m

    m = wait_for(probes_up, 60, "all eBPF probes attached in the installed agent")
    assert any(s.startswith('kvmscope_build_info{') and 'version="0.1.0"' in s for s in m)
    # no CAP_SYS_ADMIN: the probes' own run time is unknown, so it is not exported (not a false 0)
    assert not any(s.startswith("kvmscope_probe_run_time_seconds_total") for s in m)
    assert any(s.startswith("kvmscope_probe_events_total") for s in m)
    assert inst.result(inst.run("service", "start", *inst.args, script=helper)) == "unchanged"

    # the operator's edits and the agent's state survive an upgrade
    conf = inst.paths["config_dir"] / "config.yaml"
    conf.write_text(conf.read_text() + "# edited by the operator\n")
    marker = inst.paths["state_dir"] / "spool" / "keep-me"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("queued documents\n")

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(".git", ".venv*", "dist", "build", "*.egg-info",
                                                            "__pycache__", ".pytest_cache", "spool"))
    init = src / "agent" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.1"'))
    new = build_bundle(src, tmp_path / "dist2")
    p = inst.run("install", "--wheel", str(wheel(new)), "--wheelhouse", str(new / "wheels"), "--no-apt", *inst.args,
                 script=helper, timeout=300)
    assert inst.result(p) == "upgraded", p.stderr
    assert "0.1.0" in p.stderr and "0.1.1" in p.stderr
    second = inst.manifest()
    assert second["version"] == "0.1.1" and second["release"] != first["release"]
    assert (prefix / "current").resolve() == prefix / "releases" / second["release"]
    assert release.is_dir(), "the previous release is kept for rollback"
    new_pid = wait_for(lambda: inst.pid() != pid and inst.pid(), 60, "the agent restarted on the new release")
    m = wait_for(lambda: (lambda m: any(s.startswith('kvmscope_build_info{') and 'version="0.1.1"' in s for s in m) and m)(
        scrape(inst.port)), 60, "the upgraded agent's /metrics")
    assert not Path(f"/proc/{pid}").exists() or proc_status(pid).get("State", "").startswith("Z")
    assert conf.read_text().endswith("# edited by the operator\n")
    assert marker.read_text() == "queued documents\n"
    assert proc_status(new_pid)["NoNewPrivs"] == "1"

    # uninstall keeps config and data; --purge removes them
    p = inst.run("uninstall", *inst.args, script=helper)
    assert inst.result(p) == "removed", p.stderr
    assert not prefix.exists() and not unit_path.exists()
    assert not Path(f"/proc/{new_pid}").exists() or proc_status(new_pid).get("State", "").startswith("Z")
    assert conf.is_file() and marker.is_file()
    p = inst.run("uninstall", "--purge", *inst.args)
    assert inst.result(p) == "purged", p.stderr
    for k in ("config_dir", "state_dir", "log_dir"):
        assert not inst.paths[k].exists(), k
    assert inst.result(inst.run("uninstall", *inst.args)) == "unchanged"


def test_bad_config_is_refused_before_the_switch(bundle, install_dir):
    inst = install_dir
    good = bundle.parent / "good.yaml"
    good.write_text(inst.config_text())
    base = ["install", "--wheel", str(wheel(bundle)), "--wheelhouse", str(bundle / "wheels"), "--no-apt", *inst.args]
    assert inst.result(inst.run(*base, "--config", str(good))) == "installed"
    before = inst.manifest()
    bad = bundle.parent / "bad.yaml"
    bad.write_text("agent:\n  interval: -3\n")
    p = inst.run(*base, "--config", str(bad), check=False)
    assert p.returncode == 1 and inst.result(p) == "failed"
    assert "interval" in p.stderr and "config" in p.stderr
    assert inst.manifest() == before


def test_install_errors_are_clear(install_dir, tmp_path):
    inst = install_dir
    p = inst.run("install", "--wheel", str(tmp_path / "nope.whl"), "--no-apt", *inst.args, check=False)
    assert p.returncode == 1 and "nope.whl" in p.stderr and "Traceback" not in p.stderr
    junk = tmp_path / "kvmscope-9.9-py3-none-any.whl"
    junk.write_bytes(b"not a zip")
    p = inst.run("install", "--wheel", str(junk), "--no-apt", *inst.args, check=False)
    assert p.returncode == 1 and "not a readable wheel" in p.stderr
    p = inst.run("service", "start", *inst.args, check=False)
    assert p.returncode == 1 and "install first" in p.stderr
    p = inst.run("frobnicate", check=False)
    assert p.returncode == 2


def test_config_files_are_never_readable_by_others_not_even_before_the_chmod(installer, tmp_path, monkeypatch):
    """write_if_changed: the mode of the temporary file whenever it is (re)moded, and at the end."""
    import os

    seen = []
    real_chmod, real_fchmod = Path.chmod, os.fchmod
    monkeypatch.setattr(Path, "chmod", lambda p, m, **kw: (seen.append(p.stat().st_mode & 0o777), real_chmod(p, m, **kw))[1])
    monkeypatch.setattr(os, "fchmod", lambda fd, m: (seen.append(os.fstat(fd).st_mode & 0o777), real_fchmod(fd, m))[1])
    old = os.umask(0o022)
    try:
        target = tmp_path / "etc" / "config.yaml"
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / ".config.yaml.tmp").write_text("stale, world-readable")  # left by a crash
        assert installer.write_if_changed(target, "password: s3cret\n", 0o640)
    finally:
        os.umask(old)
    assert seen, "the mode was never set"
    assert all(m & 0o037 == 0 for m in seen), [oct(m) for m in seen]
    assert target.stat().st_mode & 0o777 == 0o640 and target.read_text() == "password: s3cret\n"


def test_the_config_candidate_is_private_while_it_is_checked(bundle, install_dir):
    """A real install: watch the configuration directory while the new release checks the candidate."""
    import os
    import threading
    import time

    inst = install_dir
    cfg = bundle.parent / "secret.yaml"
    cfg.write_text(inst.config_text())
    cfg.chmod(0o600)
    etc = inst.paths["config_dir"]
    modes: dict[str, set] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                names = os.listdir(etc)
            except FileNotFoundError:
                names = []
            for n in names:
                try:
                    modes.setdefault(n, set()).add(os.stat(etc / n).st_mode & 0o777)
                except FileNotFoundError:
                    pass
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        p = inst.run("install", "--wheel", str(wheel(bundle)), "--wheelhouse", str(bundle / "wheels"),
                     "--config", str(cfg), "--no-apt", *inst.args)
    finally:
        stop.set()
        t.join(5)
    assert inst.result(p) == "installed"
    assert ".config.yaml.candidate" in modes, f"the watcher never saw the candidate: {modes}"
    assert all(m & 0o077 == 0 for m in modes[".config.yaml.candidate"]), modes
    assert all(m & 0o007 == 0 for n, ms in modes.items() if "config" in n for m in ms), modes
