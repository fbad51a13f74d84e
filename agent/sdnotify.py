"""systemd service notifications (sd_notify protocol), without libsystemd.

With ``Type=notify`` systemd considers the service started only when it sends
``READY=1``; with ``WatchdogSec=`` it restarts a service that stops sending
``WATCHDOG=1``. The protocol is one datagram of ``KEY=VALUE`` lines to the
unix socket named in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Outside systemd the variable is unset and every call is a no-op.
Errors never reach the agent: a notification is best effort.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable

log = logging.getLogger(__name__)


def _address(env: dict[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return None
    return "\0" + addr[1:] if addr[0] == "@" else addr


def notify(*lines: str, env: dict[str, str] | None = None) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=...``) to systemd; True if sent."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(1.0)
            s.sendto(payload, addr)
        return True
    except OSError as e:
        log.debug("sd_notify to %r failed: %s", addr, e)
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings systemd expects (half of WatchdogSec), or None."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6


class Watchdog:
    """Pings systemd's watchdog while ``alive()`` says the agent loop is making
    progress; stops pinging (so systemd restarts the service) when it is not."""

    def __init__(self, alive: Callable[[], bool], every: float):
        self.alive = alive
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if self.alive():
                notify("WATCHDOG=1")
            else:
                log.warning("collection loop stalled: not pinging the systemd watchdog")

    def stop(self) -> None:
        self._stop.set()


def loop_alive(last_cycle: Callable[[], float | None], interval: float, timeout: float) -> Callable[[], bool]:
    """A liveness test: the last cycle ended recently enough for the interval."""
    limit = 2 * interval + timeout + 10.0

    def alive() -> bool:
        t = last_cycle()
        return t is not None and time.monotonic() - t < limit

    return alive
