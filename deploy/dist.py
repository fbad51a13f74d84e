#!/usr/bin/python3
"""Build a kvmscope release bundle for hosts (and Ansible) to install from.

  dist/kvmscope-<version>/
      install.py              deploy/install.py (kvmscope-install)
      kvmscope.service        the systemd unit template
      config.example.yaml     every configuration key and its default
      README.md
      wheels/                 kvmscope-<version>-py3-none-any.whl and every dependency wheel
  dist/kvmscope-<version>.tar.gz

The bundle installs offline:
  tar xzf kvmscope-0.1.0.tar.gz && kvmscope-0.1.0/install.py install \\
      --wheel kvmscope-0.1.0/wheels/kvmscope-0.1.0-py3-none-any.whl --wheelhouse kvmscope-0.1.0/wheels

Dependency wheels come from the package index (pip download), or only from
--find-links DIR with --offline.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"dist: {what} failed (exit {p.returncode}): {' '.join(cmd)}\n{(p.stderr or p.stdout)[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "dist"), help="output directory (default: dist/)")
    ap.add_argument("--python", default=sys.executable, help="interpreter whose pip builds and downloads")
    ap.add_argument("--find-links", metavar="DIR", help="look for dependency wheels here first")
    ap.add_argument("--offline", action="store_true", help="no package index: dependencies only from --find-links")
    a = ap.parse_args(argv)

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    m = re.search(r'^__version__ = "([^"]+)"', (ROOT / "agent" / "__init__.py").read_text(), re.M)
    if not m:
        sys.exit("dist: no __version__ in agent/__init__.py")
    version = m[1]
    out = Path(a.out).resolve()
    bundle = out / f"kvmscope-{version}"
    wheels = bundle / "wheels"
    if bundle.exists():
        shutil.rmtree(bundle)
    wheels.mkdir(parents=True)
    print(f"dist: building kvmscope {version} wheel", file=sys.stderr)
    build = ROOT / "build"
    sh([a.python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check", "-q",
        "-w", str(wheels), str(ROOT)], "building the wheel")
    shutil.rmtree(build, ignore_errors=True)
    print(f"dist: collecting {len(deps)} dependencies and theirs", file=sys.stderr)
    dl = [a.python, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--only-binary=:all:",
          "-d", str(wheels)]
    if a.find_links:
        dl += ["--find-links", str(Path(a.find_links).resolve())]
    if a.offline:
        if not a.find_links:
            sys.exit("dist: --offline needs --find-links DIR")
        dl.append("--no-index")
    sh(dl + deps, "downloading dependency wheels")
    for src, name in ((ROOT / "deploy" / "install.py", "install.py"),
                      (ROOT / "deploy" / "systemd" / "kvmscope.service", "kvmscope.service"),
                      (ROOT / "deploy" / "config.example.yaml", "config.example.yaml"),
                      (ROOT / "README.md", "README.md")):
        shutil.copy2(src, bundle / name)
    (bundle / "install.py").chmod(0o755)
    tar = out / f"kvmscope-{version}.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(bundle, arcname=bundle.name)
    n = len(list(wheels.glob("*.whl")))
    print(f"dist: {bundle} ({n} wheels) and {tar}", file=sys.stderr)
    print(tar)
    return 0


if __name__ == "__main__":
    sys.exit(main())
