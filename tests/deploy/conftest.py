"""Fixtures for the deployment tests: a release bundle built offline from this
checkout, and installations into throw-away directories.

Installations live under /var/cache/kvmscope/test-deploy-*, not /tmp: the
unit's PrivateTmp= gives the sandboxed agent its own empty /tmp.
Dependency wheels come from /var/cache/kvmscope/wheels, which
`deploy/setup.sh --test` fills (tests make no network traffic).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_for

WHEELS = Path(os.environ.get("KVMSCOPE_WHEELHOUSE", "/var/cache/kvmscope/wheels"))
INSTALL = ROOT / "deploy" / "install.py"
CACHE = Path("/var/cache/kvmscope")


def load_installer():
    spec = importlib.util.spec_from_file_location("kvmscope_install", INSTALL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def installer():
    return load_installer()


def need_root():
    if os.geteuid() != 0:
        pytest.skip("deployment tests install into /var/cache and start the agent with capabilities: need root")




def build_bundle(src: Path, out: Path) -> Path:
    """deploy/dist.py, offline (dependency wheels from the cache). Returns the bundle directory."""
    if not any(WHEELS.glob("*.whl")):
        pytest.fail(f"no dependency wheels in {WHEELS}: run `make test` (deploy/setup.sh --test fills it)")
    p = subprocess.run([sys.executable, str(src / "deploy" / "dist.py"), "--out", str(out),
                        "--find-links", str(WHEELS), "--offline"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    tar = Path(p.stdout.strip().splitlines()[-1])
    return tar.with_name(tar.name.removesuffix(".tar.gz"))


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(ROOT, tmp_path_factory.mktemp("dist"))


class Install:
    """One throw-away installation: every directory kvmscope-install writes is under `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.port = free_port()
        self.paths = {
            "prefix": base / "opt", "config_dir": base / "etc", "state_dir": base / "lib",
            "log_dir": base / "log", "unit_dir": base / "units", "run_dir": base / "run",
        }

    @property
    def args(self) -> list[str]:
        return [a for k, v in self.paths.items() for a in ("--" + k.replace("_", "-"), str(v))] + ["--bin-link", "none"]

    def config_text(self, extra: str = "") -> str:
        return (f"metrics:\n  listen: 127.0.0.1:{self.port}\n"
                f"api:\n  socket: {self.paths['run_dir'] / 'api.sock'}\n"
                f"elasticsearch:\n  spool_dir: {self.paths['state_dir'] / 'spool'}\n"
                f"storage_log:\n  state_dir: {self.paths['state_dir'] / 'storage_log'}\n"
                f"file_output:\n  enabled: true\n  path: {self.paths['log_dir'] / 'kvmscope.ndjson'}\n" + extra)

    def install_bundle(self, bundle: Path) -> None:
        """Install the bundle's wheel offline with this test's configuration (free metrics port)."""
        cfg = self.base / "config.candidate.yaml"
        cfg.write_text(self.config_text())
        p = self.run("install", "--wheel", str(wheel(bundle)), "--wheelhouse", str(bundle / "wheels"),
                     "--config", str(cfg), "--no-apt", *self.args)
        assert self.result(p) == "installed", p.stderr

    def run(self, *args: str, script: Path | None = None, check: bool = True, timeout: float = 300):
        cmd = ["/usr/bin/python3", str(script or INSTALL), *args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")
        if check:
            assert p.returncode == 0, f"{' '.join(cmd)}\nstdout: {p.stdout}\nstderr: {p.stderr}"
        return p

    @staticmethod
    def result(p) -> str:
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT: ")]
        assert lines, f"no RESULT line in {p.stdout!r} / {p.stderr!r}"
        return lines[-1].split()[1]

    def pid(self) -> int | None:
        try:
            return int((self.paths["run_dir"] / "kvmscope.pid").read_text())
        except (OSError, ValueError):
            return None

    def manifest(self) -> dict:
        return json.loads((self.paths["prefix"] / "install.json").read_text())

    def stop(self):
        pid = self.pid()
        if pid:
            try:
                os.kill(pid, 15)
                wait_for(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 30, f"pid {pid} to stop")
            except ProcessLookupError:
                pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wheel(bundle: Path) -> Path:
    return next((bundle / "wheels").glob("kvmscope-*.whl"))


def new_install():
    """An Install in a fresh directory; yields it, then stops its agent and removes everything."""
    need_root()
    CACHE.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="test-deploy-", dir=CACHE))
    base.chmod(0o755)
    inst = Install(base)
    yield inst
    inst.stop()
    shutil.rmtree(base, ignore_errors=True)


install_dir = pytest.fixture(new_install, name="install_dir")
