"""The Ansible role (deploy/ansible) applied to this machine over a local
connection: it installs kvmscope from the release bundle, templates the
configuration, runs the agent (this machine has no systemd as PID 1, so the
role's service step uses kvmscope-install's starter, as in containers) and
registers the host in a Prometheus file_sd list that a real Prometheus then
scrapes. A second run changes nothing; a changed threshold restarts the
agent; kvmscope_state=absent removes everything. ansible-lint (production
profile) passes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port, scrape, wait_for

pytestmark = [pytest.mark.ebpf, pytest.mark.slow]
ANSIBLE_DIR = ROOT / "deploy" / "ansible"
HOST = "kvm-lab-01"


def ansible_bin(name: str) -> Path:
    venv = Path(os.environ.get("KVMSCOPE_ANSIBLE_VENV", ROOT / ".venv-ansible"))
    path = venv / "bin" / name
    if not path.exists():
        pytest.fail(f"{path} missing: `make test` installs ansible-core and ansible-lint (deploy/setup.sh --test)")
    return path


def test_ansible_lint_production_profile():
    p = subprocess.run([str(ansible_bin("ansible-lint")), "--offline"], cwd=ANSIBLE_DIR, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PATH=f"{ansible_bin('ansible').parent}:{os.environ['PATH']}"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Profile 'production' was required, and it passed" in p.stdout + p.stderr


def recap(out: str) -> dict[str, int]:
    m = re.search(rf"^{re.escape(HOST)}\s*:\s*(.*)$", out, re.M)
    assert m, out[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m[1])}


def test_role_applies_idempotently_and_registers_with_prometheus(bundle, install_dir, tmp_path):
    inst = install_dir
    tarball = bundle.parent / f"{bundle.name}.tar.gz"
    sd_dir = inst.base / "file_sd"
    variables = {
        "kvmscope_bundle": str(tarball),
        "kvmscope_version": bundle.name.removeprefix("kvmscope-"),
        **{f"kvmscope_{k}": str(v) for k, v in inst.paths.items()},
        "kvmscope_bin_link": "none",
        "kvmscope_cache_dir": str(inst.base / "cache"),
        # the role's default listen address (loopback) is what runs; only the port is the test's
        "kvmscope_metrics_port": inst.port,
        "kvmscope_thresholds": {"slow_ms": 7},
        "kvmscope_prometheus_host": "localhost",
        "kvmscope_file_sd_dir": str(sd_dir),
        "kvmscope_file_sd_labels": {"cluster": "lab"},
        "kvmscope_apt_cache_valid_time": 10 * 365 * 86400,  # packages are there: no apt-get update traffic
    }
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(yaml.safe_dump({"kvm_hosts": {"hosts": {HOST: {
        "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}}}))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE_DIR / "ansible.cfg"), ANSIBLE_HOME=str(tmp_path / "ansible"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")

    def play(**extra) -> tuple[dict, str]:
        vf = tmp_path / "vars.json"
        vf.write_text(json.dumps({**variables, **extra}))
        t0 = time.monotonic()
        p = subprocess.run([str(ansible_bin("ansible-playbook")), "-i", str(inventory), "-e", f"@{vf}",
                            str(ANSIBLE_DIR / "site.yml")], cwd=ANSIBLE_DIR, env=env, capture_output=True,
                           text=True, timeout=600)
        r = recap(p.stdout)
        print(f"\nansible-playbook: {r} in {time.monotonic() - t0:.1f}s")
        assert p.returncode == 0 and r["failed"] == 0 and r["unreachable"] == 0, p.stdout[-5000:] + p.stderr[-2000:]
        return r, p.stdout

    first, _ = play()
    assert first["changed"] > 0
    pid = inst.pid()
    assert pid and Path(f"/proc/{pid}").exists()
    second, out = play()
    assert second["changed"] == 0, out[-5000:]
    assert inst.pid() == pid, "a no-change run must not restart the agent"

    # the templated configuration is what the agent runs with
    conf = yaml.safe_load((inst.paths["config_dir"] / "config.yaml").read_text())
    assert conf["metrics"]["listen"] == f"127.0.0.1:{inst.port}" and conf["diagnose"] == {"slow_ms": 7}
    assert conf["agent"]["hostname"] == HOST
    m = wait_for(lambda: scrape(inst.port), 30, "the role's agent /metrics")
    assert m['kvmscope_collector_success{collector="ebpf_block_io"}'] == 1.0

    # the file_sd entry, scraped by a real Prometheus with the deploy/prometheus relabeling
    entry = json.loads((sd_dir / f"kvmscope-{HOST}.json").read_text())
    assert entry == [{"targets": [f"127.0.0.1:{inst.port}"], "labels": {"host": HOST, "cluster": "lab"}}]
    prom_port = free_port()
    example = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    cfg = {"global": {"scrape_interval": "1s"}, "scrape_configs": [{
        "job_name": "kvmscope", "scrape_interval": "1s", "scrape_timeout": "1s",
        "file_sd_configs": [{"files": [str(sd_dir / "kvmscope-*.json")], "refresh_interval": "1s"}],
        "relabel_configs": example["relabel_configs"]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    try:
        def up():
            q = urllib.parse.urlencode({"query": 'up{job="kvmscope"} == 1'})
            res = json.load(urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/query?{q}", timeout=3))
            return [r["metric"] for r in res["data"]["result"]]
        found = wait_for(up, 60, "Prometheus scraping the registered host", step=1)
        assert found[0]["host"] == HOST and found[0]["cluster"] == "lab"
        assert found[0]["instance"] == f"127.0.0.1:{inst.port}"
    finally:
        prom.terminate()
        prom.wait(30)

    # a changed threshold is templated, validated and applied with a restart
    third, _ = play(kvmscope_thresholds={"slow_ms": 9})
    assert third["changed"] >= 2  # the config file and the restart handler
    assert yaml.safe_load((inst.paths["config_dir"] / "config.yaml").read_text())["diagnose"] == {"slow_ms": 9}
    new_pid = wait_for(lambda: inst.pid() not in (None, pid) and inst.pid(), 30, "the restarted agent")
    assert Path(f"/proc/{new_pid}").exists()

    # a bad value is refused by the template's validation: the running agent keeps its config
    # (by default without showing the file, which may hold credentials; kvmscope_no_log=false shows why)
    vf = tmp_path / "vars.json"
    for no_log in (True, False):
        vf.write_text(json.dumps({**variables, "kvmscope_interval": -1, "kvmscope_no_log": no_log,
                                  "kvmscope_config_extra": {"elasticsearch": {"password": "pa55-in-template"}}}))
        p = subprocess.run([str(ansible_bin("ansible-playbook")), "-i", str(inventory), "-e", f"@{vf}",
                            str(ANSIBLE_DIR / "site.yml")], cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode != 0
        if no_log:
            assert "no_log: true" in p.stdout and "pa55-in-template" not in p.stdout, p.stdout[-3000:]
        else:
            assert "interval" in p.stdout, p.stdout[-3000:]
    assert yaml.safe_load((inst.paths["config_dir"] / "config.yaml").read_text())["agent"]["interval"] == 5
    assert inst.pid() == new_pid

    # a loopback target is never registered with a Prometheus on another host (it would scrape itself)
    vf.write_text(json.dumps({**variables, "kvmscope_prometheus_host": "prometheus.example"}))
    p = subprocess.run([str(ansible_bin("ansible-playbook")), "-i", str(inventory), "-e", f"@{vf}",
                        str(ANSIBLE_DIR / "site.yml")], cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode != 0 and "cannot scrape it" in p.stdout, p.stdout[-3000:]
    assert inst.pid() == new_pid

    # removal, data included
    gone, _ = play(kvmscope_state="absent", kvmscope_purge=True)
    assert gone["changed"] >= 1
    assert not inst.paths["prefix"].exists() and not inst.paths["config_dir"].exists()
    assert not (sd_dir / f"kvmscope-{HOST}.json").exists()
    assert not Path(f"/proc/{new_pid}").exists() or "Z" in Path(f"/proc/{new_pid}/stat").read_text().split()[2]
    shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)
