"""Footprint of ``kvmscope run``: resident memory over time and start-up to the first full snapshot.

    python -m benchmarks.footprint [--minutes 30] [--vms 4] [--every 10] [--no-lab] [--no-doc]
    make footprint ARGS='--minutes 10'

What runs (root): the lab (``deploy/lab/lab up --vms N``, under the lab lock
/run/kvmscope-lab.lock, taken down at the end) unless ``--no-lab``; then
``kvmscope run`` with its default collectors (all eBPF probes included),
/metrics on a free loopback port, its local API on a socket of its own. It
is scraped every interval, as Prometheus would.

Measured:

* start-up: from just before the process is started to the end of the first
  snapshot in which every enabled eBPF collector is ``ok`` (read from the
  agent's own snapshots over its API: their timestamp + duration);
* resident memory every ``--every`` seconds (VmRSS, and its anonymous / file /
  shared parts), the high-water mark (VmHWM), threads; whether any LLVM, clang
  or libbcc is mapped in the agent;
* what the rest is: the largest mappings by resident size (/proc/PID/smaps).

Callable from other benchmarks: :func:`measure` (assumes the lab is up, or
not needed) returns a :class:`Footprint`; :func:`lab_session` is the lab under
its lock. The section of docs/performance.md between the "footprint" markers
is rewritten unless ``--no-doc``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks._doc import write_section

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "deploy" / "lab" / "lab"
LOCK = "/run/kvmscope-lab.lock"
BEGIN, END = "<!-- footprint: begin -->", "<!-- footprint: end -->"
LLVM_MARKS = ("libLLVM", "libclang", "libbcc")
EBPF_PREFIX = "ebpf_"


def log(msg: str) -> None:
    print(f"footprint {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sample:
    t: float  # seconds since start
    rss_kb: int
    anon_kb: int
    file_kb: int
    shmem_kb: int
    hwm_kb: int
    threads: int


@dataclass
class Footprint:
    date: str
    minutes: float
    interval: float
    vms: int
    disabled: list[str]
    startup_seconds: float | None  # to the end of the first snapshot with every eBPF collector ok
    first_full_seq: int | None
    ebpf: dict[str, str]  # collector -> status in the last snapshot
    llvm_mapped: list[str]
    samples: list[Sample] = field(default_factory=list)
    top_mappings: list[tuple[str, int]] = field(default_factory=list)  # (mapping, resident kB)
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    vms_seen: int = 0  # VMs in the agent's last snapshot
    history: int | None = None
    startup_cpu: dict[str, float] = field(default_factory=dict)  # agent / compiler children CPU seconds at start-up
    cache_entries: int = 0  # eBPF object cache entries (agent/ebpf/objcache.py) before the start: 0 = compiled

    def steady(self) -> dict[str, float]:
        """RSS (MB) in the last third of the run (the history full, in a run of 30 minutes): min, median, max,
        and the last sample; ``hwm_mb`` is the whole run's high-water mark."""
        skip = self.minutes * 60 * 2 / 3
        s = [x.rss_kb for x in self.samples if x.t >= skip] or [x.rss_kb for x in self.samples]
        if not s:
            return {}
        return {"min_mb": min(s) / 1024, "median_mb": statistics.median(s) / 1024, "max_mb": max(s) / 1024,
                "last_mb": s[-1] / 1024, "hwm_mb": self.samples[-1].hwm_kb / 1024}


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
            out[k] = int(v.split()[0])
    return out


