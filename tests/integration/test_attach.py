"""CLI commands attach to a running agent through its unix socket, only to one run by root (or
the CLI's own user), and never to a TCP port (issue 16 #10). Real agents, real sockets; the
impostors are a process run as `nobody` on a socket of its own and a TCP server on the agent's port."""

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from socketserver import UnixStreamServer

import pytest

from agent.api import NotAttached, fetch_snapshots
from tests.conftest import free_port, wait_for

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
EBPF_OFF = "[ebpf_block_io, ebpf_tcp_lifecycle, ebpf_tcp_retrans]"


def _env(sock, port):
    return dict(CLEAN_ENV, KVMSCOPE_API__SOCKET=str(sock), KVMSCOPE_METRICS__LISTEN=f"127.0.0.1:{port}",
                KVMSCOPE_AGENT__COLLECTORS__DISABLE=EBPF_OFF)


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "agent", *args], env=env, capture_output=True, text=True, timeout=90)


@pytest.fixture
def running_agent(tmp_path):
    sock = tmp_path / "run" / "api.sock"  # run/ does not exist: the agent makes it, 0700
    env = _env(sock, free_port())
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--interval", "0.5", "-q"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(fetch_snapshots(str(sock), last=3)[0]) >= 3, 30, "three snapshots on the socket")
    except AssertionError:
        p.kill()
        raise AssertionError(p.communicate(timeout=10)[1]) from None
    yield sock, env, p
    if p.poll() is None:
        p.terminate()
        p.wait(10)


def test_socket_is_roots_alone_and_serves_the_api(running_agent):
    sock, _, _ = running_agent
    st, dst = os.lstat(sock), os.stat(sock.parent)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(dst.st_mode) == 0o700 and dst.st_uid == os.geteuid()
    assert not list(sock.parent.glob(".*tmp"))  # the temporary name is gone
    snaps, _ = fetch_snapshots(str(sock), last=2)
    assert len(snaps) == 2 and snaps[1].seq == snaps[0].seq + 1 and snaps[1].host_tcp is not None
    recent, _ = fetch_snapshots(str(sock), seconds=1.2)
    assert 1 <= len(recent) <= 4
    with pytest.raises(NotAttached, match="HTTP 400"):
        fetch_snapshots(str(sock), last="zero")


def test_diagnose_attaches_and_uses_history(running_agent):
    sock, env, _ = running_agent
    time.sleep(1.5)
    t0 = time.monotonic()
    r = cli(env, "diagnose", "--window", "2s", "--json")
    took = time.monotonic() - t0
    assert r.returncode in (0, 3), r.stderr
    assert f"attached to the running agent on {sock}" in r.stderr
    assert "sampling" not in r.stderr and took < 10
    assert json.loads(r.stdout)["window"]["snapshots"] >= 3  # 2 s of a 0.5 s agent
    # the incidents come from the agent's own tracker (kept beyond its snapshots), not replayed here
    assert isinstance(json.loads(r.stdout)["incidents"], list) and "no incidents from the agent" not in r.stderr


def test_standalone_flag_does_not_attach(running_agent):
    _, env, _ = running_agent
    r = cli(env, "--standalone", "paths", "--json")
    assert r.returncode == 0, r.stderr
    assert "attached" not in r.stderr


