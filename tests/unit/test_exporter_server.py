"""The agent's HTTP server, safe by default: bind address, TLS (with client
certificates), basic auth with bcrypt hashes, label escaping and length
bound, series caps. Real sockets on loopback, real TLS handshakes with
certificates made by openssl(1) in the test."""

from __future__ import annotations

import base64
import http.client
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request

import bcrypt
import pytest
from prometheus_client.exposition import generate_latest

from agent.config import Config, MetricsConfig
from agent.errors import ConfigError
from agent.exporters.caps import Limits, cut_label
from agent.exporters.collector import make_registry
from agent.exporters.server import MetricsServer
from agent.exporters.web_config import load_web_config, parse_web_config
from agent.records.snapshot import Snapshot
from agent.records.vms import DiskStats, Vm, VmDisk, Vms

SNAP = Snapshot(1, 1.0, "h", 0.0, data={}, health={})


def latest():
    return SNAP


@pytest.fixture
def server():
    started = []

    def start(**kw) -> MetricsServer:
        s = MetricsServer("127.0.0.1", 0, latest, **kw).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def test_listens_on_loopback_by_default():
    import socket

    default = Config().metrics
    assert default.listen.startswith("127.0.0.1:") and default.web_config is None
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    s = MetricsServer.from_config(default.model_copy(update={"listen": f"127.0.0.1:{port}"}), latest)
    try:
        assert s.address[0] == "127.0.0.1" and s.scheme == "http"
        with pytest.raises(OSError):  # not reachable on another local address
            socket.create_connection(("127.0.0.2", port), timeout=2).close()
    finally:
        s.stop()


def test_plain_http_serves_metrics(server):
    s = server()
    with urllib.request.urlopen(f"http://127.0.0.1:{s.address[1]}/metrics", timeout=5) as r:
        assert "kvmscope_build_info" in r.read().decode()


# -- basic auth ----------------------------------------------------------------
def _hash(pw: str, cost: int = 4) -> str:
    return bcrypt.hashpw(pw.encode(), bcrypt.gensalt(cost)).decode()


def _get(port, user=None, password=None, path="/metrics", scheme="http", ctx=None):
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}")
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def test_basic_auth_accepts_right_password_refuses_others(tmp_path, server):
    # htpasswd writes $2y$; bcrypt writes $2b$: both must verify
    h = _hash("s3cret").replace("$2b$", "$2y$", 1)
    wc = tmp_path / "web.yml"
    wc.write_text(f"basic_auth_users:\n  prom: '{h}'\n")
    s = server(web=load_web_config(wc))
    port = s.address[1]
    code, body, _ = _get(port, "prom", "s3cret")
    assert code == 200 and "kvmscope_build_info" in body
    code, _, headers = _get(port, "prom", "wrong")
    assert code == 401 and "Basic" in headers["WWW-Authenticate"]
    assert _get(port, "nobody", "s3cret")[0] == 401
    assert _get(port)[0] == 401
    assert _get(port, path="/api/v1/health")[0] == 401  # every endpoint, not just /metrics
    # a second right request hits the cache and still works; a wrong one after it still fails
    assert _get(port, "prom", "s3cret")[0] == 200
    assert _get(port, "prom", "s3cret!")[0] == 401