def sample(pid: int, t: float) -> Sample:
    st = _status(pid)
    return Sample(round(t, 1), st["VmRSS"], st.get("RssAnon", 0), st.get("RssFile", 0), st.get("RssShmem", 0),
                  st["VmHWM"], st["Threads"])


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of the process itself and of its reaped children (the probe compilers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    hz = os.sysconf("SC_CLK_TCK")
    return {"agent": (int(fields[11]) + int(fields[12])) / hz, "children": (int(fields[13]) + int(fields[14])) / hz}


def llvm_mapped(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({ln.split()[-1] for ln in maps.splitlines() if any(m in ln for m in LLVM_MARKS)})


def top_mappings(pid: int, n: int = 10) -> list[tuple[str, int]]:
    """Resident kB per mapped file (anonymous memory as "[anon]", the heap as "[heap]"), largest first."""
    per: dict[str, int] = {}
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = parts[5] if len(parts) > 5 else "[anon]"
        elif parts and parts[0] == "Rss:":
            per[name] = per.get(name, 0) + int(parts[1])
    return sorted(per.items(), key=lambda kv: -kv[1])[:n]


def cache_entries() -> int:
    """Entries in the agent's default eBPF object cache (``ebpf.cache_dir``), which the runs here use."""
    from agent.config import EbpfConfig

    d = Path(EbpfConfig().cache_dir or "/nonexistent")
    return len(list(d.glob("*.json"))) if d.is_dir() else 0


class Agent:
    """``kvmscope run`` in a work directory of its own."""

    def __init__(self, work: Path, interval: float, disable: list[str], history: int | None = None):
        self.work = work
        self.port = free_port()
        self.sock = work / "api.sock"
        self.cfg = work / "config.yaml"
        self.cfg.write_text(json.dumps({  # JSON is YAML
            "agent": {"interval": interval, "collectors": {"disable": list(disable)}}
            | ({"history": history} if history else {}),
            "metrics": {"listen": f"127.0.0.1:{self.port}"},
            "api": {"socket": str(self.sock)},
            "storage_log": {"state_dir": str(work / "storage_log")},
        }))
        self.log = open(work / "agent.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
        self.started_at = time.time()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "--config", str(self.cfg), "run", "--quiet"],
                                     stdout=self.log, stderr=self.log, cwd=str(ROOT), env=env)

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def snapshots(self, last: int = 20):
        from agent.api import fetch_snapshots

        return fetch_snapshots(str(self.sock), timeout=5, last=last)[0]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def _first_full(agent: Agent, timeout: float) -> tuple[float | None, int | None, dict[str, str]]:
    """(seconds from process start to the end of the first snapshot with every eBPF collector ok, its seq,
    status per eBPF collector of the latest snapshot read)."""
    end = time.monotonic() + timeout
    statuses: dict[str, str] = {}
    while time.monotonic() < end:
        if agent.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {agent.proc.returncode}; see {agent.work / 'agent.log'}")
        try:
            snaps = agent.snapshots()
        except Exception:  # not serving yet
            time.sleep(0.1)
            continue
        for snap in sorted(snaps, key=lambda s: s.seq):
            ebpf = {n: h.status.value for n, h in snap.health.items() if n.startswith(EBPF_PREFIX)}
            statuses = {n: f"{h.status.value}{': ' + h.reason if h.reason else ''}"
                        for n, h in snap.health.items() if n.startswith(EBPF_PREFIX)}
            if ebpf and all(v == "ok" for v in ebpf.values()):
                return snap.timestamp + snap.duration_seconds - agent.started_at, snap.seq, statuses
        time.sleep(0.1)
    return None, None, statuses


def measure(minutes: float = 30.0, every: float = 10.0, interval: float = 5.0, vms: int = 0,
            disable: list[str] | None = None, work: Path | None = None, history: int | None = None) -> Footprint:
    """Run ``kvmscope run`` for ``minutes`` (the lab, if wanted, already up: ``vms`` is only recorded),
    scraping /metrics every interval; returns start-up, RSS samples and what is mapped."""
    own = work is None
    work = work or Path(tempfile.mkdtemp(prefix="kvmscope-footprint-"))
    agent = Agent(work, interval, disable or [], history)
    res = Footprint(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), minutes, interval, vms, list(disable or []),
                    None, None, {}, [], history=history)
    res.cache_entries = cache_entries()
    agent.start()
    try:
        res.startup_seconds, res.first_full_seq, res.ebpf = _first_full(agent, 120)
        res.startup_cpu = cpu_seconds(agent.proc.pid)
        if res.startup_seconds is not None:
            log(f"first full snapshot (seq {res.first_full_seq}) {res.startup_seconds:.2f} s after start")
        else:
            log(f"no snapshot with every eBPF collector ok within 120 s: {res.ebpf}")
        t_end = agent.started_at + minutes * 60
        next_sample = next_scrape = time.time()
        while time.time() < t_end:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.proc.returncode}; see {work / 'agent.log'}")
            now = time.time()
            if now >= next_scrape:
                with contextlib.suppress(OSError):
                    agent.scrape()
                next_scrape += interval
            if now >= next_sample:
                res.samples.append(sample(agent.proc.pid, now - agent.started_at))
                next_sample += every
            time.sleep(max(0.05, min(next_scrape, next_sample, t_end) - time.time()))
        res.samples.append(sample(agent.proc.pid, time.time() - agent.started_at))
        res.llvm_mapped = llvm_mapped(agent.proc.pid)
        res.top_mappings = top_mappings(agent.proc.pid)
        with contextlib.suppress(Exception):
            last = max(agent.snapshots(last=1), key=lambda s: s.seq)
            res.vms_seen = len(last.vms)
            res.ebpf = {n: f"{h.status.value}{': ' + h.reason if h.reason else ''}"
                        for n, h in last.health.items() if n.startswith(EBPF_PREFIX)}
        res.load_average = os.getloadavg()
    finally:
        agent.stop()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    return res


@contextlib.contextmanager
def lab_session(vms: int):
    """The lab with ``vms`` VMs, under the lab lock (taken in turns with the lab tests), down at the end."""
    lock = open(LOCK, "w")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for the lab lock {LOCK}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["/usr/bin/python3", str(LAB), "down"], capture_output=True, timeout=600)
        p = subprocess.run(["/usr/bin/python3", str(LAB), "up", "--vms", str(vms)], capture_output=True, text=True,
                           timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"lab up failed: {p.stderr[-2000:]}")
        try:
            yield
        finally:
            subprocess.run(["/usr/bin/python3", str(LAB), "down"], capture_output=True, timeout=600)
    finally:
        lock.close()


