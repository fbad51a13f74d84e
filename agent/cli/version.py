"""`kvmscope version`: versions of kvmscope and of what it runs on."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import typer

from agent import __version__
from agent.cli import app, examples
from agent.cli.common import print_json


def _run_first_line(cmd: list[str], timeout: float = 5.0) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def bcc_version() -> str | None:
    try:
        from bcc.version import __version__ as v  # Debian python3-bpfcc
    except Exception:
        return None
    return str(v)


def libvirt_version() -> str | None:
    """The libvirt library version (python3-libvirt), else `virsh --version`."""
    try:
        import libvirt

        n = libvirt.getVersion()
        return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"
    except Exception:
        return _run_first_line(["virsh", "--version"])


def qemu_version() -> str | None:
    line = _run_first_line(["qemu-system-x86_64", "--version"])
    if not line:
        return None
    m = re.search(r"version (\S+)", line)
    return m.group(1) if m else line


def collect_versions() -> dict[str, str | None]:
    return {
        "kvmscope": __version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "bcc": bcc_version(),
        "libvirt": libvirt_version(),
        "qemu": qemu_version(),
    }


@app.command(epilog=examples("kvmscope version", "kvmscope version --json | jq -r .bcc"))
def version(
    json_out: bool = typer.Option(False, "--json", help="print JSON"),
    short: bool = typer.Option(False, "--short", help="print only kvmscope's version"),
):
    """Print the versions of kvmscope, bcc, the kernel, libvirt and QEMU ("not found" when absent)."""
    if short:
        print(f"kvmscope {__version__}")
        return
    v = collect_versions()
    if json_out:
        print_json(v)
        return
    for k, val in v.items():
        print(f"{k:<9} {val if val else 'not found'}")
