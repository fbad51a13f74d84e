"""Whole `kvmscope doctor` runs on the fixture hosts, compared with golden files, and the exit codes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.fixtures.etc.hosts import make_host

REPO = Path(__file__).resolve().parents[2]


def normalize(text: str, tmp_path: Path) -> str:
    text = text.replace(str(tmp_path), "$TMP").replace(str(REPO), "$REPO")
    return re.sub(r"euid \d+", "euid N", text)


def run_cli(host, *args, monkeypatch):
    import agent.doctor.checks_ebpf as ebpf
    from agent.cli import app, register_commands

    register_commands()

    # the fixture host has bcc; whether this machine has it must not change the golden output
    monkeypatch.setattr(ebpf, "bcc_status", lambda: (True, "bcc at /usr/lib/python3/dist-packages/bcc/__init__.py"))
    return CliRunner().invoke(app, ["-c", str(host["config"]), "doctor", "--from", str(host["recording"]), *args])


@pytest.mark.parametrize("name,code", [("good", 0), ("bad", 3)])
def test_golden_text(name, code, tmp_path, golden, monkeypatch):
    host = make_host(name, tmp_path)
    r = run_cli(host, monkeypatch=monkeypatch)
    assert r.exit_code == code, r.output
    golden(f"doctor-{name}.txt", normalize(r.stdout, tmp_path))


@pytest.mark.parametrize("name", ["good", "bad"])
def test_golden_json(name, tmp_path, golden, monkeypatch):
    host = make_host(name, tmp_path)
    r = run_cli(host, "--json", monkeypatch=monkeypatch)
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["exit_code"] == r.exit_code
    assert set(doc["summary"]) == {"ok", "info", "warning", "problem", "skipped"}
    for res in doc["results"]:
        assert set(res) == {"check", "status", "subject", "finding", "why", "reference", "fix", "values", "error"}
        assert res["reference"], res  # every result cites its reference
    golden(f"doctor-{name}.json", normalize(r.stdout, tmp_path))


def _proc(host, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    return subprocess.run([sys.executable, "-m", "agent", "-c", str(host["config"]), "doctor", *args],
                          capture_output=True, text=True, env=env, timeout=60, cwd=REPO)


def test_exit_codes_of_the_real_process(tmp_path):
    good, bad = make_host("good", tmp_path / "g"), make_host("bad", tmp_path / "b")
    rec_g, rec_b = str(good["recording"]), str(bad["recording"])
    assert _proc(good, "--from", rec_g, "--check", "iscsi_timeouts", "--check", "mtu").returncode == 0
    r = _proc(bad, "--from", rec_b, "--check", "iscsi_timeouts")
    assert r.returncode == 3 and "PROBLEM" in r.stdout
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    r = _proc(good, "--from", str(junk))
    assert r.returncode == 1 and "not a kvmscope recording" in r.stderr and r.stdout == ""
    r = _proc(good, "--from", str(tmp_path / "missing.json"))
    assert r.returncode == 1 and "cannot read" in r.stderr
    r = _proc(good, "--check", "nonsense")
    assert r.returncode == 2 and "unknown check nonsense" in r.stderr


def test_list_and_help_show_every_check():
    r = subprocess.run([sys.executable, "-m", "agent", "doctor", "--list"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert r.returncode == 0
    for name in ("iscsi_timeouts", "nop_out", "single_path", "mtu", "disk_cache", "disk_error_policy",
                 "libiscsi_keepalive", "ebpf_readiness"):
        assert f"{name}: " in r.stdout
    h = subprocess.run([sys.executable, "-m", "agent", "doctor", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    assert "exit codes: 0 all ok/info, 3 warnings or problems found" in h.stdout
