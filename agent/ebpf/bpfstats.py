"""Switching on the kernel's BPF run-time statistics, for the probes' self-measurement.

BPF run-time statistics are switched on with the raw ``bpf(BPF_ENABLE_STATS)``
command (kernel 5.8+), which holds a reference on the kernel's stats switch
for as long as the agent keeps the returned fd and drops it on close or exit,
so ``kernel.bpf_stats_enabled`` is never written and is left exactly as
found. On kernels without that command the sysctl is set to 1 and restored
to its previous value when the last probe releases it. :data:`STATS` is the
one switch of the process (the kernel's switch is per system); each loaded
probe acquires it and releases it on close.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
from pathlib import Path

from agent.hostpaths import HostPaths

log = logging.getLogger(__name__)

_SYS_bpf = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


class _StatsSwitch:
    """Reference-counted holder of the kernel's BPF stats switch."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._fd: int | None = None
        self._sysctl_prev: str | None = None
        self._sysctl_path: Path | None = None
        self.mode = "off"

    def acquire(self, paths: HostPaths) -> str:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return self.mode
            libc = ctypes.CDLL(None, use_errno=True)
            attr = (ctypes.c_uint8 * 16)()  # union bpf_attr { .enable_stats.type = BPF_STATS_RUN_TIME }
            fd = libc.syscall(_SYS_bpf, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
            if fd >= 0:
                self._fd = fd
                self.mode = "bpf_enable_stats"
                return self.mode
            err = ctypes.get_errno()
            log.debug("BPF_ENABLE_STATS failed (%s); falling back to the sysctl", errno.errorcode.get(err, err))
            path = paths.proc("sys", "kernel", "bpf_stats_enabled")
            try:
                prev = paths.read_text(path).strip()
                if prev != "1":
                    path.write_text("1\n")
                self._sysctl_prev, self._sysctl_path = prev, path
                self.mode = "sysctl"
            except OSError as e:
                log.warning("cannot enable BPF run-time stats (%s): ns per event will be unknown", e)
                self.mode = "off"
            return self.mode

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users:
                return
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._sysctl_path is not None and self._sysctl_prev is not None:
                try:
                    if self._sysctl_path.read_text().strip() != self._sysctl_prev:
                        self._sysctl_path.write_text(self._sysctl_prev + "\n")
                except OSError as e:
                    log.warning("could not restore kernel.bpf_stats_enabled=%s: %s", self._sysctl_prev, e)
                self._sysctl_path = self._sysctl_prev = None
            self.mode = "off"


STATS = _StatsSwitch()
