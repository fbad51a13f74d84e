#!/usr/bin/python3
"""Apply a systemd unit's sandboxing with the kernel mechanisms systemd uses,
then exec a command. For tests on machines where systemd is not PID 1.

Run it inside a fresh mount namespace (``unshare --mount --propagation
private``) as root. ``--spec`` is JSON:

  read_only_all     ProtectSystem=strict: every mount read-only but /dev, /proc, /sys
  read_write        ReadWritePaths=: bind-mounted back read-write
  inaccessible      ProtectHome=yes (/home, /root, /run/user) and other hidden paths: empty mode-000 tmpfs
  private_tmp       PrivateTmp=yes: fresh tmpfs on /tmp and /var/tmp
  kernel_tunables   ProtectKernelTunables=yes (+ ProtectControlGroups=yes): /proc/sys and /sys read-only
  mdwe              MemoryDenyWriteExecute=yes: prctl(PR_SET_MDWE) (kernel 6.3+), kept across exec
  syscalls          SystemCallFilter= allow-list (systemd group names allowed: expanded with
                    systemd-analyze), others fail with EPERM (SystemCallErrorNumber=EPERM)
  address_families  RestrictAddressFamilies= allow-list: socket() of other families fails

What is not emulated (cgroup device policy, memory/CPU limits, the
seccomp-based Restrict*/Protect{Clock,Hostname} filters) is listed in
tests/deploy/test_unit.py's docstring.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
libc = ctypes.CDLL(None, use_errno=True)


def mount(src, target, fstype, flags, data=None):
    if libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), flags,
                  data and data.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {src} {target} flags={flags:#x}: {os.strerror(e)}")


def mountpoints() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            out.append(line.split()[4].replace("\\040", " "))
    return sorted(set(out), key=lambda p: (p.count("/"), p))


def remount_ro(path: str) -> None:
    try:
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    except OSError:
        # locked flags (nosuid/nodev...) must be repeated on a bind remount
        st = os.statvfs(path)
        extra = (MS_NOSUID if st.f_flag & os.ST_NOSUID else 0) | (MS_NODEV if st.f_flag & os.ST_NODEV else 0)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra | (st.f_flag & 8 and 8))


def under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def expand_syscalls(names: list[str]) -> set[str]:
    out: set[str] = set()
    todo = list(names)
    seen = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if not n.startswith("@"):
            out.add(n)
            continue
        text = subprocess.run(["systemd-analyze", "syscall-filter", n], capture_output=True, text=True,
                              check=True).stdout
        for line in text.splitlines()[1:]:
            line = line.strip()
            if line and not line.startswith("#"):
                todo.append(line)
    return out


def apply(spec: dict) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if spec.get("read_only_all"):
        for mp in mountpoints():
            if under(mp, ("/proc", "/sys", "/dev")):
                continue
            try:
                remount_ro(mp)
            except OSError as e:
                if mp == "/":
                    raise
                print(f"sandbox: {e} (left as is)", file=sys.stderr)
    if spec.get("kernel_tunables"):
        mount("/proc/sys", "/proc/sys", None, MS_BIND | MS_REC)
        for mp in ["/proc/sys"] + [m for m in mountpoints() if under(m, ("/sys",))]:
            try:
                remount_ro(mp)
            except OSError as e:
                print(f"sandbox: {e} (left as is)", file=sys.stderr)
    for p in spec.get("read_write", []):
        os.makedirs(p, exist_ok=True) if not spec.get("read_only_all") else None
        mount(p, p, None, MS_BIND | MS_REC)
        mount(None, p, None, MS_REMOUNT | MS_BIND)
    if spec.get("private_tmp"):
        for p in ("/tmp", "/var/tmp"):
            mount("tmpfs", p, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for p in spec.get("inaccessible", []):
        if os.path.isdir(p):
            mount("tmpfs", p, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "mode=000")
    if spec.get("mdwe"):
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
    if spec.get("syscalls") is not None:
        import errno

        import seccomp  # Debian python3-seccomp (libseccomp), like systemd's own filter

        f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
        families = spec.get("address_families")
        for name in sorted(expand_syscalls(spec["syscalls"])):
            try:
                if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) < 0:
                    continue  # a pseudo number: not a call of this architecture
            except (ValueError, RuntimeError):
                continue  # another architecture's name
            if name == "socket" and families is not None:
                for fam in families:
                    f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, int(getattr(socket, fam))))
                continue
            f.add_rule(seccomp.ALLOW, name)
        f.load()


def main() -> int:
    if "--spec" not in sys.argv or "--" not in sys.argv:
        print("usage: sandbox_exec.py --spec JSON -- COMMAND...", file=sys.stderr)
        return 2
    spec = json.loads(sys.argv[sys.argv.index("--spec") + 1])
    argv = sys.argv[sys.argv.index("--") + 1:]
    apply(spec)
    os.execvp(argv[0], argv)
    return 127


if __name__ == "__main__":
    sys.exit(main())