def render(res: Footprint, baseline: Footprint | None = None, rows: int = 12) -> str:
    st = res.steady()
    s = res.samples
    step = max(1, len(s) // rows)
    pick = s[::step]
    if s and pick[-1] is not s[-1]:
        pick.append(s[-1])
    la = res.load_average
    where = (f"the lab up with {res.vms} VMs" if res.vms else "the lab not brought up by the benchmark") + \
        f" ({res.vms_seen} VMs in the agent's last snapshot)"
    out = [BEGIN, "",
           f"`python -m benchmarks.footprint` (`make footprint`), run {res.date}: `kvmscope run` with its default "
           f"collectors (every eBPF probe attached), {where}, interval {res.interval:g} s, /metrics scraped every "
           f"interval, {res.minutes:g} minutes, agent.history {res.history or 'default (120)'}; load average at the end {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} "
           f"(2 CPUs shared with other work).", ""]
    if res.startup_seconds is not None:
        cpu = res.startup_cpu
        if res.cache_entries and not cpu.get("children"):
            how = "the probes loaded from the eBPF object cache, no compiler started"
        else:
            how = "compiling included" + (f" (the eBPF object cache held {res.cache_entries} entries of other keys)"
                                          if res.cache_entries else ": the eBPF object cache was empty")
        out.append(f"* Start-up to the first full snapshot (every eBPF collector ok, {how}): "
                   f"**{res.startup_seconds:.2f} s** (snapshot {res.first_full_seq}); CPU by then: agent "
                   f"{cpu.get('agent', 0):.2f} s, the compiler children {cpu.get('children', 0):.2f} s.")
    else:
        out.append("* Start-up: no snapshot had every eBPF collector ok: " + json.dumps(res.ebpf))
    if st:
        out.append(f"* Steady RSS (the last third of the run): median **{st['median_mb']:.1f} MB**, min "
                   f"{st['min_mb']:.1f}, max {st['max_mb']:.1f}, last {st['last_mb']:.1f}; high-water mark "
                   f"{st['hwm_mb']:.1f} MB.")
    if baseline is not None and baseline.steady():
        out.append(f"* Same run with the eBPF collectors disabled ({baseline.minutes:g} minutes): median "
                   f"{baseline.steady()['median_mb']:.1f} MB.")
    out.append(f"* LLVM / clang / libbcc mapped in the agent: {', '.join(res.llvm_mapped) or 'none'}.")
    out.append("* eBPF collectors at the end: " + ", ".join(f"{k} {v}" for k, v in sorted(res.ebpf.items())) + ".")
    out += ["", "| t (s) | RSS (MB) | anon | file | shmem | threads |", "|---:|---:|---:|---:|---:|---:|"]
    for x in pick:
        out.append(f"| {x.t:.0f} | {x.rss_kb / 1024:.1f} | {x.anon_kb / 1024:.1f} | {x.file_kb / 1024:.1f} | "
                   f"{x.shmem_kb / 1024:.1f} | {x.threads} |")
    out += ["", "Largest resident mappings at the end:", "", "| mapping | resident (MB) |", "|---|---:|"]
    for name, kb in res.top_mappings:
        out.append(f"| `{name}` | {kb / 1024:.1f} |")
    out += ["", END]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=10.0, help="seconds between RSS samples")
    ap.add_argument("--interval", type=float, default=5.0, help="agent interval (and scrape period)")
    ap.add_argument("--vms", type=int, default=4, help="lab VMs (default 4)")
    ap.add_argument("--no-lab", action="store_true", help="do not bring the lab up")
    ap.add_argument("--baseline-minutes", type=float, default=0.0,
                    help="also run this long with the eBPF collectors disabled (for comparison)")
    ap.add_argument("--history", type=int, help="agent.history (snapshots kept; default the agent's, 120)")
    ap.add_argument("--results", type=Path, help="write the results as JSON here")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/performance.md")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the agent stopped and the lab down on the way out
    from agent.ebpf import probe_classes

    ebpf_sources = [EBPF_PREFIX + n for n in probe_classes()]
    vms = 0 if a.no_lab else a.vms
    with (contextlib.nullcontext() if a.no_lab else lab_session(a.vms)):
        res = measure(a.minutes, a.every, a.interval, vms, history=a.history)
        base = measure(a.baseline_minutes, a.every, a.interval, vms, disable=ebpf_sources) if a.baseline_minutes else None
    section = render(res, base)
    print(section)
    if a.results:
        a.results.write_text(json.dumps({"run": asdict(res), "baseline": asdict(base) if base else None}, indent=1))
    if not a.no_doc:
        write_section(section, BEGIN, END)
    st = res.steady()
    return 0 if res.startup_seconds is not None and not res.llvm_mapped and st and st["median_mb"] <= 64 else 1


if __name__ == "__main__":
    sys.exit(main())
