#!/usr/bin/python3
"""kvmscope-install: install, upgrade and remove kvmscope on a Debian/Ubuntu KVM host.

Standard library only: it runs before any kvmscope virtual environment exists.
It is copied into the installation (PREFIX/libexec/kvmscope-install), so
upgrade and uninstall do not need the checkout.

Layout (defaults):
  /opt/kvmscope/releases/<version>-<wheel sha>/   one virtual environment per release
  /opt/kvmscope/current -> releases/...           flipped atomically on upgrade
  /opt/kvmscope/bin/kvmscope                      -> current/bin/kvmscope
  /opt/kvmscope/libexec/kvmscope-install          this script
  /opt/kvmscope/share/                            unit template, example config, docs
  /etc/kvmscope/config.yaml                       written once, never overwritten
  /var/lib/kvmscope/                              spool and log read positions
  /var/log/kvmscope/                              file output, agent.log (no systemd)
  /etc/systemd/system/kvmscope.service

The last line of every command is ``RESULT: <word>`` (installed, upgraded,
unchanged, removed, started, stopped, ...), for configuration managers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULTS = {
    "prefix": "/opt/kvmscope",
    "config_dir": "/etc/kvmscope",
    "state_dir": "/var/lib/kvmscope",
    "log_dir": "/var/log/kvmscope",
    "unit_dir": "/etc/systemd/system",
    "run_dir": "/run/kvmscope",
    "bin_link": "/usr/local/sbin/kvmscope",
}
UNIT_NAME = "kvmscope.service"
# Debian packages the agent needs beside its wheel: the venv module, the real
# bcc (not PyPI's "bcc") and libvirt bindings, reached through system site packages.
PACKAGES = ["python3-venv", "python3-bpfcc", "python3-libvirt", "iproute2"]
BUILD_PACKAGES = ["python3-setuptools", "python3-wheel"]  # only to build a wheel from a checkout


class InstallError(Exception):
    pass


def say(text: str) -> None:
    print(f"kvmscope-install: {text}", file=sys.stderr, flush=True)


def result(word: str, **extra) -> None:
    tail = "".join(f" {k}={v}" for k, v in extra.items())
    print(f"RESULT: {word}{tail}", flush=True)


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise InstallError(f"{what}: {cmd[0]} not found") from None
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
        raise InstallError(f"{what} failed (exit {p.returncode}): {' '.join(cmd)}\n{tail}")
    return p


def systemd_running() -> bool:
    """True when systemd is PID 1 (not in containers or on this kind of CI machine)."""
    return Path("/run/systemd/system").is_dir()


# -- locations ------------------------------------------------------------------

class Layout:
    def __init__(self, a: argparse.Namespace):
        self.prefix = Path(a.prefix)
        self.config_dir = Path(a.config_dir)
        self.state_dir = Path(a.state_dir)
        self.log_dir = Path(a.log_dir)
        self.unit_dir = Path(a.unit_dir)
        self.run_dir = Path(a.run_dir)
        self.bin_link = None if a.bin_link in ("", "none") else Path(a.bin_link)

    releases = property(lambda s: s.prefix / "releases")
    current = property(lambda s: s.prefix / "current")
    manifest = property(lambda s: s.prefix / "install.json")
    config = property(lambda s: s.config_dir / "config.yaml")
    unit = property(lambda s: s.unit_dir / UNIT_NAME)
    share = property(lambda s: s.prefix / "share")
    pidfile = property(lambda s: s.run_dir / "kvmscope.pid")

    def is_default(self, key: str) -> bool:
        return str(getattr(self, key)) == DEFAULTS[key]


def find_asset(name: str, *candidates: Path) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    raise InstallError(f"cannot find {name} (looked in {', '.join(str(c.parent) for c in candidates)})")


def unit_template() -> Path:
    return find_asset(UNIT_NAME, HERE / UNIT_NAME, HERE / "systemd" / UNIT_NAME, HERE.parent / "share" / UNIT_NAME)


def example_config() -> Path:
    n = "config.example.yaml"
    return find_asset(n, HERE / n, HERE.parent / "share" / n)


def load_manifest(lay: Layout) -> dict:
    try:
        return json.loads(lay.manifest.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise InstallError(f"{lay.manifest} is unreadable ({e}); remove it to reinstall from scratch") from None


# -- the unit file ------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: sections, repeated keys kept in order, backslash continuation."""
    sections: dict[str, dict[str, list[str]]] = {}
    cur = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            cur = sections.setdefault(line[1:-1], {})
            continue
        if cur is None or "=" not in line:
            raise InstallError(f"unit file: cannot parse line {raw!r}")
        k, v = line.split("=", 1)
        cur.setdefault(k.strip(), []).append(v.strip())
    return sections


