"""What every part of the lab shares: names, addresses, paths, the user-facing
error, logging on stderr and the process helpers (run a command, is a pid
alive). No part of the lab's state lives here except LAB_DIR, read from
$KVMSCOPE_LAB_DIR once at import (tests point it elsewhere by assigning
`common.LAB_DIR`; every path is built through lab_path() at call time)."""

import os
import shutil
import signal
import subprocess
import sys
import time

LAB_DIR = os.environ.get("KVMSCOPE_LAB_DIR", "/var/tmp/kvmscope-lab")

PREFIX = "kvmslab"
NETNS = "kvmslab-stor"
ISCSI_PORT = 3260
LIBVIRT_URI = "qemu:///system"

# Portal index -> link. Host side .1, storage namespace side .2.
PORTALS = {
    1: {"host_if": "kvmslab-h1", "ns_if": "kvmslab-n1",
        "host_addr": "198.18.1.1", "address": "198.18.1.2", "prefix": 24},
    2: {"host_if": "kvmslab-h2", "ns_if": "kvmslab-n2",
        "host_addr": "198.18.2.1", "address": "198.18.2.2", "prefix": 24},
}

REQUIRED_BINARIES = ["ip", "iptables", "tgtd", "tgtadm", "losetup", "modinfo",
                     "libvirtd", "virtlogd", "qemu-system-x86_64", "busybox"]

HERE = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))   # deploy/lab


class LabError(Exception):
    """A failure with a message meant for the user."""


def log(msg):
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def lab_path(*parts):
    return os.path.join(LAB_DIR, *parts)


def portal_list(value):
    """--portal N -> [N]; no --portal -> every portal."""
    if value is None:
        return list(PORTALS)
    if value not in PORTALS:
        raise LabError(f"--portal must be one of {sorted(PORTALS)}")
    return [value]


# --------------------------------------------------------------------------
# Commands and processes
# --------------------------------------------------------------------------

def run(cmd, check=True, capture=True, input=None, timeout=60):
    """Run a command; raise LabError with its stderr on failure."""
    try:
        p = subprocess.run(cmd, input=input, text=True, timeout=timeout,
                           stdout=subprocess.PIPE if capture else None,
                           stderr=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise LabError(f"command not found: {cmd[0]}")
    except subprocess.TimeoutExpired:
        raise LabError(f"command timed out after {timeout}s: {' '.join(cmd)}")
    if check and p.returncode != 0:
        err = (p.stderr or "").strip() or (p.stdout or "").strip()
        raise LabError(f"`{' '.join(cmd)}` failed (rc={p.returncode}): {err}")
    return p


def ok(cmd):
    """True when cmd exits 0 (output discarded)."""
    try:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=60).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def run_bytes(cmd):
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise LabError(f"command not found: {cmd[0]} (Debian package zstd)")
    if p.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {p.stderr.decode(errors='replace')}")
    return p.stdout


def pid_alive(pid, comm=None):
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return False
    # state field follows the ")" closing comm; zombies count as dead
    state = st[st.rindex(")") + 2:].split()[0]
    if state in ("Z", "X"):
        return False
    if comm is not None:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != comm:
                    return False
        except OSError:
            return False
    return True


def all_pids():
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def read_pidfile(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def wait_dead(pid, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return not pid_alive(pid)


def kill_escalating(pid, grace, errors, name, kill_wait=5):
    """SIGTERM, wait `grace` s, SIGKILL, wait `kill_wait` s; an error line
    when it still lives."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_dead(pid, grace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if not wait_dead(pid, kill_wait):
            errors.append(f"{name} pid {pid} did not exit")


def is_root():
    return os.geteuid() == 0


def require_root(why=None):
    if not is_root():
        raise LabError("must run as root" + (f" ({why})" if why else ""))


def missing_binaries(binaries):
    return [b for b in binaries if shutil.which(b) is None
            and not os.path.exists(os.path.join("/usr/sbin", b))]


def check_root_and_binaries(binaries=REQUIRED_BINARIES):
    if os.geteuid() != 0:
        raise LabError("must run as root (network namespaces, iptables, "
                       "loop devices, libvirt system daemon)")
    missing = missing_binaries(binaries)
    if missing:
        raise LabError("missing binaries: " + ", ".join(missing) +
                       " (Debian packages: tgt iproute2 iptables "
                       "qemu-system-x86 qemu-block-extra libvirt-daemon-system "
                       "busybox-static kmod mount)")
    import importlib.util

    if importlib.util.find_spec("libvirt") is None:
        raise LabError("python module `libvirt` missing (Debian python3-libvirt); "
                       "run this tool with /usr/bin/python3")


def libvirt_mod():
    import libvirt
    # Keep libvirt's default error handler from printing to stderr.
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    return libvirt