def test_garbage_authorization_header_is_401(tmp_path, server):
    wc = tmp_path / "web.yml"
    wc.write_text(f"basic_auth_users:\n  prom: '{_hash('x')}'\n")
    port = server(web=load_web_config(wc)).address[1]
    for header in ("Basic !!!notbase64", "Bearer abc", "Basic " + base64.b64encode(b"no-colon").decode(), "Basic"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/metrics", headers={"Authorization": header})
        assert conn.getresponse().status == 401, header
        conn.close()


@pytest.mark.parametrize(
    "text, words",
    [
        ("basic_auth_users:\n  prom: plaintext\n", "not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: a.crt\n", "key_file: required"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: Maybe\n", "allowed NoClientCert"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
         "client_ca_file: required"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n",
         "client_ca_file: required with client_auth_type RequireAnyClientCert"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequestClientCert\n",
         "client_ca_file: required with client_auth_type RequestClientCert"),
        ("http_server_config:\n  http2: true\n", "unsupported keys"),
        ("- a list\n", "mapping"),
        ("basic_auth_users: [\n", "not valid YAML"),
    ],
)
def test_bad_web_config_is_a_clear_error(tmp_path, text, words):
    with pytest.raises(ConfigError, match="metrics.web_config") as e:
        parse_web_config(text, tmp_path / "web.yml")
    assert words in str(e.value)


def test_missing_web_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        MetricsServer.from_config(MetricsConfig(listen="127.0.0.1:1", web_config=str(tmp_path / "nope.yml")), latest)


# -- TLS -----------------------------------------------------------------------
def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made here."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl(1) not installed")
    d = tmp_path
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", "/CN=kvmscope test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "1", "-extfile", "san.ext", "-out", f"{name}.crt", cwd=d)
    # a client certificate from a CA the server does not trust
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
             "-subj", "/CN=stranger", "-keyout", "stranger.key", "-out", "stranger.crt", cwd=d)
    return d


def _client_ctx(pki, cert=None):
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if cert:
        ctx.load_cert_chain(str(pki / f"{cert}.crt"), str(pki / f"{cert}.key"))
    return ctx


def test_tls_serves_https_and_refuses_plain_http(pki, server):
    (pki / "web.yml").write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n")
    s = server(web=load_web_config(pki / "web.yml"))
    port = s.address[1]
    assert s.scheme == "https"
    code, body, _ = _get(port, scheme="https", ctx=_client_ctx(pki))
    assert code == 200 and "kvmscope_build_info" in body
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        _get(port, scheme="http")
    # the server survives the bad client and keeps serving
    assert _get(port, scheme="https", ctx=_client_ctx(pki))[0] == 200


def test_tls_client_certificates_required_and_verified(pki, server):
    (pki / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
        "  min_version: TLS13\n"
        f"basic_auth_users:\n  prom: '{_hash('pw')}'\n"
    )
    port = server(web=load_web_config(pki / "web.yml")).address[1]
    ok = _get(port, "prom", "pw", scheme="https", ctx=_client_ctx(pki, "client"))
    assert ok[0] == 200 and "kvmscope_build_info" in ok[1]
    assert _get(port, "prom", "bad", scheme="https", ctx=_client_ctx(pki, "client"))[0] == 401
    for cert in (None, "stranger"):  # no client certificate, or one from an untrusted CA
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(port, "prom", "pw", scheme="https", ctx=_client_ctx(pki, cert))
    assert _get(port, "prom", "pw", scheme="https", ctx=_client_ctx(pki, "client"))[0] == 200


def test_stdlib_tls_refuses_every_client_certificate_without_a_ca(pki):
    """Why RequireAnyClientCert needs client_ca_file here: a Python server context that asks for a
    client certificate without a CA refuses even a good one (what the old mapping did at run time)."""
    import socket
    import threading

    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    srv.verify_mode = ssl.CERT_REQUIRED
    lsock = socket.create_server(("127.0.0.1", 0))
    errors = []

    def accept():
        conn, _ = lsock.accept()
        try:
            srv.wrap_socket(conn, server_side=True).close()
        except ssl.SSLError as e:
            errors.append(e)
            conn.close()

    t = threading.Thread(target=accept)
    t.start()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(lsock.getsockname(), timeout=5) as raw:
            with _client_ctx(pki, "client").wrap_socket(raw, server_hostname="127.0.0.1") as c:
                c.sendall(b"x")
                c.recv(1)
    t.join(5)
    lsock.close()
    assert errors and "certificate" in str(errors[0]).lower()


def test_require_any_client_cert_with_a_ca_requires_and_verifies(pki, server):
    (pki / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n"
    )
    port = server(web=load_web_config(pki / "web.yml")).address[1]
    assert _get(port, scheme="https", ctx=_client_ctx(pki, "client"))[0] == 200
    for cert in (None, "stranger"):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(port, scheme="https", ctx=_client_ctx(pki, cert))


