"""Soak: ``kvmscope run`` on the real lab under churn, with bounded resources and no lost documents.

    python -m benchmarks.soak [--minutes 30] [--every 20] [--seed 1] [--no-doc]
    make soak                          # 30 minutes, writes the "soak" section of docs/reliability.md
    make soak ARGS='--minutes 5'

What runs (root, on this machine only; every address is loopback or the lab's
own namespaces):

* the lab (``deploy/lab/lab up --vms 2`` unless it is up already; taken down
  at the end only when this command brought it up);
* a real Elasticsearch node (``deploy/es/es``, its own state directory) behind
  a loopback proxy that this command controls, so that Elasticsearch can be
  made to refuse (HTTP 429 on every request, as a node under indexing pressure
  does) or to vanish (connections closed without an answer) on demand;
* ``kvmscope run`` (interval 2 s) shipping to that proxy through its spool, and
  writing the same documents to its JSON-lines file output, which is the
  record of every document the agent produced.

The churn, one action every ``--every`` seconds in a shuffled round robin:
``vm_restart`` (destroy + start a lab VM), ``vm_transient`` (start a transient
VM whose name has quotes and unicode, on a lab LUN; destroyed one action
later), ``sock_kill`` (``ss -K`` every iSCSI socket: QEMU reconnects),
``libvirtd_restart`` (SIGKILL, start again), ``agent_kill9`` (SIGKILL the agent,
start it again on the same spool), ``es_429``, ``es_down`` (for half an action
period each), and, in runs of 10 minutes or more, ``es_restart`` (the real
node stopped and started).

Every 5 s it samples the agent's RSS, open fds, threads, exported series and
spool bytes. At the end the churn stops and it waits until every collector
succeeds again and the spool is empty, stops the agent, and compares the
document ids in the file output with the ids in Elasticsearch:
lost = in the file, not in Elasticsearch and not dead-lettered; doubled =
Elasticsearch documents minus distinct ids.

The verdict (exit 0 only if every bound holds) is printed, written as JSON
next to the samples (``--results``), and, unless ``--no-doc``, as a section of
docs/reliability.md between "soak" markers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "deploy" / "lab" / "lab"
ES = ROOT / "deploy" / "es" / "es"
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- soak: begin -->", "<!-- soak: end -->"
LAB_DIR = os.environ.get("KVMSCOPE_LAB_DIR", "/var/tmp/kvmscope-lab")
URI = "qemu:///system"
TRANSIENT_PREFIX = "kvmslab-soak"


def log(msg: str) -> None:
    print(f"soak {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()[-500:]}")
    return p


# --- Elasticsearch behind a switchable proxy ---------------------------------------------------------------


class EsProxy:
    """A loopback HTTP proxy in front of a real Elasticsearch node.

    ``mode``: ``pass`` forwards; ``429`` answers every request as an overloaded
    node does (status 429, es_rejected_execution_exception); ``down`` closes
    each connection without an answer (the client sees a connection error).
    """

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection"}

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.mode = "pass"
        self.counts = {"pass": 0, "429": 0, "down": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                mode = proxy.mode
                proxy.counts[mode] += 1
                if mode == "down":
                    self.close_connection = True
                    return
                if mode == "429":
                    out = json.dumps({"error": {"type": "es_rejected_execution_exception",
                                                "reason": "soak: rejected"}, "status": 429}).encode()
                    self.send_response(429)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("X-Elastic-Product", "Elasticsearch")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    return
                req = urllib.request.Request(proxy.upstream + self.path, data=body, method=self.command)
                for k, v in self.headers.items():
                    if k.lower() not in self.HOP and k.lower() != "host":
                        req.add_header(k, v)
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        status, headers, data = r.status, r.headers.items(), r.read()
                except urllib.error.HTTPError as e:
                    status, headers, data = e.code, e.headers.items(), e.read()
                except OSError:
                    self.close_connection = True  # node restarting: a connection error for the client too
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in EsProxy.HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any

        Handler.HOP = self.HOP
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class EsNode:
    def __init__(self, state_dir: Path, port: int):
        self.dir, self.port = state_dir, port
        self.url = f"http://127.0.0.1:{port}"

    def es(self, *args: str, timeout: float = 300) -> None:
        run(["/usr/bin/python3", str(ES), *args, "--dir", str(self.dir)], timeout=timeout)

    def start(self) -> None:
        self.es("start", "--port", str(self.port))

    def stop(self) -> None:
        self.es("stop")

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def ids(self, namespace: str) -> tuple[list[str], int]:
        """Every document id of the namespace's data streams (search_after on event.id), and the count."""
        index = f"metrics-kvmscope.*-{namespace},logs-kvmscope.*-{namespace}"
        self.request("POST", f"/{index}/_refresh?ignore_unavailable=true&allow_no_indices=true")
        count = self.request("POST", f"/{index}/_count?ignore_unavailable=true&allow_no_indices=true")["count"]
        out: list[str] = []
        after = None
        while True:
            body = {"size": 5000, "_source": False, "sort": [{"event.id": "asc"}], "fields": ["event.id"]}
            if after:
                body["search_after"] = after
            hits = self.request("POST", f"/{index}/_search?ignore_unavailable=true&allow_no_indices=true",
                                body)["hits"]["hits"]
            if not hits:
                return out, count
            out.extend(h["_id"] for h in hits)
            after = hits[-1]["sort"]


