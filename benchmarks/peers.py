"""kvmscope beside the exporters it replaces, on the lab, and its time to answer a fault.

    python -m benchmarks.peers [--vms 4] [--interval 5] [--seconds 120] [--no-faults] [--no-write]
    make bench                      # this, then benchmarks.cycle and make bench-probes

What runs (root; every address is loopback or the lab's own namespace):

* the lab (``deploy/lab/lab up --vms 4``, brought down at the end), under
  the lab lock ``/run/kvmscope-lab.lock`` for the whole run;
* ``kvmscope run`` (default configuration: every collector, the three eBPF
  probes, live diagnosis; ``--interval``), Debian's
  ``prometheus-node-exporter`` (default collectors) and
  ``prometheus-libvirt-exporter`` (qemu:///system), each on its own
  127.0.0.1 port, each started by this command and stopped at its end;
* a real Prometheus (Debian's, a temporary TSDB) scraping all three every
  ``--interval`` seconds, with its own request headers (gzip, content
  negotiation).

Measured over ``--seconds`` after a warm-up of three intervals (kvmscope's
start-up, which compiles its probes, is not in the window): each process's
CPU time (utime + stime from /proc/PID/stat, children included) as a share
of one core, its RSS at the end and the highest seen (sampled every
second), and the samples per scrape (Prometheus' ``scrape_samples_scraped``).

Then, unless ``--no-faults``, the time to answer: each lab fault in turn
(5% loss on portal 1, the target throttled to 20 IOPS, portal 2 offline) is
applied and kvmscope's /metrics is read every 0.5 s until
``kvmscope_diagnosis_findings`` holds the rule that names it (packet_loss,
slow_target, path_down) with a subject it did not hold before the fault;
the wait is reported in agent intervals (goal: <= 2). The fault is then
cleared and its finding left to age out of the diagnosis window.

Results go to docs/performance.md between the "side-by-side benchmark"
markers, with the date and the machine's load.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from benchmarks._doc import write_section

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "deploy" / "lab" / "lab"
LAB_PYTHON = "/usr/bin/python3"
LOCK = "/run/kvmscope-lab.lock"
BEGIN, END = "<!-- side-by-side benchmark: begin -->", "<!-- side-by-side benchmark: end -->"
PEERS = {"node_exporter": "prometheus-node-exporter", "libvirt exporter": "prometheus-libvirt-exporter"}
# (lab arguments to apply, lab arguments to clear, the rule that names it)
FAULTS = (
    ("5% loss on portal 1", ("loss", "5", "--portal", "1"), ("loss", "0"), "packet_loss"),
    ("target throttled to 20 IOPS", ("throttle-target", "20"), ("throttle-target", "off"), "slow_target"),
    ("portal 2 offline", ("target-offline", "--portal", "2"), ("target-online",), "path_down"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(msg: str) -> None:
    print(f"bench {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


def lab(*args: str, timeout: float = 600) -> None:
    p = subprocess.run([LAB_PYTHON, str(LAB), *args], capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"lab {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-800:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2:].split()
    return sum(int(x) for x in f[11:15]) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


class Prometheus:
    def __init__(self, work: Path, targets: dict[str, int], interval: float):
        self.port = free_port()
        config = {
            "global": {"scrape_interval": f"{interval:g}s", "evaluation_interval": f"{interval:g}s",
                       "scrape_timeout": f"{min(interval, 10) * 0.8:g}s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                               for job, port in targets.items()],
        }
        (work / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(work / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, expr: str) -> list:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        body = json.loads(http_get(url))
        return body["data"]["result"]

    def by_job(self, expr: str) -> dict[str, float]:
        return {r["metric"].get("job", ""): float(r["value"][1]) for r in self.query(expr)}


def wait_for(fn, timeout: float, what: str, step: float = 1.0):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # not up yet
            last = e
        time.sleep(step)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what} ({last})")


def findings(port: int) -> set[tuple[str, str]]:
    """(rule, subject) of every kvmscope_diagnosis_findings sample on the agent's /metrics."""
    body = http_get(f"http://127.0.0.1:{port}/metrics").decode()
    out = set()
    for line in body.splitlines():
        if line.startswith("kvmscope_diagnosis_findings{"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', line[: line.rindex("}") + 1]))
            out.add((labels.get("rule", ""), labels.get("subject", "")))
    return out


def start(argv: list[str], work: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    out = open(work / f"{name}.log", "w")
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def side_by_side(args, work: Path) -> dict:
    ports = {"kvmscope": free_port(), "node_exporter": free_port(), "libvirt exporter": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    env.update({"KVMSCOPE_API__SOCKET": str(work / "api.sock"),
                "KVMSCOPE_STORAGE_LOG__STATE_DIR": str(work / "storage_log")})
    procs: dict[str, subprocess.Popen] = {}
    prom = None
    try:
        procs["kvmscope"] = start([sys.executable, "-m", "agent", "run", "--quiet", "--listen",
                                   f"127.0.0.1:{ports['kvmscope']}", "--interval", f"{args.interval:g}"],
                                  work, "kvmscope", env)
        procs["node_exporter"] = start([shutil.which(PEERS["node_exporter"]),
                                        f"--web.listen-address=127.0.0.1:{ports['node_exporter']}"], work, "node")
        procs["libvirt exporter"] = start([shutil.which(PEERS["libvirt exporter"]),
                                           f"--web.listen-address=127.0.0.1:{ports['libvirt exporter']}",
                                           "--libvirt.uri=qemu:///system"], work, "libvirt")
        prom = Prometheus(work, ports, args.interval)
        wait_for(lambda: len([v for v in prom.by_job("up").values() if v == 1]) == 3, 90,
                 "Prometheus scraping all three (up == 1)")
        wait_for(lambda: prom.query('kvmscope_collector_nodata{collector=~"ebpf_.*"} == 0'), 90,
                 "kvmscope's eBPF probes reporting")
        log(f"all three up and scraped every {args.interval:g}s; warm-up {3 * args.interval:g}s")
        time.sleep(3 * args.interval)
        pids = {name: p.pid for name, p in procs.items()}
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0, load0 = time.monotonic(), os.getloadavg()
        rss_max = {name: 0 for name in pids}
        log(f"measuring for {args.seconds:g}s")
        while time.monotonic() - t0 < args.seconds:
            for name, pid in pids.items():
                rss_max[name] = max(rss_max[name], rss_bytes(pid))
            time.sleep(1.0)
        window = time.monotonic() - t0
        cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        rss_end = {name: rss_bytes(pid) for name, pid in pids.items()}
        load1 = os.getloadavg()
        jobs = {"kvmscope": "kvmscope", "node_exporter": "node_exporter", "libvirt exporter": "libvirt exporter"}
        scraped = prom.by_job(f"avg_over_time(scrape_samples_scraped[{int(args.seconds)}s])")
        durations = prom.by_job(f"avg_over_time(scrape_duration_seconds[{int(args.seconds)}s])")
        scrapes = prom.by_job(f"count_over_time(up[{int(args.seconds)}s])")
        res = {
            "window": window, "load": (load0[0], load1[0]), "interval": args.interval,
            "rows": {name: {"cpu_pct": 100 * (cpu1[name] - cpu0[name]) / window, "rss_end": rss_end[name],
                            "rss_max": rss_max[name], "samples": scraped.get(jobs[name], float("nan")),
                            "scrape_ms": 1000 * durations.get(jobs[name], float("nan")),
                            "scrapes": scrapes.get(jobs[name], 0)} for name in pids},
        }
        if not args.no_faults:
            res["faults"] = time_to_answer(args, ports["kvmscope"])
        return res
    finally:
        stop([p for p in ([prom.proc] if prom else []) + list(procs.values())])
        if prom:
            prom.log.close()


def time_to_answer(args, port: int) -> list[dict]:
    out = []
    for n, (label, apply, clear, rule) in enumerate(FAULTS):
        before = {s for r, s in findings(port) if r == rule}
        log(f"fault: {label} (waiting for {rule})")
        lab(*apply)
        t0 = time.monotonic()
        found = None
        try:
            while time.monotonic() - t0 < args.answer_limit * args.interval:
                new = {s for r, s in findings(port) if r == rule} - before
                if new:
                    found = (time.monotonic() - t0, sorted(new))
                    break
                time.sleep(0.5)
        finally:
            lab(*clear)
        row = {"fault": label, "rule": rule, "seconds": found[0] if found else None,
               "intervals": found[0] / args.interval if found else None, "subjects": found[1] if found else []}
        log(f"  {row}")
        out.append(row)
        if n + 1 < len(FAULTS):  # let its finding age out of the 60 s window: the next starts from a quiet host
            time.sleep(args.settle)
    return out


def mb(b: float) -> str:
    return f"{b / 1e6:.0f} MB"


def report(args, r: dict) -> str:
    rows = r["rows"]
    k = rows["kvmscope"]
    peers_cpu = rows["node_exporter"]["cpu_pct"] + rows["libvirt exporter"]["cpu_pct"]
    peers_rss = rows["node_exporter"]["rss_end"] + rows["libvirt exporter"]["rss_end"]
    lines = [
        BEGIN,
        "## Side by side with the peers on the lab (`make bench`, `python -m benchmarks.peers`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on kernel {platform.release()}, "
        f"{os.cpu_count()} CPUs shared with other work (1-min load average {r['load'][0]:.1f} at the start of the "
        f"window, {r['load'][1]:.1f} at its end): the lab with {args.vms} VMs, `kvmscope run` (every default "
        f"collector, 3 eBPF probes, live diagnosis, interval {args.interval:g} s), Debian's "
        "`prometheus-node-exporter` (default collectors) and `prometheus-libvirt-exporter`, each scraped by one "
        f"Prometheus every {args.interval:g} s; window {r['window']:.0f} s after three intervals of warm-up.",
        "",
        "| | CPU (share of one core) | RSS at the end | RSS max | samples per scrape | scrape duration |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {v['cpu_pct']:.2f}% | {mb(v['rss_end'])} | {mb(v['rss_max'])} | {v['samples']:.0f} | "
          f"{v['scrape_ms']:.1f} ms |" for name, v in rows.items()),
        "",
        f"Goal 3 (kvmscope's CPU <= node_exporter + libvirt exporter): {k['cpu_pct']:.2f}% against "
        f"{peers_cpu:.2f}%: **{'met' if k['cpu_pct'] <= peers_cpu else 'not met'}**. "
        f"RSS: {mb(k['rss_end'])} against {mb(peers_rss)} together (x{k['rss_end'] / max(peers_rss, 1):.1f}).",
    ]
    if "faults" in r:
        lines += ["", f"Time to answer (goal 5: the live findings name the fault within 2 intervals of "
                  f"{args.interval:g} s; /metrics read every 0.5 s after the lab command returned):", "",
                  "| fault | rule | seconds | intervals | subject(s) named |", "|---|---|---:|---:|---|"]
        for f in r["faults"]:
            if f["seconds"] is None:
                lines.append(f"| {f['fault']} | {f['rule']} | not named within "
                             f"{args.answer_limit * args.interval:g} s | > {args.answer_limit} | |")
            else:
                lines.append(f"| {f['fault']} | {f['rule']} | {f['seconds']:.1f} | {f['intervals']:.1f} | "
                             f"{', '.join(f['subjects'])} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=120.0, help="measuring window (default 120)")
    ap.add_argument("--no-faults", action="store_true", help="skip the time-to-answer part")
    ap.add_argument("--answer-limit", type=int, default=8, help="intervals to wait for a finding (default 8)")
    ap.add_argument("--settle", type=float, default=65.0, help="seconds after clearing a fault (default 65)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.peers needs root (the lab)", file=sys.stderr)
        return 2
    missing = [b for b in (*PEERS.values(), "prometheus") if shutil.which(b) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (make setup-test installs them)", file=sys.stderr)
        return 2
    lock = open(LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"waiting for the lab lock {LOCK}")
        fcntl.flock(lock, fcntl.LOCK_EX)
    work = Path(tempfile.mkdtemp(prefix="kvmscope-bench-"))
    try:
        log(f"lab up --vms {args.vms}")
        lab("down")
        lab("up", "--vms", str(args.vms))
        r = side_by_side(args, work)
    finally:
        try:
            lab("down")
        finally:
            lock.close()
    shutil.rmtree(work, ignore_errors=True)
    text = report(args, r)
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