def render_unit(lay: Layout) -> str:
    text = unit_template().read_text()
    text = text.replace("/etc/kvmscope/config.yaml", str(lay.config))
    text = text.replace(DEFAULTS["prefix"], str(lay.prefix))
    # StateDirectory= and friends only name directories under /var/lib, /var/log, /etc, /run.
    dirs = {"ConfigurationDirectory": "config_dir", "StateDirectory": "state_dir", "LogsDirectory": "log_dir",
            "RuntimeDirectory": "run_dir"}
    rw = []
    for opt, key in dirs.items():
        if not lay.is_default(key):
            text = re.sub(rf"^{opt}(Mode)?=.*\n", "", text, flags=re.M)
            if key != "config_dir":
                rw.append(str(getattr(lay, key)))
    if rw:
        text = text.replace("UMask=", f"ReadWritePaths={' '.join(rw)}\nUMask=", 1)
    return text


def exec_line(value: str) -> list[str]:
    """An Exec*= value as argv (systemd's prefixes '-', '@', ':', '+', '!' are not used by our unit)."""
    argv = shlex.split(value)
    if not argv or argv[0][0] in "-@:+!":
        raise InstallError(f"unit file: unsupported Exec line {value!r}")
    return argv


def unit_capabilities(unit: dict) -> list[str]:
    caps = " ".join(unit.get("Service", {}).get("CapabilityBoundingSet", [])).split()
    bad = [c for c in caps if not re.fullmatch(r"CAP_[A-Z_]+", c)]
    if bad or any(c.startswith("~") for c in caps):
        raise InstallError(f"unit file: unsupported CapabilityBoundingSet entries {bad}")
    return caps


def setpriv_argv(unit: dict) -> list[str]:
    """The setpriv(1) prefix that applies the unit's privileges without systemd:
    the capability bounding set (root then holds exactly those capabilities),
    no inheritable or ambient capabilities, and no_new_privs."""
    svc = unit.get("Service", {})
    user = (svc.get("User") or ["root"])[-1]
    if user not in ("root", "0"):
        raise InstallError(f"unit file: User={user} is not supported by the non-systemd starter")
    caps = ",".join("+" + c[4:].lower() for c in unit_capabilities(unit))
    argv = ["setpriv", "--bounding-set", "-all" + ("," + caps if caps else ""), "--inh-caps", "-all",
            "--ambient-caps", "-all"]
    if (svc.get("NoNewPrivileges") or ["no"])[-1] in ("yes", "true", "1", "on"):
        argv.append("--no-new-privs")
    return argv + ["--"]


def unit_environment(unit: dict) -> dict[str, str]:
    env = {}
    for value in unit.get("Service", {}).get("Environment", []):
        for item in shlex.split(value):
            k, _, v = item.partition("=")
            env[k] = v
    return env


def seconds(value: str, default: float) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m|h)?", value or "")
    if not m:
        return default
    return float(m[1]) * {"ms": 0.001, "s": 1, None: 1, "min": 60, "m": 60, "h": 3600}[m[2]]


# -- install / upgrade ---------------------------------------------------------------

