"""sd_notify: datagrams to a real unix socket, as systemd receives them."""

from __future__ import annotations

import os
import socket
import time

import pytest

from agent import sdnotify


@pytest.fixture
def receiver(tmp_path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    yield str(path), s
    s.close()


def test_ready_and_status_reach_the_socket(receiver):
    path, s = receiver
    assert sdnotify.notify("READY=1", "STATUS=3 ok\nsecond line", env={"NOTIFY_SOCKET": path})
    assert s.recv(4096).decode() == "READY=1\nSTATUS=3 ok second line"


def test_abstract_socket():
    name = f"kvmscope-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"WATCHDOG=1"
    finally:
        s.close()


@pytest.mark.parametrize("value", ["", "relative/path", "/nonexistent/dir/sock"])
def test_no_or_bad_socket_is_a_quiet_no_op(value):
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": value} if value else {}) is False


def test_watchdog_interval():
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "300000000", "WATCHDOG_PID": pid}) == 150.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "300000000", "WATCHDOG_PID": "1"}) is None  # not for us
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert sdnotify.watchdog_interval({}) is None


def test_watchdog_stops_pinging_when_the_loop_stalls(receiver, monkeypatch):
    path, s = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    last = [time.monotonic()]
    alive = sdnotify.loop_alive(lambda: last[0], interval=0.01, timeout=0.01)
    monkeypatch.setattr(sdnotify.time, "monotonic", lambda: last[0] + 5)  # 5 s after the last cycle: fine
    assert alive()
    monkeypatch.setattr(sdnotify.time, "monotonic", lambda: last[0] + 11)  # > 2 x interval + timeout + 10 s
    assert not alive()
    monkeypatch.undo()
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    state = {"alive": True}
    w = sdnotify.Watchdog(lambda: state["alive"], every=0.05).start()
    try:
        assert s.recv(100) == b"WATCHDOG=1"
        state["alive"] = False
        time.sleep(0.2)
        s.settimeout(0.01)
        while True:  # drain what was sent before the stall
            try:
                s.recv(100)
            except socket.timeout:
                break
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(100)
    finally:
        w.stop()