def test_unloadable_certificate_fails_at_start(pki):
    (pki / "web.yml").write_text("tls_server_config:\n  cert_file: ca.key\n  key_file: server.key\n")
    with pytest.raises(ConfigError, match="cannot load"):
        load_web_config(pki / "web.yml")


# -- labels and caps -----------------------------------------------------------
def _vms(n_vms, disks_per_vm, name=lambda i: f"vm{i:04d}"):
    return Vms(tuple(
        Vm(name(i), None, "running", 1, tuple(
            VmDisk(f"vd{chr(97 + k)}", "file", source="/x", stats=DiskStats(rd_reqs=i, wr_reqs=k))
            for k in range(disks_per_vm)))
        for i in range(n_vms)))


def _render(vms, limits=None, times=1):
    snap = Snapshot(1, 1.0, "h", 0.0, data={"libvirt": vms}, health={})
    reg = make_registry(lambda: snap, limits=limits)
    for _ in range(times):
        text = generate_latest(reg).decode()
    return text


def _sample(text, name, **labels):
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_long_label_values_are_cut_and_stay_distinct():
    long_a, long_b = "a" * 300 + "-one", "a" * 300 + "-two"
    text = _render(_vms(2, 1, name=lambda i: (long_a, long_b)[i]), Limits(max_label_length=64))
    vms = {line.split('vm="', 1)[1].split('"', 1)[0] for line in text.splitlines()
           if line.startswith("kvmscope_vm_running{")}
    assert len(vms) == 2 and all(len(v) == 64 for v in vms)
    assert all(v.startswith("a" * 55 + "~") for v in vms)
    assert cut_label("short", 64) == "short"


def test_escaping_of_quotes_backslashes_newlines_and_promtool_accepts():
    odd = 'db "prod"\\path\nnext ü'
    text = _render(_vms(1, 1, name=lambda i: odd))
    assert 'vm="db \\"prod\\"\\\\path\\nnext ü"' in text
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (deploy/setup.sh installs Debian prometheus)")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_vm_cap_keeps_first_names_and_counts_the_rest():
    text = _render(_vms(10, 2), Limits(max_vms=3))
    running = [line for line in text.splitlines() if line.startswith("kvmscope_vm_running{")]
    assert len(running) == 3
    assert all(f'vm="vm{i:04d}"' in "".join(running) for i in range(3))
    assert _sample(text, "kvmscope_exporter_capped_objects", kind="vm") == 7
    dropped = _sample(text, "kvmscope_exporter_series_dropped_total", kind="vm")
    full = _render(_vms(10, 2))  # every series of the 7 VMs left out is counted, no more, no less
    left_out = [line for line in full.splitlines()
                if not line.startswith("#") and any(f'vm="vm{i:04d}"' in line for i in range(3, 10))]
    assert dropped == len(left_out) > 7 * 2 * 9
    # the counter accumulates over scrapes
    text3 = _render(_vms(10, 2), Limits(max_vms=3), times=3)
    assert _sample(text3, "kvmscope_exporter_series_dropped_total", kind="vm") == 3 * dropped


def test_disk_cap_and_connection_cap():
    text = _render(_vms(4, 3), Limits(max_disks=5))
    infos = [line for line in text.splitlines() if line.startswith("kvmscope_vm_disk_info{")]
    assert len(infos) == 5
    assert _sample(text, "kvmscope_exporter_capped_objects", kind="disk") == 7
    full = _render(_vms(4, 3))
    kept_disks = {(f"vm{i:04d}", f"vd{chr(97 + k)}") for i in range(4) for k in range(3)}
    kept_disks = set(sorted(kept_disks)[:5])
    left_out = [line for line in full.splitlines() if 'disk="' in line and not any(
        f'vm="{v}"' in line and f'disk="{d}"' in line for v, d in kept_disks)]
    assert _sample(text, "kvmscope_exporter_series_dropped_total", kind="disk") == len(left_out) >= 7 * 9
    assert _sample(text, "kvmscope_vm_running", vm="vm0003") == 1  # the VM stays, only its extra disks go