# --- the agent -----------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProc:
    def __init__(self, work: Path, es_url: str, namespace: str, interval: float):
        self.work = work
        self.port = free_port()
        self.log = open(work / "agent.log", "ab")
        self.cfg = work / "config.yaml"
        self.file_out = work / "out" / "kvmscope.ndjson"
        self.spool = work / "spool"
        self.cfg.write_text(json.dumps({  # JSON is YAML
            "agent": {"interval": interval},
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            "api": {"socket": str(work / "api.sock")},  # not /run/kvmscope's (a kill -9 leaves it stale)
            "elasticsearch": {"enabled": True, "hosts": [es_url], "namespace": namespace,
                              "spool_dir": str(self.spool), "retry_max": 5, "request_timeout": 10},
            "file_output": {"enabled": True, "path": str(self.file_out), "max_bytes": 256 * 1024 * 1024, "keep": 20},
            "storage_log": {"state_dir": str(work / "storage_log")},
        }))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(self.cfg), "run", "--quiet"],
                                     stdout=self.log, stderr=self.log, cwd=str(ROOT))
        self.starts += 1
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}; see {self.work / 'agent.log'}")
            try:
                if "kvmscope_collector_success" in self.metrics():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("agent did not serve /metrics within 60 s")

    def kill9(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> int:
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()


def metric_values(text: str, name: str) -> list[tuple[str, float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line.rpartition(" ")
            out.append((labels[len(name):], float(value)))
    return out


@dataclass
class Sample:
    t: float
    pid: int
    rss_mb: float
    fds: int
    threads: int
    series: int
    spool_bytes: int
    queued: float
    collectors_failed: int
    action: str = ""


def sample(agent: AgentProc, t0: float, action: str) -> Sample | None:
    p = agent.proc
    if p is None or p.poll() is not None:
        return None
    try:
        status = Path(f"/proc/{p.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds = len(os.listdir(f"/proc/{p.pid}/fd"))
        text = agent.metrics()
    except (OSError, AttributeError):
        return None
    series = sum(1 for ln in text.splitlines() if ln and not ln.startswith("#"))
    spool = sum(f.stat().st_size for f in agent.spool.glob("*") if f.is_file()) if agent.spool.exists() else 0
    queued = sum(v for _, v in metric_values(text, "kvmscope_shipping_queued_documents"))
    failed = sum(1 for _, v in metric_values(text, "kvmscope_collector_success") if v == 0)
    return Sample(round(time.monotonic() - t0, 1), p.pid, round(rss, 1), fds, threads, series, spool, queued, failed,
                  action)


# --- the churn -----------------------------------------------------------------------------------------------


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["virsh", "-c", URI, *args], timeout=60, check=check)


class Churn:
    def __init__(self, agent: AgentProc, proxy: EsProxy, node: EsNode, period: float, rng: random.Random,
                 real_es_restart: bool, work: Path):
        self.agent, self.proxy, self.node, self.period, self.rng, self.work = agent, proxy, node, period, rng, work
        self.transient: str | None = None
        self.n = 0
        self.done: dict[str, int] = {}
        self.errors: list[str] = []
        self.actions = ["vm_restart", "vm_transient", "sock_kill", "libvirtd_restart", "agent_kill9", "es_429",
                        "es_down"] + (["es_restart"] if real_es_restart else [])
        self._queue: list[str] = []

    def next(self) -> str:
        if not self._queue:
            self._queue = self.actions[:]
            self.rng.shuffle(self._queue)
        name = self._queue.pop()
        if self.transient and name != "vm_transient":
            self._end_transient()
        try:
            getattr(self, name)()
            self.done[name] = self.done.get(name, 0) + 1
        except Exception as e:  # noqa: BLE001 - a failed fault is recorded, the soak goes on
            self.errors.append(f"{name}: {e}")
            log(f"{name} failed: {e}")
        return name

    def _lab_vms(self) -> list[str]:
        out = virsh("list", "--name").stdout.split()
        return sorted(n for n in out if n.startswith("kvmslab-vm"))

    def vm_restart(self) -> None:
        vm = self.rng.choice(self._lab_vms())
        virsh("destroy", vm)
        virsh("start", vm)

    def vm_transient(self) -> None:
        if self.transient:
            self._end_transient()
            return
        base = self._lab_vms()[0]
        xml = virsh("dumpxml", base).stdout
        self.n += 1
        name = f"{TRANSIENT_PREFIX}-{self.n} \"quoted\" \u00fc\u00df"
        xml = re.sub(r"<name>[^<]*</name>", f"<name>{_xml_escape(name)}</name>", xml, count=1)
        xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml)
        xml = re.sub(r"<mac address=[^/]*/>", "", xml)
        xml = re.sub(r"(<source path=')[^']*console[^']*(')", rf"\g<1>{self.work}/transient-{self.n}.console\2", xml)
        xml = re.sub(r"<seclabel[^>]*>.*?</seclabel>|<seclabel[^>]*/>", "", xml, flags=re.S)
        # vdb is the base VM's private file: the transient VM keeps only its iSCSI disk
        xml = re.sub(r"<disk type='file'.*?</disk>", "", xml, flags=re.S)
        path = self.work / "transient.xml"
        path.write_text(xml)
        virsh("create", str(path))
        self.transient = name

    def _end_transient(self) -> None:
        name, self.transient = self.transient, None
        virsh("destroy", name, check=False)

    def sock_kill(self) -> None:
        run(["ss", "-K", "-t", "state", "established", "( dport = :3260 )"], check=False)

    def libvirtd_restart(self) -> None:
        pids = run(["pgrep", "-x", "libvirtd"], check=False).stdout.split()
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        time.sleep(1)
        run(["libvirtd", "-d", "-p", os.path.join(LAB_DIR, "libvirtd.pid")])
        end = time.monotonic() + 30
        while virsh("list", check=False).returncode != 0:
            if time.monotonic() > end:
                raise RuntimeError("libvirtd did not answer within 30 s of its restart")
            time.sleep(0.5)

    def agent_kill9(self) -> None:
        self.agent.kill9()
        time.sleep(1)
        self.agent.start()

    def _hold(self, mode: str) -> None:
        self.proxy.mode = mode
        threading.Timer(self.period / 2, lambda: setattr(self.proxy, "mode", "pass")).start()

    def es_429(self) -> None:
        self._hold("429")

    def es_down(self) -> None:
        self._hold("down")

    def es_restart(self) -> None:
        self.node.stop()
        self.node.start()

    def finish(self) -> None:
        if self.transient:
            self._end_transient()
        self.proxy.mode = "pass"


def _xml_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


# --- bounds and verdict --------------------------------------------------------------------------------------


@dataclass
class Result:
    minutes: float
    actions: dict
    action_errors: list
    agent_starts: int
    samples: list = field(default_factory=list)
    bounds: dict = field(default_factory=dict)
    documents: dict = field(default_factory=dict)
    recovered: bool = False
    ok: bool = False


def judge(samples: list[Sample], spool_max: int) -> dict:
    """Bounds over the run, after a 60 s warm-up; each bound is [value, limit, held]."""
    warm = [s for s in samples if s.t >= 60] or samples
    first = warm[: max(1, len(warm) // 3)]
    last = warm[-max(1, len(warm) // 3):]
    base_rss = max(s.rss_mb for s in first)
    base_series = max(s.series for s in first)
    b = {
        "rss_mb_last_third_max": (max(s.rss_mb for s in last), round(base_rss * 1.25 + 16, 1)),
        "fds_max": (max(s.fds for s in warm), 256),
        "threads_max": (max(s.threads for s in warm), 64),
        "series_max": (max(s.series for s in warm), base_series * 2),
        "series_last_third_max": (max(s.series for s in last), round(base_series * 1.5)),
        "spool_bytes_max": (max(s.spool_bytes for s in warm), spool_max),
    }
    return {k: [v, lim, v <= lim] for k, (v, lim) in b.items()}


def file_ids(out_dir: Path) -> list[str]:
    ids = []
    for f in sorted(out_dir.glob("kvmscope.ndjson*")):
        for line in f.read_text(errors="replace").splitlines():
            try:
                ids.append(json.loads(line)["event"]["id"])
            except (ValueError, KeyError, TypeError):
                pass  # a torn last line after kill -9 carries no document the spool did not have
    return ids


def dead_ids(spool: Path) -> set[str]:
    out = set()
    f = spool / "dead-letter.ndjson"
    if f.exists():
        for line in f.read_text(errors="replace").splitlines():
            try:
                d = json.loads(line)
                out.add(d.get("id") or d["doc"]["event"]["id"])
            except (ValueError, KeyError, TypeError):
                pass
    return out


def soak(minutes: float, every: float, seed: int = 1, interval: float = 2.0, real_es_restart: bool | None = None,
         lab_up: bool = True, work: Path | None = None) -> Result:
    """Run the soak; the lab must be up (or ``lab_up`` brings it up). Returns the result; raises on a broken rig."""
    if os.geteuid() != 0:
        raise SystemExit("soak: run as root (lab, eBPF, Elasticsearch)")
    own_work = work is None
    work = work or Path(tempfile.mkdtemp(prefix="kvmscope-soak-", dir="/var/tmp"))
    brought_up = False
    if lab_up:
        st = run(["/usr/bin/python3", str(LAB), "status", "--json"], check=False, timeout=120)
        try:
            was_up = bool(json.loads(st.stdout).get("vms"))
        except ValueError:
            was_up = False
        log("checking the lab (lab up --vms 2: idempotent, repairs what is missing)")
        run(["/usr/bin/python3", str(LAB), "up", "--vms", "2"], timeout=900)
        brought_up = not was_up
    if not [n for n in virsh("list", "--name").stdout.split() if n.startswith("kvmslab-vm")]:
        raise RuntimeError("no running lab VM (kvmslab-vm*): the soak needs the lab up")
    if real_es_restart is None:
        real_es_restart = minutes >= 10
    node = EsNode(Path("/var/lib/kvmscope-es/soak"), free_port())
    log(f"starting Elasticsearch on {node.url}")
    node.start()
    proxy = EsProxy(node.url)
    namespace = f"soak{int(time.time())}"
    agent = AgentProc(work, proxy.url, namespace, interval)
    res = Result(minutes, {}, [], 0)
    samples: list[Sample] = []
    stop = threading.Event()
    current = {"action": "start"}

    def sampler():
        t0 = time.monotonic()
        while not stop.wait(5):
            s = sample(agent, t0, current["action"])
            if s:
                samples.append(s)

    try:
        agent.start()
        log(f"agent up (pid {agent.proc.pid}, /metrics on 127.0.0.1:{agent.port}); churn for {minutes} min, "
            f"one action every {every:g} s")
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        churn = Churn(agent, proxy, node, every, random.Random(seed), real_es_restart, work)
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            current["action"] = churn.next()
            last = samples[-1] if samples else None
            log(f"{current['action']:<17} rss {last.rss_mb if last else '-'} MB, series {last.series if last else '-'}, "
                f"queued {last.queued if last else '-'}")
            time.sleep(max(0.0, min(every, end - time.monotonic())))
        churn.finish()
        current["action"] = "recover"
        log("churn over: waiting for every collector to succeed and the spool to drain")
        res.recovered = _wait_recovered(agent, timeout=240)
        stop.set()
        th.join(10)
        rc = agent.stop()
        log(f"agent stopped (exit {rc})")
        fids = file_ids(agent.file_out.parent)
        es_ids, es_count = node.ids(namespace)
        dead = dead_ids(agent.spool)
        es_set = set(es_ids)
        lost = sorted(set(fids) - es_set - dead)
        res.documents = {"produced": len(set(fids)), "in_elasticsearch": es_count, "distinct_ids": len(es_set),
                         "doubled": es_count - len(es_set), "lost": len(lost), "lost_examples": lost[:5],
                         "dead_lettered": len(dead), "file_lines_repeated": len(fids) - len(set(fids))}
        res.actions, res.action_errors, res.agent_starts = churn.done, churn.errors, agent.starts
        res.samples = [asdict(s) for s in samples]
        res.bounds = judge(samples, 256 * 1024 * 1024) if samples else {}
        res.ok = (res.recovered and bool(samples) and all(h for _, _, h in res.bounds.values())
                  and res.documents["lost"] == 0 and res.documents["doubled"] == 0)
        return res
    finally:
        stop.set()
        agent.stop()
        proxy.close()
        try:
            node.stop()
        except Exception as e:  # noqa: BLE001
            log(f"could not stop Elasticsearch: {e}")
        virsh_list = run(["virsh", "-c", URI, "list", "--name"], check=False).stdout.splitlines()
        for n in virsh_list:
            if n.startswith(TRANSIENT_PREFIX):
                run(["virsh", "-c", URI, "destroy", n], check=False)
        if brought_up:
            run(["/usr/bin/python3", str(LAB), "down"], check=False, timeout=600)
        if own_work and res.ok:
            shutil.rmtree(work, ignore_errors=True)
        elif own_work:
            log(f"kept {work} for inspection")


def _wait_recovered(agent: AgentProc, timeout: float) -> bool:
    end = time.monotonic() + timeout
    good = 0
    while time.monotonic() < end:
        try:
            text = agent.metrics()
            failed = [lbl for lbl, v in metric_values(text, "kvmscope_collector_success") if v == 0]
            queued = sum(v for _, v in metric_values(text, "kvmscope_shipping_queued_documents"))
            good = good + 1 if not failed and queued == 0 else 0
            if good >= 3:
                return True
        except (OSError, http.client.HTTPException):
            good = 0
        time.sleep(2)
    return False


def render(res: Result, rows: int = 16) -> str:
    s = res.samples
    step = max(1, len(s) // rows)
    pick = s[::step]
    if s and pick[-1] is not s[-1]:
        pick.append(s[-1])
    out = [BEGIN, "",
           f"Run on {time.strftime('%Y-%m-%d')}, {res.minutes:g} minutes, load average "
           f"{os.getloadavg()[0]:.2f} at the end, agent started {res.agent_starts} times. "
           f"Verdict: **{'all bounds held' if res.ok else 'FAILED'}**.", "",
           "Actions: " + ", ".join(f"{k} x{v}" for k, v in sorted(res.actions.items()))
           + (f"; failed actions: {len(res.action_errors)}" if res.action_errors else "") + ".", "",
           "| bound | value | limit | held |", "|---|---:|---:|---|"]
    for k, (v, lim, ok) in res.bounds.items():
        out.append(f"| {k} | {v} | {lim} | {'yes' if ok else 'NO'} |")
    d = res.documents
    out += ["", f"Documents: {d.get('produced')} produced (file output), {d.get('in_elasticsearch')} in "
                f"Elasticsearch, {d.get('lost')} lost, {d.get('doubled')} doubled, {d.get('dead_lettered')} "
                f"dead-lettered; every collector recovered: {'yes' if res.recovered else 'NO'}.", "",
            "| t (s) | pid | RSS (MB) | fds | threads | series | spool (KB) | queued | failed collectors | action |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in pick:
        out.append(f"| {r['t']:.0f} | {r['pid']} | {r['rss_mb']} | {r['fds']} | {r['threads']} | {r['series']} | "
                   f"{r['spool_bytes'] // 1024} | {r['queued']:.0f} | {r['collectors_failed']} | {r['action']} |")
    out += ["", END]
    return "\n".join(out)


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Reliability\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Soak with churn\n\n`make soak` (`python -m benchmarks.soak`); " \
            "a 3-minute variant runs in `make test` (tests/lab/test_soak.py).\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n  python -m benchmarks.soak --minutes 30\n"
                                        "  python -m benchmarks.soak --minutes 3 --every 8 --no-doc")
    ap.add_argument("--minutes", type=float, default=30, help="churn duration (default 30)")
    ap.add_argument("--every", type=float, default=20, help="seconds between churn actions (default 20)")
    ap.add_argument("--seed", type=int, default=1, help="shuffle seed of the action order")
    ap.add_argument("--interval", type=float, default=2.0, help="agent interval in seconds (default 2)")
    ap.add_argument("--results", type=Path, help="write the full result (all samples) as JSON here")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/reliability.md")
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.every < 2:
        ap.error("--minutes must be > 0 and --every >= 2")
    import fcntl

    # the lab is shared with the lab tests: take turns through their lock (tests/lab/conftest.py)
    lock = open("/run/kvmscope-lab.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log("waiting for the lab lock /run/kvmscope-lab.lock (a lab test session is running)")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        res = soak(a.minutes, a.every, a.seed, a.interval)
    finally:
        lock.close()
    section = render(res)
    print(section)
    if a.results:
        a.results.write_text(json.dumps(asdict(res), indent=1))
    if not a.no_doc:
        write_doc(section)
        log(f"wrote {DOC}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
