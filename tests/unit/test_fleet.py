"""kvmscope fleet: the judgement on literal samples, the Prometheus client's answers
to bad input, and the whole command against a real Prometheus whose TSDB is
backfilled (promtool tsdb create-blocks-from openmetrics) with two hosts' series.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.errors import ConfigError, KvmscopeError
from agent.fleet.analysis import PathSample, Thresholds, analyse, judge_path
from agent.fleet.prometheus import Prometheus, check_selector, check_url, collect, parse_window, queries
from tests.conftest import ROOT

A, B, C = "kvm-a", "kvm-b", "kvm-c"
P1, P2 = "198.18.1.2:3260", "198.18.2.2:3260"


def clean(host, portal, rate=0.0):
    return PathSample(host, portal, retrans_per_s=rate, sent_bytes_per_s=100_000.0, retrans_bytes_per_s=0.0,
                      established=1)


def lossy(host, portal, rate=3.0, ratio=0.05):
    return PathSample(host, portal, retrans_per_s=rate, sent_bytes_per_s=10_000.0,
                      retrans_bytes_per_s=10_000.0 * ratio, established=1)


def summary(rep):
    return rep.portals, rep.hosts, [(f.scope, f.subject, f.verdict, f.bad) for f in rep.findings]


# -- the judgement -------------------------------------------------------------------


def test_all_clean_is_ok():
    rep = analyse([clean(A, P1), clean(A, P2), clean(B, P1), clean(B, P2)])
    assert summary(rep) == ({P1: "ok", P2: "ok"}, {A: "ok", B: "ok"}, [])
    assert not rep.problems


def test_same_portal_bad_from_every_host_is_portal_wide():
    rep = analyse([lossy(A, P1), clean(A, P2), lossy(B, P1), clean(B, P2)])
    assert summary(rep) == ({P1: "portal-wide", P2: "ok"}, {A: "portal-wide", B: "portal-wide"},
                            [("portal", P1, "portal-wide", (A, B))])
    assert "target" in rep.findings[0].look_at


def test_one_host_bad_on_every_portal_is_its_nic():
    rep = analyse([clean(A, P1), clean(A, P2), lossy(B, P1), lossy(B, P2)])
    assert summary(rep) == ({P1: "host-local", P2: "host-local"}, {A: "ok", B: "host-local"},
                            [("host", B, "host-local", (P1, P2))])
    assert "NIC" in rep.findings[0].look_at and rep.findings[0].clean == ()


def test_one_host_bad_on_one_portal_is_that_path():
    rep = analyse([clean(A, P1), clean(A, P2), lossy(B, P1), clean(B, P2)])
    assert summary(rep) == ({P1: "host-local", P2: "ok"}, {A: "ok", B: "host-local"},
                            [("host", B, "host-local", (P1,))])
    assert "path to " + P1 in rep.findings[0].look_at and rep.findings[0].clean == (P2,)


def test_portal_wide_needs_the_share_of_hosts():
    # 2 of 5 hosts bad on P1: below half, so each bad host's own path
    samples = [lossy(A, P1), lossy(B, P1)] + [clean(h, P1) for h in ("d", "e", "f")]
    rep = analyse(samples)
    assert rep.portals == {P1: "host-local"}
    assert [(f.subject, f.verdict) for f in rep.findings] == [(A, "host-local"), (B, "host-local")]
    assert analyse(samples, Thresholds(portal_share=0.4)).portals == {P1: "portal-wide"}


def test_a_portal_only_one_host_uses_cannot_be_placed():
    rep = analyse([lossy(A, P1), clean(B, P2)])
    assert summary(rep) == ({P1: "single-host", P2: "ok"}, {A: "single-host", B: "ok"},
                            [("portal", P1, "single-host", (A,))])


def test_unreachable_portal_is_bad_without_retransmit_counters():
    s = PathSample(A, P1, established=0, other_states={"SYN_SENT": 1})
    v = judge_path(s, Thresholds())
    assert v.bad and "no established connection (1 SYN_SENT)" in v.why
    rep = analyse([s, PathSample(B, P1, established=0, other_states={"SYN_SENT": 2})])
    assert rep.portals == {P1: "portal-wide"}


def test_thresholds_rate_and_ratio_both_needed():
    t = Thresholds(min_retrans_per_s=0.5, min_ratio=0.01)
    assert not judge_path(lossy(A, P1, rate=0.4), t).bad          # one tail-loss probe on an idle link
    v = judge_path(lossy(A, P1, rate=5.0, ratio=0.001), t)       # a busy link, 0.1% of bytes
    assert not v.bad and "only 0.10%" in v.why
    assert judge_path(lossy(A, P1, rate=0.5, ratio=0.01), t).bad  # bounds are inclusive
    # no byte counters (older agent): the rate alone decides
    assert judge_path(PathSample(A, P1, retrans_per_s=2.0), t).bad
    assert judge_path(PathSample(A, P1), t).why == "no data"
    assert not judge_path(clean(A, P1), Thresholds(min_retrans_per_s=0, min_ratio=0)).bad


def test_bad_thresholds_and_duplicates_are_refused():
    for kw in ({"min_ratio": 2}, {"portal_share": 0}, {"min_retrans_per_s": -1}, {"min_ratio": float("nan")}):
        with pytest.raises(ValueError):
            Thresholds(**kw)
    with pytest.raises(ValueError, match="two samples"):
        analyse([clean(A, P1), lossy(A, P1)])


# -- input checks ----------------------------------------------------------------------


def test_window_url_and_selector_checks():
    assert parse_window("30s") == 30 and parse_window("5m") == 300 and parse_window("2h") == 7200
    for bad in ("", "5", "-1m", "1.5m", "5x", "8d"):
        with pytest.raises(ConfigError):
            parse_window(bad)
    for bad in ("", "prometheus:9090", "ftp://x", "http://", "http://h:99999"):
        with pytest.raises(ConfigError):
            check_url(bad)
    with pytest.raises(ConfigError, match="without braces"):
        check_selector('{job="kvmscope"}')
    q = queries(60, "host", 'job="kvmscope"')
    assert q["retrans"] == ('sum by (host, portal) (rate(kvmscope_storage_connection_retransmitted_segments_total'
                            '{job="kvmscope"}[60s]))')
    assert "up" not in queries(60, "instance", "")


def test_basic_auth_comes_from_the_url_and_is_not_in_the_base():
    p = Prometheus("https://user:p%40ss@prom.example:9090/prom/")
    assert p.base == "https://prom.example:9090/prom" and p.auth == "Basic dXNlcjpwQHNz"


# -- the client against HTTP servers that are not (well-behaved) Prometheus --------------


class _Canned(BaseHTTPRequestHandler):
    answers: dict = {}

    def do_GET(self):  # noqa: N802
        code, ctype, body = self.answers[self.server.mode]
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


_Canned.answers = {
    "html": (200, "text/html", b"<html>Grafana</html>"),
    "404": (404, "text/plain", b"404 page not found"),
    "bad_data": (400, "application/json",
                 b'{"status":"error","errorType":"bad_data","error":"parse error at char 5"}'),
    "matrix": (200, "application/json", b'{"status":"success","data":{"resultType":"matrix","result":[]}}'),
    "nohost": (200, "application/json", json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": {"instance": "10.0.0.1:9847", "portal": P1}, "value": [1, "0.5"]}]}}).encode()),
    "badvalue": (200, "application/json", json.dumps({"status": "success", "data": {"resultType": "vector",
                 "result": [{"metric": {"host": A, "portal": P1}, "value": [1]}]}}).encode()),
}


@pytest.fixture
def canned():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def client(mode):
        srv.mode = mode
        return Prometheus(f"http://127.0.0.1:{srv.server_address[1]}", timeout=5)

    yield client
    srv.shutdown()
    srv.server_close()


@pytest.mark.parametrize("mode,message", [
    ("html", "did not answer like the Prometheus HTTP API"),
    ("404", "answered HTTP 404"),
    ("bad_data", "refused the query (400 bad_data): parse error at char 5"),
    ("matrix", "expected a vector"),
])
def test_wrong_answers_are_clear_errors(canned, mode, message):
    with pytest.raises(KvmscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        canned(mode).query("up")


def test_series_without_the_host_label_say_what_to_do(canned):
    with pytest.raises(KvmscopeError, match="no 'host' label.*--host-label instance"):
        collect(canned("nohost"), 60)
    with pytest.raises(KvmscopeError, match="unexpected sample"):
        collect(canned("badvalue"), 60)


def test_unreachable_prometheus_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(KvmscopeError, match="cannot reach Prometheus"):
        Prometheus(f"http://127.0.0.1:{port}", timeout=5).query("up")


class _Recorder(BaseHTTPRequestHandler):
    """Answers an empty vector, or redirects /moved to server.redirect_to; records each Authorization."""

    def do_GET(self):  # noqa: N802
        self.server.seen.append((self.path.split("?")[0], self.headers.get("Authorization")))
        if self.path.startswith("/moved"):
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to + "/api/v1/query?query=up")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def recorders():
    servers = []
    for _ in range(2):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
        srv.seen = []
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    yield servers
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_credentials_are_not_sent_on_a_redirect_to_another_port(recorders):
    a, b = recorders
    a.redirect_to = f"http://127.0.0.1:{b.server_address[1]}"
    assert Prometheus(f"http://u:secret@127.0.0.1:{a.server_address[1]}/moved", timeout=5).query("up") == []
    assert a.seen == [("/moved/api/v1/query", "Basic dTpzZWNyZXQ=")]
    assert b.seen == [("/api/v1/query", None)]


def test_credentials_follow_a_redirect_on_the_same_origin(recorders):
    a, _ = recorders
    a.redirect_to = f"http://127.0.0.1:{a.server_address[1]}/prom"
    assert Prometheus(f"http://u:secret@127.0.0.1:{a.server_address[1]}/moved", timeout=5).query("up") == []
    assert a.seen == [("/moved/api/v1/query", "Basic dTpzZWNyZXQ="), ("/prom/api/v1/query", "Basic dTpzZWNyZXQ=")]


# -- the whole command against a real Prometheus with backfilled series ----------------------


def _openmetrics(t0: int, steps: int) -> str:
    """Two hosts scraped every 15 s for `steps` scrapes: A loses on P1 (3 segments/s, 5% of
    bytes), B is clean; both have one established connection per portal; C's agent is up with no
    storage connections."""
    types = {"kvmscope_storage_connection_retransmitted_segments_total": "counter",
             "kvmscope_storage_connection_bytes_total": "counter"}
    lines = []
    series = {}
    for host in (A, B, C):
        series.setdefault("up", []).append((f'job="kvmscope",host="{host}"', lambda i: 1))
        series.setdefault("kvmscope_build_info", []).append((f'job="kvmscope",host="{host}"', lambda i: 1))
    for host in (A, B):
        for portal in (P1, P2):
            lab = f'job="kvmscope",host="{host}",portal="{portal}",local="10.0.0.1:5000",vm="",disk=""'
            loss = host == A and portal == P1
            series.setdefault("kvmscope_storage_connection_retransmitted_segments_total", []).append(
                (lab, (lambda i: 45 * i) if loss else (lambda i: 0)))
            series.setdefault("kvmscope_storage_connection_bytes_total", []).extend([
                (lab + ',direction="sent"', lambda i: 150_000 * i),
                (lab + ',direction="retransmitted"', (lambda i: 7_500 * i) if loss else (lambda i: 0))])
            series.setdefault("kvmscope_storage_connections", []).append(
                (f'job="kvmscope",host="{host}",portal="{portal}",state="ESTABLISHED"', lambda i: 1))
    for name, ss in series.items():
        kind = types.get(name, "gauge")
        lines.append(f"# TYPE {name.removesuffix('_total') if kind == 'counter' else name} {kind}")
        for labels, fn in ss:
            for i in range(steps):
                lines.append(f"{name}{{{labels}}} {fn(i)} {t0 + 15 * i}")
    return "\n".join(lines) + "\n# EOF\n"


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory):
    prom, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not prom or not promtool:
        print("SKIP real-Prometheus fleet tests: prometheus/promtool not installed (Debian prometheus)",
              file=sys.stderr)
        pytest.skip("prometheus/promtool not installed (Debian prometheus)")
    tmp = tmp_path_factory.mktemp("fleetprom")
    t0 = (int(time.time()) // 3600 - 3) * 3600  # three hours ago, whole hour
    (tmp / "data.om").write_text(_openmetrics(t0, 41))  # 10 minutes
    r = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(tmp / "data.om"),
                        str(tmp / "data")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp / "prometheus.yml").write_text("global: {}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "prometheus.log", "w")
    p = subprocess.Popen([prom, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=30d"],
                         stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/-/ready", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > end or p.poll() is not None:
                    raise AssertionError("prometheus did not become ready: " + (tmp / "prometheus.log").read_text())
                time.sleep(0.3)
        yield base, t0 + 15 * 40
    finally:
        p.terminate()
        p.wait(10)
        log.close()


def fleet_cli(*args):
    return subprocess.run([sys.executable, "-m", "agent", "fleet", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_cli_judges_backfilled_series(backfilled):
    base, at = backfilled
    r = fleet_cli("-p", base, "--window", "5m", "--at", str(at), "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    paths = {(p["host"], p["portal"]): p for p in rep["paths"]}
    assert set(paths) == {(h, p) for h in (A, B) for p in (P1, P2)}
    assert paths[(A, P1)]["bad"] and paths[(A, P1)]["retrans_per_s"] == pytest.approx(3.0)
    assert paths[(A, P1)]["ratio"] == pytest.approx(0.05)
    assert [p for k, p in paths.items() if k != (A, P1) and p["bad"]] == []
    assert {p["established"] for p in paths.values()} == {1}
    assert {a["host"]: a["up"] for a in rep["agents"]} == {A: 1, B: 1, C: 1}
    assert [(f["scope"], f["subject"], f["verdict"]) for f in rep["findings"]] == [("host", A, "host-local")]
    t = fleet_cli("-p", base, "--window", "5m", "--at", str(at))
    assert t.returncode == 3
    assert "HOST-LOCAL: host kvm-a has bad paths to 198.18.1.2:3260" in t.stdout
    assert "hosts with no storage connections in the window: kvm-c" in t.stdout


def test_cli_clear_errors_from_a_real_prometheus(backfilled):
    base, at = backfilled
    r = fleet_cli("-p", base, "--window", "5m")  # now: the backfilled data is hours old
    assert r.returncode == 1 and "has no kvmscope series" in r.stderr and "Traceback" not in r.stderr
    r = fleet_cli("-p", base, "--at", "yesterday")
    assert r.returncode == 1 and "refused the query (400 bad_data)" in r.stderr, r.stderr
    r = fleet_cli("-p", base, "--at", str(at), "--selector", 'job=~"("')
    assert r.returncode == 1 and "refused the query" in r.stderr, r.stderr
    r = fleet_cli("-p", base, "--at", str(at), "--host-label", "instance")
    assert r.returncode == 1 and "no 'instance' label" in r.stderr, r.stderr
    r = fleet_cli("-p", base, "--window", "5")
    assert r.returncode == 2 and "--window '5'" in r.stderr