def ensure_packages(names: list[str], allow_apt: bool) -> None:
    missing = []
    for p in names:
        q = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        if "install ok installed" not in q.stdout:
            missing.append(p)
    if not missing:
        return
    if not allow_apt:
        raise InstallError(f"missing Debian packages: {' '.join(missing)} (apt-get install them, or drop --no-apt)")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    p = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                       capture_output=True, text=True, env=env)
    if p.returncode != 0:
        run(["apt-get", "update", "-q"], "apt-get update", env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], "apt-get install", env=env)


def check_kernel_headers() -> None:
    kver = os.uname().release
    if Path(f"/lib/modules/{kver}/build/include").is_dir() or Path("/sys/kernel/kheaders.tar.xz").exists():
        return
    say(f"warning: no kernel headers for {kver} (/lib/modules/{kver}/build): the eBPF probes will report "
        f"'unavailable' until linux-headers-{kver} is installed; everything else works")


def build_wheel(source: Path, out: Path, python: str) -> Path:
    if not (source / "pyproject.toml").is_file():
        raise InstallError(f"{source} is not a kvmscope checkout (no pyproject.toml); give --wheel")
    say(f"building the wheel from {source}")
    with tempfile.TemporaryDirectory(prefix="kvmscope-build-") as tmp:
        # a copy: building writes build/ and *.egg-info next to the sources
        src = Path(tmp) / "src"
        # symlinks stay links: the checkout's captured sysfs trees (tests/fixtures) loop through theirs
        shutil.copytree(source, src, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
        # pip from a throw-away venv (python3-pip need not be installed); setuptools and
        # wheel from the system (python3-setuptools, python3-wheel): no package index needed
        env = Path(tmp) / "buildenv"
        run([python, "-m", "venv", "--system-site-packages", str(env)], "creating a build environment")
        run([str(env / "bin" / "python"), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--disable-pip-version-check", "-q", "-w", str(out), str(src)], "building the wheel")
    wheels = sorted(out.glob("kvmscope-*.whl"))
    if not wheels:
        raise InstallError(f"no wheel was built in {out}")
    return wheels[-1]


def wheel_version(wheel: Path) -> str:
    m = re.fullmatch(r"kvmscope-([^-]+)-.*\.whl", wheel.name)
    if not m:
        raise InstallError(f"{wheel.name} is not a kvmscope wheel")
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise InstallError(f"{wheel}: not a readable wheel ({e})") from None
    if not any(n.startswith("agent/ebpf/probes/") and n.endswith(".bpf.c") for n in names):
        raise InstallError(f"{wheel.name} carries no probe sources (agent/ebpf/probes/*.bpf.c): rebuild it")
    return m[1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def create_file(path: Path, text: str, mode: int) -> None:
    """Write ``path`` afresh, with ``mode`` from its first byte on (a configuration may hold
    secrets: it is never readable by others, not even for the moment between write and chmod)."""
    path.unlink(missing_ok=True)  # O_CREAT keeps an existing file's mode: start from no file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o700)
    try:
        os.fchmod(fd, mode)  # the exact mode, whatever the umask (still empty here)
        with os.fdopen(fd, "w", closefd=False) as f:
            f.write(text)
    finally:
        os.close(fd)


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    create_file(tmp, text, mode)
    os.replace(tmp, path)
    return True


def default_config_text(lay: Layout) -> str:
    if all(lay.is_default(k) for k in ("state_dir", "log_dir")):
        return example_config().read_text()
    return (
        "# Written by kvmscope-install for non-default directories. Every key and its\n"
        f"# default: {lay.share / 'config.example.yaml'}\n"
        "elasticsearch:\n"
        f"  spool_dir: {lay.state_dir / 'spool'}\n"
        "storage_log:\n"
        f"  state_dir: {lay.state_dir / 'storage_log'}\n"
        "file_output:\n"
        f"  path: {lay.log_dir / 'kvmscope.ndjson'}\n"
    )


def cmd_install(a: argparse.Namespace) -> None:
    lay = Layout(a)
    if os.geteuid() != 0:
        raise InstallError("run as root (it writes /opt, /etc, /var/lib and the systemd unit)")
    if sys.version_info < (3, 11):
        raise InstallError(f"kvmscope needs Python >= 3.11; {sys.executable} is {sys.version.split()[0]}")
    ensure_packages(PACKAGES + ([] if a.wheel else BUILD_PACKAGES), allow_apt=not a.no_apt)
    check_kernel_headers()
    python = "/usr/bin/python3"  # the interpreter bcc and libvirt are packaged for
    changes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="kvmscope-install-") as tmp:
        wheel = Path(a.wheel).resolve() if a.wheel else build_wheel(Path(a.source).resolve(), Path(tmp), python)
        if not wheel.is_file():
            raise InstallError(f"--wheel {wheel}: no such file")
        version = wheel_version(wheel)
        digest = sha256(wheel)
        release = lay.releases / f"{version}-{digest[:12]}"
        old = load_manifest(lay)

        if not (release / ".complete").exists():
            if release.exists():
                shutil.rmtree(release)  # a half-made release from an interrupted run
            say(f"creating release {release.name} (kvmscope {version})")
            run([python, "-m", "venv", "--system-site-packages", str(release)], "creating the virtual environment")
            pip = [str(release / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                   "--no-warn-script-location"]
            if a.wheelhouse:
                pip += ["--no-index", "--find-links", str(Path(a.wheelhouse).resolve())]
            run(pip + [str(wheel)], "installing the wheel" + ("" if a.wheelhouse else " (dependencies from the package index)"))
            run([str(release / "bin" / "kvmscope"), "version", "--short"], "checking the new release", cwd="/")
            (release / ".complete").write_text(f"{version} {digest}\n")
            changes.append("release")

    # configuration: written once, then it belongs to the operator (or Ansible)
    # (checked by the new release before anything is written or switched)
    lay.config_dir.mkdir(parents=True, exist_ok=True)
    if a.config:
        try:
            wanted = Path(a.config).read_text()
        except OSError as e:
            raise InstallError(f"--config {a.config}: {e.strerror}") from None
    else:
        wanted = lay.config.read_text() if lay.config.exists() else default_config_text(lay)
    candidate = lay.config_dir / ".config.yaml.candidate"
    create_file(candidate, wanted, 0o600)
    try:
        run([str(release / "bin" / "kvmscope"), "config", "check", str(candidate)],
            f"checking the configuration ({a.config or lay.config}) with kvmscope {version}", cwd="/")
    finally:
        candidate.unlink(missing_ok=True)
    if write_if_changed(lay.config, wanted, 0o640):
        changes.append("config")
    for d in (lay.state_dir, lay.log_dir):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o750)

    # shared files, the command links, then the atomic flip to the new release
    share = {UNIT_NAME: unit_template(), "config.example.yaml": example_config()}
    readme = [p for p in (HERE.parent / "README.md", HERE / "README.md") if p.is_file()]
    if readme:
        share["doc/README.md"] = readme[0]
    for name, src in share.items():
        write_if_changed(lay.share / name, src.read_text())
    write_if_changed(lay.prefix / "libexec" / "kvmscope-install", Path(__file__).read_text(), 0o755)
    link(lay.prefix / "bin" / "kvmscope", Path("../current/bin/kvmscope"))
    if lay.bin_link:
        link(lay.bin_link, lay.prefix / "bin" / "kvmscope")
    if link(lay.current, Path("releases") / release.name):
        changes.append("current")

    unit_text = render_unit(lay)
    if write_if_changed(lay.unit, unit_text):
        changes.append("unit")
    manifest = {
        "version": version, "wheel_sha256": digest, "release": release.name,
        "paths": {k: str(getattr(lay, k)) for k in DEFAULTS},
    }
    if {k: old.get(k) for k in manifest} != manifest:
        manifest["installed_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_if_changed(lay.manifest, json.dumps(manifest, indent=2) + "\n")
    prune_releases(lay, keep={release.name, old.get("release")}, count=a.keep_releases)

    # the service: systemd when it runs, else the built-in starter
    restart = bool(changes) and service_active(lay)
    if systemd_running():
        if "unit" in changes:
            run(["systemctl", "daemon-reload"], "systemctl daemon-reload")
        if a.enable:
            run(["systemctl", "enable", "--quiet", UNIT_NAME], "systemctl enable")
    if restart:
        say("restarting the running agent on the new release")
        service_restart(lay)
    elif a.start and not service_active(lay):
        service_start(lay)
        changes.append("started")

    word = "unchanged" if not changes else ("upgraded" if old.get("version") and old.get("release") != release.name
                                            else "installed")
    if word == "upgraded":
        say(f"upgraded kvmscope {old.get('version')} ({old.get('release')}) -> {version} ({release.name})")
    elif word == "installed":
        say(f"kvmscope {version} in {lay.prefix} ({', '.join(changes)}); config {lay.config}; unit {lay.unit}")
    else:
        say(f"kvmscope {version} ({release.name}) already installed; nothing to do")
    result(word, version=version)


def link(path: Path, target: Path) -> bool:
    try:
        if os.readlink(path) == str(target):
            return False
    except FileNotFoundError:
        pass
    except OSError:
        if path.is_dir() and not path.is_symlink():
            raise InstallError(f"{path} exists and is not a symlink; move it away") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)
    return True


def prune_releases(lay: Layout, keep: set, count: int) -> None:
    rels = sorted((p for p in lay.releases.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    kept = 0
    for p in rels:
        if p.name in keep or kept < count:
            kept += 1
            continue
        say(f"removing old release {p.name}")
        shutil.rmtree(p, ignore_errors=True)


# -- uninstall / status -------------------------------------------------------------

def cmd_uninstall(a: argparse.Namespace) -> None:
    lay = Layout(a)
    if os.geteuid() != 0:
        raise InstallError("run as root")
    if service_active(lay):
        service_stop(lay)
    if systemd_running() and lay.unit.exists():
        subprocess.run(["systemctl", "disable", "--quiet", UNIT_NAME], capture_output=True)
    removed = []
    if lay.unit.exists():
        lay.unit.unlink()
        removed.append(str(lay.unit))
        if systemd_running():
            subprocess.run(["systemctl", "daemon-reload"], capture_output=True)
    if lay.bin_link and lay.bin_link.is_symlink() and str(lay.prefix) in os.readlink(lay.bin_link):
        lay.bin_link.unlink()
        removed.append(str(lay.bin_link))
    if lay.prefix.exists():
        shutil.rmtree(lay.prefix)
        removed.append(str(lay.prefix))
    shutil.rmtree(lay.run_dir, ignore_errors=True)
    data = [lay.config_dir, lay.state_dir, lay.log_dir]
    if a.purge:
        for d in data:
            if d.exists():
                shutil.rmtree(d)
                removed.append(str(d))
        say(f"removed {', '.join(removed) or 'nothing (not installed)'}")
        result("purged" if removed else "unchanged")
    else:
        say(f"removed {', '.join(removed) or 'nothing (not installed)'}; kept "
            f"{', '.join(str(d) for d in data if d.exists()) or 'no data'} (--purge removes them)")
        result("removed" if removed else "unchanged")


def cmd_status(a: argparse.Namespace) -> None:
    lay = Layout(a)
    m = load_manifest(lay)
    st = {"installed": bool(m), **m, "service": "active" if service_active(lay) else "inactive",
          "service_manager": "systemd" if systemd_running() else "kvmscope-install"}
    if a.json:
        print(json.dumps(st, indent=2))
    else:
        if not m:
            print(f"kvmscope is not installed in {lay.prefix}")
        else:
            print(f"kvmscope {m['version']} ({m['release']}) in {lay.prefix}, installed {m.get('installed_at', '?')}")
        print(f"service: {st['service']} (managed by {st['service_manager']})")
    result("installed" if m else "absent")


# -- the service without systemd ---------------------------------------------------------

def read_pid(lay: Layout) -> int | None:
    try:
        pid = int(lay.pidfile.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    try:  # the pid may have been reused: it must be our agent
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if any(b"kvmscope" in c for c in cmd) else None


def service_active(lay: Layout) -> bool:
    if systemd_running():
        return subprocess.run(["systemctl", "is-active", "--quiet", UNIT_NAME]).returncode == 0
    return read_pid(lay) is not None


def service_start(lay: Layout) -> int | None:
    if systemd_running():
        run(["systemctl", "start", UNIT_NAME], "systemctl start")
        return None
    pid = read_pid(lay)
    if pid:
        say(f"already running (pid {pid})")
        return pid
    if not lay.unit.is_file():
        raise InstallError(f"{lay.unit} is missing: install first")
    unit = parse_unit(lay.unit.read_text())
    svc = unit.get("Service", {})
    prefix = setpriv_argv(unit)
    env = dict(os.environ)
    env.update(unit_environment(unit))
    umask = int((svc.get("UMask") or ["0022"])[-1], 8)
    for pre in svc.get("ExecStartPre", []):
        run(prefix + exec_line(pre), f"ExecStartPre {pre}", env=env, cwd="/")
    argv = prefix + exec_line(svc["ExecStart"][-1])
    lay.run_dir.mkdir(parents=True, exist_ok=True)
    lay.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = lay.log_dir / "agent.log"
    sock_path = lay.run_dir / "notify.sock"
    sock_path.unlink(missing_ok=True)
    timeout = seconds((svc.get("TimeoutStartSec") or ["90s"])[-1], 90.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        env["NOTIFY_SOCKET"] = str(sock_path)
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    env=env, cwd="/", start_new_session=True,
                                    preexec_fn=lambda: os.umask(umask))
        say(f"started pid {proc.pid}: {' '.join(argv)} (log {log_path}); waiting for READY=1")
        ready = wait_ready(sock, proc, timeout)
    sock_path.unlink(missing_ok=True)
    if not ready:
        code = proc.poll()
        if code is None:
            proc.terminate()
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise InstallError(f"the agent did not become ready within {timeout:g}s"
                           + (f" (it exited with {code})" if code is not None else "") + f"; {log_path}:\n{tail}")
    lay.pidfile.write_text(f"{proc.pid}\n")
    say(f"ready: pid {proc.pid}")
    return proc.pid


def wait_ready(sock: socket.socket, proc: subprocess.Popen, timeout: float) -> bool:
    end = time.monotonic() + timeout
    sock.settimeout(0.5)
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            data = sock.recv(4096).decode("utf-8", "replace")
        except socket.timeout:
            continue
        if "READY=1" in data.splitlines():
            return True
    return False


def service_stop(lay: Layout) -> bool:
    if systemd_running():
        run(["systemctl", "stop", UNIT_NAME], "systemctl stop")
        return True
    pid = read_pid(lay)
    if pid is None:
        lay.pidfile.unlink(missing_ok=True)
        return False
    unit = parse_unit(lay.unit.read_text()) if lay.unit.is_file() else {}
    timeout = seconds((unit.get("Service", {}).get("TimeoutStopSec") or ["30s"])[-1], 30.0)
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while time.monotonic() < end and Path(f"/proc/{pid}").exists() and not _zombie(pid):
        time.sleep(0.1)
    if Path(f"/proc/{pid}").exists() and not _zombie(pid):
        say(f"pid {pid} still running after {timeout:g}s: SIGKILL")
        os.kill(pid, signal.SIGKILL)
    lay.pidfile.unlink(missing_ok=True)
    say(f"stopped pid {pid}")
    return True


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def service_restart(lay: Layout) -> None:
    if systemd_running():
        run(["systemctl", "restart", UNIT_NAME], "systemctl restart")
        return
    service_stop(lay)
    service_start(lay)


def cmd_service(a: argparse.Namespace) -> None:
    lay = Layout(a)
    if a.action == "status":
        pid = read_pid(lay) if not systemd_running() else None
        active = service_active(lay)
        print(f"kvmscope agent: {'running' + (f' (pid {pid})' if pid else '') if active else 'stopped'}")
        result("running" if active else "stopped")
        return
    if os.geteuid() != 0:
        raise InstallError("run as root")
    if a.action == "start":
        was = service_active(lay)
        service_start(lay)
        result("unchanged" if was else "started")
    elif a.action == "stop":
        result("stopped" if service_stop(lay) else "unchanged")
    elif a.action == "restart":
        service_restart(lay)
        result("restarted")


# -- command line ----------------------------------------------------------------------

EPILOG = """examples:
  deploy/install.py install                          # build from this checkout, install, config once
  deploy/install.py install --wheel dist/kvmscope-0.1.0-py3-none-any.whl --wheelhouse dist/wheels --start
  /opt/kvmscope/libexec/kvmscope-install install --wheel kvmscope-0.2.0-py3-none-any.whl   # upgrade
  /opt/kvmscope/libexec/kvmscope-install uninstall           # keeps /etc/kvmscope and /var/lib/kvmscope
  /opt/kvmscope/libexec/kvmscope-install uninstall --purge   # removes them too
  /opt/kvmscope/libexec/kvmscope-install service start       # hosts without systemd (containers)
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmscope-install", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def paths(sp):
        for key, default in DEFAULTS.items():
            sp.add_argument("--" + key.replace("_", "-"), default=default, metavar="DIR" if "dir" in key or key == "prefix" else "PATH",
                            help=f"default: {default}" + (" ('none': no link)" if key == "bin_link" else ""))

    i = sub.add_parser("install", help="install or upgrade (keeps config and data)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    src = i.add_mutually_exclusive_group()
    src.add_argument("--wheel", help="a built kvmscope wheel (make dist)")
    src.add_argument("--source", default=str(HERE.parent), help="a checkout to build the wheel from (default: this one)")
    i.add_argument("--wheelhouse", help="directory of dependency wheels: install offline from it (make dist)")
    i.add_argument("--config", help="install this file as config.yaml (default: keep the existing one, "
                                    "or write the example once)")
    i.add_argument("--no-apt", action="store_true", help="do not apt-get missing Debian packages; fail instead")
    i.add_argument("--start", action="store_true", help="start the service if it is not running")
    i.add_argument("--no-enable", dest="enable", action="store_false", help="do not enable the systemd unit")
    i.add_argument("--keep-releases", type=int, default=2, metavar="N", help="old releases kept for rollback (default 2)")
    paths(i)
    i.set_defaults(func=cmd_install)

    u = sub.add_parser("uninstall", help="remove kvmscope (config and data stay unless --purge)")
    u.add_argument("--purge", action="store_true", help="also remove the config, state (spool) and log directories")
    paths(u)
    u.set_defaults(func=cmd_uninstall)

    s = sub.add_parser("status", help="what is installed, and whether the agent runs")
    s.add_argument("--json", action="store_true")
    paths(s)
    s.set_defaults(func=cmd_status)

    v = sub.add_parser("service", help="start/stop the agent where systemd is not PID 1 (applies the unit's "
                                       "capabilities and no_new_privs, waits for READY=1)")
    v.add_argument("action", choices=["start", "stop", "restart", "status"])
    paths(v)
    v.set_defaults(func=cmd_service)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except InstallError as e:
        print(f"kvmscope-install: error: {e}", file=sys.stderr)
        result("failed")
        return 1
    except KeyboardInterrupt:
        print("kvmscope-install: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