def test_under_the_caps_nothing_is_dropped():
    text = _render(_vms(5, 2))
    for kind in ("vm", "disk", "connection"):
        assert _sample(text, "kvmscope_exporter_series_dropped_total", kind=kind) == 0
        assert _sample(text, "kvmscope_exporter_capped_objects", kind=kind) == 0


def test_same_metric_from_several_renderers_is_one_family():
    """Found on the lab: each eBPF probe yields its own kvmscope_probe_events_total family; the
    exposition must still have one HELP/TYPE per name (promtool check metrics refused it)."""
    from agent.exporters import catalog as C
    from agent.exporters.collector import merge_families

    fams = []
    for probe in ("tcp_retrans", "block_io"):
        f = C.PROBE_EVENTS.family()
        f.add_metric([probe], 7)
        fams.append(f)
    merged = merge_families(fams)
    assert len(merged) == 1 and len(merged[0].samples) == 2


# -- the local API behind the same protection ------------------------------------
def _history():
    return [Snapshot(1, 1.0, "h", 0.0, data={}, health={}), Snapshot(2, 2.0, "h", 0.0, data={}, health={})]


def test_snapshots_api_behind_basic_auth(tmp_path, server):
    import json

    wc = tmp_path / "web.yml"
    wc.write_text(f"basic_auth_users:\n  prom: '{_hash('s3cret')}'\n")
    port = server(web=load_web_config(wc), history=_history).address[1]
    for user, pw in ((None, None), ("prom", "wrong"), ("nobody", "s3cret")):
        code, body, headers = _get(port, user, pw, path="/api/v1/snapshots?last=2")
        assert code == 401 and "Basic" in headers["WWW-Authenticate"], (user, code)
        assert '"seq"' not in body and '"host"' not in body  # nothing of the history leaks
    code, body, _ = _get(port, "prom", "s3cret", path="/api/v1/snapshots?last=2")
    assert code == 200 and [s["seq"] for s in json.loads(body)] == [1, 2]


def test_snapshots_api_behind_tls_with_client_certificates(pki, server):
    import json

    (pki / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n")
    port = server(web=load_web_config(pki / "web.yml"), history=_history).address[1]
    code, body, _ = _get(port, path="/api/v1/snapshots?last=1", scheme="https", ctx=_client_ctx(pki, "client"))
    assert code == 200 and [s["seq"] for s in json.loads(body)] == [2]
    for cert in (None, "stranger"):  # no client certificate, or one from an untrusted CA: no TLS session at all
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            _get(port, path="/api/v1/snapshots?last=1", scheme="https", ctx=_client_ctx(pki, cert))
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        _get(port, path="/api/v1/snapshots?last=1")  # plain HTTP


# -- exposure beyond loopback (issue 16 #1) --------------------------------------
def _cli(*args):
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("listen", ["10.20.30.40:9847", ":9847", "0.0.0.0:9847", "[::]:9847", "[2001:db8::1]:9847"])
def test_non_loopback_listen_without_web_config_is_refused(tmp_path, listen):
    from agent.exporters.server import check_exposure

    with pytest.raises(ConfigError, match="beyond loopback") as e:
        check_exposure(MetricsConfig(listen=listen))
    assert "TLS" in str(e.value) and "authentication" in str(e.value)
    with pytest.raises(ConfigError):  # the agent itself refuses to start: nothing is bound
        MetricsServer.from_config(MetricsConfig(listen=listen), latest)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"metrics:\n  listen: '{listen}'\n")
    r = _cli("config", "check", str(cfg))
    assert r.returncode == 2 and "beyond loopback" in r.stderr, r.stderr
    r = _cli("-c", str(cfg), "run", "--once")
    assert r.returncode == 2 and "beyond loopback" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("listen", ["127.0.0.1:9847", "127.0.0.9:9847", "[::1]:9847", "localhost:9847"])