def test_socket_removed_at_exit_and_a_stale_one_replaced(running_agent, tmp_path):
    sock, env, p = running_agent
    p.terminate()
    p.wait(15)
    assert not sock.exists()
    # a stale socket (an agent killed with SIGKILL leaves one) is replaced by the next agent
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    q = subprocess.Popen([sys.executable, "-m", "agent", "run", "--interval", "0.5", "-q"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: fetch_snapshots(str(sock), last=1)[0], 30, "the new agent on the stale socket's path")
        # and a second agent does not steal a live socket: it says so and runs without one
        first = fetch_snapshots(str(sock), last=1)[0][0]
        other = subprocess.Popen([sys.executable, "-m", "agent", "run", "--interval", "0.5"],
                                 env=dict(env, KVMSCOPE_METRICS__LISTEN=f"127.0.0.1:{free_port()}"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        other.terminate()
        err = other.communicate(timeout=15)[1]
        assert other.returncode == 0 and f"warning: api.socket: {sock} is in use (another kvmscope running?)" in err, err
        assert fetch_snapshots(str(sock), last=1)[0][0].host == first.host and os.path.exists(sock)
    finally:
        q.terminate()
        q.wait(15)


class _Fake(BaseHTTPRequestHandler):
    body = b"[]"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *a):
        pass

    def address_string(self):
        return "unix"


def _fake_snapshot_json(host="IMPOSTOR"):
    return json.dumps([{"seq": 1, "timestamp": time.time(), "host": host, "duration_seconds": 0.0,
                        "data": {}, "health": {}}]).encode()


def test_no_agent_never_attaches_to_a_tcp_impostor(tmp_path):
    """The agent is down; whoever binds its old TCP port serves made-up snapshots: not believed."""
    port = free_port()
    fake = HTTPServer(("127.0.0.1", port), type("F", (_Fake,), {"body": _fake_snapshot_json()}))
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        env = _env(tmp_path / "run" / "api.sock", port)
        r = cli(env, "paths", "--json")
    finally:
        fake.shutdown()
        fake.server_close()
    assert r.returncode == 0, r.stderr
    assert f"no agent on {tmp_path / 'run' / 'api.sock'}: collecting in-process" in r.stderr
    assert "attached" not in r.stderr and "IMPOSTOR" not in r.stdout


IMPOSTOR = r"""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler
from socketserver import UnixStreamServer
path = sys.argv[1]
body = json.dumps([{"seq": 1, "timestamp": time.time(), "host": "IMPOSTOR", "duration_seconds": 0.0,
                    "data": {}, "health": {}}]).encode()
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def address_string(self):
        return "unix"
s = UnixStreamServer(path, H)
os.chmod(path, 0o777)
print("ready", flush=True)
s.serve_forever()
"""


def test_socket_served_by_another_user_is_not_believed(tmp_path):
    import shutil
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="kvmscope-impostor-"))  # under /tmp: reachable for nobody
    os.chown(d, 65534, 65534)
    sock = d / "api.sock"
    # stdlib only: the system interpreter, which nobody can run wherever the checkout (and its venv) lives
    imp = subprocess.Popen(["/usr/bin/python3", "-c", IMPOSTOR, str(sock)], stdout=subprocess.PIPE, text=True,
                           user=65534, group=65534, env=CLEAN_ENV, cwd="/")
    try:
        assert imp.stdout.readline().strip() == "ready"
        assert os.lstat(sock).st_uid == 65534
        r = cli(_env(sock, free_port()), "paths", "--json")
    finally:
        imp.kill()
        imp.wait(5)
        shutil.rmtree(d, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    assert f"not attaching: {sock} is served by uid 65534, not root" in r.stderr
    assert "collecting in-process" in r.stderr and "IMPOSTOR" not in r.stdout


@pytest.mark.parametrize("body", [b"{not json", b'{"a": 1}', b"[1, 2]", b'[{"seq": "x"}]',
                                  b'[{"seq": 1, "timestamp": 1, "host": "h", "data": {"libvirt": 5}, "health": {}}]'])
def test_odd_json_from_the_agent_is_a_clear_message(tmp_path, body):
    sock = tmp_path / "api.sock"
    srv = UnixStreamServer(str(sock), type("F", (_Fake,), {"body": body}))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = cli(_env(sock, free_port()), "paths", "--json")
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert f"the agent on {sock} answered something that is not kvmscope's snapshot JSON" in r.stderr
    assert "collecting in-process" in r.stderr


def test_attaches_when_metrics_need_a_password(tmp_path):
    """With metrics.web_config (basic auth) the CLI used to fail to attach, silently, and load a second
    copy of the probes; the socket does not depend on it."""
    import bcrypt

    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  prom: '{bcrypt.hashpw(b'pw', bcrypt.gensalt(4)).decode()}'\n")
    sock = tmp_path / "run" / "api.sock"
    env = dict(_env(sock, free_port()), KVMSCOPE_METRICS__WEB_CONFIG=str(web))
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--interval", "0.5", "-q"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(fetch_snapshots(str(sock), last=2)[0]) >= 2, 30, "two snapshots on the socket")
        r = cli(env, "paths", "--json")
    finally:
        p.terminate()
        p.wait(15)
    assert r.returncode == 0, r.stderr
    assert f"attached to the running agent on {sock}" in r.stderr