def test_loopback_listen_needs_no_web_config(listen):
    from agent.exporters.server import check_exposure

    assert check_exposure(MetricsConfig(listen=listen)) is None


def test_non_loopback_needs_tls_and_authentication(pki):
    from agent.exporters.server import check_exposure

    tls = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
    users = f"basic_auth_users:\n  prom: '{_hash('pw')}'\n"
    certs = tls + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"
    optional = tls + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n"
    cases = {"tls-only": (tls, "without authentication"), "auth-only": (users, "without TLS"),
             "optional-certs": (optional, "without authentication"),
             "tls+auth": (tls + users, None), "verified-certs": (certs, None)}
    for name, (text, refused) in cases.items():
        (pki / f"{name}.yml").write_text(text)
        m = MetricsConfig(listen="10.20.30.40:9847", web_config=str(pki / f"{name}.yml"))
        if refused:
            with pytest.raises(ConfigError, match=refused):
                check_exposure(m)
        else:
            assert check_exposure(m) is not None, name


# -- what one request may cost (issue 16 #1) ----------------------------------------
def _big_history(n):
    from agent.records.snapshot import SourceHealth, Status

    return [Snapshot(i + 1, 1000.0 + i, "h", 0.0, data={},
                     health={"x": SourceHealth("x", Status.OK, 0.01, "y" * 2000)}) for i in range(n)]


def test_snapshots_per_request_are_capped_newest_kept(server):
    import json

    from agent.api import ApiLimits

    hist = _big_history(50)
    port = server(history=lambda: hist, api_limits=ApiLimits(max_snapshots=5)).address[1]
    code, body, headers = _get(port, path="/api/v1/snapshots?last=50")
    assert code == 200 and [s["seq"] for s in json.loads(body)] == [46, 47, 48, 49, 50]
    assert headers["X-Kvmscope-Left-Out"] == "45"
    code, body, headers = _get(port, path="/api/v1/snapshots")  # no query: the latest only
    assert [s["seq"] for s in json.loads(body)] == [50] and "X-Kvmscope-Left-Out" not in headers
    code, body, _ = _get(port, path="/api/v1/snapshots?last=2")
    assert [s["seq"] for s in json.loads(body)] == [49, 50]


def test_response_size_is_capped(server):
    import json

    from agent.api import ApiLimits

    hist = _big_history(50)  # ~2.2 KB each
    port = server(history=lambda: hist, api_limits=ApiLimits(max_snapshots=50, max_response_bytes=10_000)).address[1]
    code, body, headers = _get(port, path="/api/v1/snapshots?last=50")
    seqs = [s["seq"] for s in json.loads(body)]
    assert code == 200 and len(body) <= 10_000 and 2 <= len(seqs) < 10 and seqs[-1] == 50
    assert int(headers["X-Kvmscope-Left-Out"]) == 50 - len(seqs)


def test_concurrent_connections_are_capped_with_503_and_slow_clients_cut_off(server):
    import socket
    import time

    s = server(max_requests=2, request_timeout=1.5)
    port = s.address[1]
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]  # say nothing
    time.sleep(0.3)
    code, body, headers = _get(port)
    assert code == 503 and "too many" in body and headers["Retry-After"] == "1"
    # a client trickling a byte at a time is cut off at the deadline, not kept while it trickles
    t0 = time.monotonic()
    idle[0].sendall(b"G")
    for ch in b"ET /metrics HTTP/1.0\r\n":
        try:
            idle[0].sendall(bytes([ch]))
        except OSError:
            break
        time.sleep(0.1)
    for sk in idle:
        sk.settimeout(5)
        try:
            assert sk.recv(100) == b""  # closed by the server
        except ConnectionResetError:
            pass
    assert time.monotonic() - t0 < 4
    time.sleep(0.3)
    assert _get(port)[0] == 200  # the slots are free again
    for sk in idle:
        sk.close()
