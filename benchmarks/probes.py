"""Benchmark of the eBPF probes: ns per program run under load, side by side with the empty-program
floor and the same block latency histogram written in bpftrace; agent CPU and RSS.

    python -m benchmarks.probes [--seconds 5] [--no-classic] [--no-write]
    make bench-probes

Callable: :func:`measure` returns the numbers (a dict), :func:`render` the
docs/performance.md section; :func:`main` does both and writes the section.

Phases (``--seconds`` each, see :func:`measure`), the floor attached
throughout (empty programs on block:block_rq_issue, a tracepoint, and on
block_rq_complete, a BTF-typed raw tracepoint: BPF dispatch plus the two
clock reads BPF stats add to every run):
  agent     every kvmscope probe as the agent loads it (block_io in its
            default mode), under fio 4k random read (O_DIRECT, libaio,
            iodepth 32, a loop device over /dev/shm), a retransmit storm
            (8 TCP connections to port 3260 between two network namespaces
            of its own, 10% random drop on arrival) and reconnect churn
            (CHURN_PER_S short connections/s to storage port 3262);
  together  block_io and Debian's bpftrace running the equivalent
            tracepoint-only histogram (BPFTRACE_SCRIPT) at once, fio;
  bpftrace  bpftrace alone, fio;
  classic   block_io in classic mode (the tracepoint program of before)
            alone, fio (unless ``--no-classic``).

ns per run = BPF_ENABLE_STATS run_time_ns / run_cnt over the window (this
process holds the stats switch; bpftrace's programs are read from its
/proc/PID/fdinfo). Maps are read once per second, as the agent's cycle does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

from agent.ebpf import btf, decode, probe_classes
from agent.ebpf.block_io import BlockIoProbe
from agent.ebpf.compiler import Attach, compile_in_child
from agent.ebpf.loader import ATTACHED, LoadOptions
from benchmarks._doc import write_section

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- probes benchmark: begin -->", "<!-- probes benchmark: end -->"
NS_A, NS_B, A, B = "ksprb-bench-a", "ksprb-bench-b", "198.18.94.1", "198.18.94.2"

SERVER = "import socket,threading\nls=socket.socket();ls.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n" \
         "ls.bind(('0.0.0.0',3260));ls.listen(64)\n" \
         "def sink(c):\n  while c.recv(1<<16): pass\n" \
         "while True:\n  c,_=ls.accept();threading.Thread(target=sink,args=(c,),daemon=True).start()\n"
CLIENT = "import socket,sys,time,threading\nend=time.time()+float(sys.argv[2])\n" \
         "def run():\n  s=socket.create_connection((sys.argv[1],3260));b=b'x'*65536\n" \
         "  while time.time()<end: s.send(b)\n  s.close()\n" \
         "ts=[threading.Thread(target=run) for _ in range(8)];[t.start() for t in ts];[t.join() for t in ts]\n"

CHURN_PER_S = 300
# far above the load: every retransmit and connection event goes through the
# ring buffer (the most a probe does per event; the default cap is 1000/s)
STREAM_CAP = 100_000
CHURN_SERVER = "import socket\nls=socket.socket();ls.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n" \
               "ls.bind(('0.0.0.0',3262));ls.listen(256)\n" \
               "while True:\n  c,_=ls.accept();c.close()\n"
# the server closes first: TIME_WAIT stays on its side, the client never runs out of ports
CHURN_CLIENT = "import socket,sys,time\nend=time.time()+float(sys.argv[2]);gap=1.0/float(sys.argv[3]);t=time.time()\n" \
               "while time.time()<end:\n  s=socket.create_connection((sys.argv[1],3262))\n" \
               "  while s.recv(64): pass\n  s.close();t+=gap;d=t-time.time()\n  d>0 and time.sleep(d)\n"

# ns per program run of the previous measurement (2026-11-29, before request mode; docs/probes.md "Cost")
BEFORE_NS = {"tcp_retrans": 579, "block_io": 264, "tcp_lifecycle": 462}

FLOOR_SRC = "TRACEPOINT_PROBE(block, block_rq_issue) { return 0; }\nint ks_btf__floor(u64 *ctx) { return 0; }\n"
# the same latency histogram per device, tracepoints only, the usual bpftrace way
BPFTRACE_SCRIPT = """tracepoint:block:block_rq_issue { @start[args->dev, args->sector] = nsecs; }
tracepoint:block:block_rq_complete /@start[args->dev, args->sector]/ {
  @lat[args->dev] = hist(nsecs - @start[args->dev, args->sector]);
  delete(@start[args->dev, args->sector]);
}
"""


def sh(cmd, check=True):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def setup_net():
    for ns in (NS_A, NS_B):
        sh(f"ip netns del {ns}", check=False)
    sh(f"ip netns add {NS_A} && ip netns add {NS_B}")
    sh(f"ip link add ksprbb0 netns {NS_A} type veth peer name ksprbb1 netns {NS_B}")
    sh(f"ip -n {NS_A} addr add {A}/30 dev ksprbb0 && ip -n {NS_A} link set ksprbb0 up")
    sh(f"ip -n {NS_B} addr add {B}/30 dev ksprbb1 && ip -n {NS_B} link set ksprbb1 up")
    sh(f"ip netns exec {NS_B} iptables -I INPUT -p tcp --dport 3260 -m statistic --mode random --probability 0.1 -j DROP")


def teardown_net():
    for ns in (NS_A, NS_B):
        sh(f"ip netns del {ns}", check=False)


class Floor:
    """Empty programs: what any program costs here, per kind of attachment."""

    def __init__(self):
        self.obj = None
        try:
            ids = btf.load(set(), set(), {"btf_trace_block_rq_complete"}).typedefs
            self.obj, _ = compile_in_child(FLOOR_SRC, [], [Attach("tp_btf", "ks_btf__floor", target="block_rq_complete",
                                                                  btf_id=ids["btf_trace_block_rq_complete"])])
        except Exception as e:  # the floor is context, never a reason to fail
            print(f"floor programs not loaded: {e}", file=sys.stderr)

    def stats(self) -> dict[str, tuple[int, int]]:
        if self.obj is None:
            return {}
        out = {}
        for label, fd in self.obj.program_fds().items():
            info = decode.parse_fdinfo(Path(f"/proc/self/fdinfo/{fd}").read_text())
            out[label] = (info.get("run_cnt", 0), info.get("run_time_ns", 0))
        return out

    def close(self):
        if self.obj is not None:
            self.obj.cleanup()
            self.obj = None


class Bpftrace:
    """Debian's bpftrace running BPFTRACE_SCRIPT; its programs' BPF stats from its /proc/PID/fdinfo."""

    def __init__(self, timeout: float = 60.0):
        self.proc = None
        self.error = ""
        exe = "/usr/bin/bpftrace" if Path("/usr/bin/bpftrace").exists() else None
        if exe is None:
            self.error = "bpftrace not installed (deploy/setup.sh installs it)"
            return
        self.version = sh(f"{exe} --version", check=False).stdout.strip()
        self.proc = subprocess.Popen([exe, "-e", BPFTRACE_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:  # attached once its programs are loaded ("Attaching 2 probes...")
            if self.proc.poll() is not None:
                self.error = f"bpftrace exited: {self.proc.stderr.read().strip()[-300:]}"
                self.proc = None
                return
            if len(self.stats()) >= 2:
                time.sleep(0.5)
                return
            time.sleep(0.2)
        self.error = "bpftrace did not attach in time"

    def stats(self) -> dict[str, tuple[int, int]]:
        if self.proc is None:
            return {}
        out = {}
        base = Path(f"/proc/{self.proc.pid}/fdinfo")
        try:
            entries = list(base.iterdir())
        except OSError:
            return {}
        for p in entries:
            try:
                info = decode.parse_fdinfo(p.read_text())
            except (OSError, ValueError):
                continue
            if "prog_id" in info:
                out[f"prog {info.get('prog_id', p.name)}"] = (info.get("run_cnt", 0), info.get("run_time_ns", 0))
        return out

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # prints its maps and detaches
            try:
                self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        self.proc = None


def _delta(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {k: (a[0] - before.get(k, (0, 0))[0], a[1] - before.get(k, (0, 0))[1]) for k, a in after.items()}


def _row(name: str, progs: dict[str, tuple[int, int]], wall: float, **extra) -> dict:
    runs, ns = sum(r for r, _ in progs.values()), sum(t for _, t in progs.values())
    per_io = max((r for r, _ in progs.values()), default=0)  # every I/O runs the completion program once
    return {"name": name, "runs_per_s": runs / wall, "ns_per_run": ns / runs if runs else None, "runs": runs,
            "ns_per_io": ns / per_io if per_io else None,
            "programs": {k: (t / r if r else None, r / wall) for k, (r, t) in sorted(progs.items())}, **extra}


def _probe_stats(p) -> dict[str, tuple[int, int]]:
    st = p.stats()
    return {tp: (v["run_cnt"], v["run_time_ns"]) for tp, v in st.per_program.items()}


def _fio(loop: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(["fio", "--name=bench", f"--filename={loop}", "--direct=1", "--rw=randread", "--bs=4k",
                             "--ioengine=libaio", "--iodepth=32", "--thread", "--time_based", f"--runtime={seconds:g}",
                             "--output-format=json", "--norandommap"], stdout=subprocess.PIPE, text=True)


class _Phase:
    """One window of load with a set of program sets attached: their BPF stats before and after."""

    def __init__(self, name: str, loop: str, seconds: float, floor: Floor, probes: list, tracer: "Bpftrace | None",
                 tcp: bool):
        self.name, self.loop, self.seconds, self.tcp = name, loop, seconds, tcp
        self.floor, self.probes, self.tracer = floor, probes, tracer
        self.read_s: dict[str, float] = {p.name: 0.0 for p in probes}
        self.cycles = 0

    def run(self, procs: list) -> dict:
        before = {id(p): _probe_stats(p) for p in self.probes}
        f0, b0 = self.floor.stats(), self.tracer.stats() if self.tracer else {}
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        fio = _fio(self.loop, self.seconds)
        load = [fio]
        if self.tcp:
            load.append(subprocess.Popen(["ip", "netns", "exec", NS_A, sys.executable, "-c", CLIENT, B, str(self.seconds)]))
            load.append(subprocess.Popen(["ip", "netns", "exec", NS_A, sys.executable, "-c", CHURN_CLIENT, B,
                                          str(self.seconds), str(CHURN_PER_S)]))
        procs += load
        while any(x.poll() is None for x in load):
            for p in self.probes:
                r0 = time.monotonic()
                p.read()
                self.read_s[p.name] += time.monotonic() - r0
            self.cycles += 1
            time.sleep(1.0)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        rows = [_row(f"floor ({k.split(':')[0]})", {k: v}, wall) for k, v in _delta(self.floor.stats(), f0).items()]
        for p in self.probes:
            name = p.name + (f" ({p.mode} mode)" if isinstance(p, BlockIoProbe) else "")
            rows.append(_row(name, _delta(_probe_stats(p), before[id(p)]), wall, probe=p.name,
                             read_ms=1000 * self.read_s[p.name] / max(self.cycles, 1)))
        if self.tracer is not None and self.tracer.proc is not None:
            rows.append(_row("bpftrace (same histogram)", _delta(self.tracer.stats(), b0), wall, probe="bpftrace"))
        return {"name": self.name, "wall": wall, "tcp": self.tcp, "rows": rows,
                "iops": json.loads(fio.stdout.read())["jobs"][0]["read"]["iops"],
                "cpu_pct": 100 * ((ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)) / wall,
                "read_ms": 1000 * sum(self.read_s.values()) / max(self.cycles, 1)}


def measure(seconds: float = 5.0, classic: bool = True) -> dict:
    """Run the benchmark (root); returns every number render() writes. Phases of ``seconds`` each, the
    floor attached throughout:
      agent    every kvmscope probe as the agent loads it, under fio + the TCP load;
      together block_io and bpftrace's histogram attached at once (the same events), fio;
      bpftrace bpftrace's histogram alone, fio;
      classic  block_io in classic mode (the tracepoint program) alone, fio (unless classic=False)."""
    load_avg = os.getloadavg()[0]  # other work on the machine inflates every number below
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "kernel": os.uname().release,
                 "cpus": os.cpu_count(), "load_avg": load_avg, "seconds": seconds, "phases": []}
    t_load = time.monotonic()
    probes = [cls(LoadOptions(storage_ports=(3260, 3262), events_per_second=STREAM_CAP)) for cls in probe_classes().values()]
    for p in probes:
        rep = p.load()
        if rep.state != ATTACHED:
            print(f"{p.name}: {rep.state}: {rep.reason}", file=sys.stderr)
    res["load_s"] = time.monotonic() - t_load
    live = [p for p in probes if p.report.state == ATTACHED]
    block = next((p for p in live if p.name == "block_io"), None)
    res["block_mode"] = getattr(block, "mode", None)
    res["rss_loaded"] = rss_mb()
    floor = Floor()
    tracer = None
    backing = Path("/dev/shm/ksprb-bench.img")
    sh(f"truncate -s 512M {backing}")
    loop = sh(f"losetup --find --show {backing}").stdout.strip()
    setup_net()
    procs: list[subprocess.Popen] = []
    classic_probe = None
    try:
        procs.append(subprocess.Popen(["ip", "netns", "exec", NS_B, sys.executable, "-c", SERVER]))
        procs.append(subprocess.Popen(["ip", "netns", "exec", NS_B, sys.executable, "-c", CHURN_SERVER]))
        time.sleep(0.3)
        res["phases"].append(_Phase("agent", loop, seconds, floor, live, None, tcp=True).run(procs))
        for p in live:
            if p is not block:
                p.close()
        tracer = Bpftrace()
        res["bpftrace"] = tracer.error or getattr(tracer, "version", "")
        if block is not None and tracer.proc is not None:
            res["phases"].append(_Phase("together", loop, seconds, floor, [block], tracer, tcp=False).run(procs))
        if block is not None:
            block.close()
        if tracer.proc is not None:
            res["phases"].append(_Phase("bpftrace", loop, seconds, floor, [], tracer, tcp=False).run(procs))
        tracer.close()
        if classic:
            classic_probe = BlockIoProbe(LoadOptions(), modes=("classic",))
            if classic_probe.load().state == ATTACHED:
                res["phases"].append(_Phase("classic", loop, seconds, floor, [classic_probe], None, tcp=False).run(procs))
    finally:
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
        teardown_net()
        sh(f"losetup -d {loop}", check=False)
        backing.unlink(missing_ok=True)
        res["rss_end"] = rss_mb()
        if tracer is not None:
            tracer.close()
        floor.close()
        for p in probes + ([classic_probe] if classic_probe else []):
            p.close()
    return res


def _floor_of(rows: list[dict], kind: str) -> float | None:
    for r in rows:
        if r["name"] == f"floor ({kind})":
            return r["ns_per_run"]
    return None


PHASE_TEXT = {
    "agent": "**Phase agent**: every kvmscope probe as the agent loads it, fio at {iops} IOPS plus the TCP load.",
    "together": "**Phase together**: block_io and bpftrace's histogram attached at once (the same requests), fio "
                "alone at {iops} IOPS.",
    "bpftrace": "**Phase bpftrace**: bpftrace's histogram alone, fio alone at {iops} IOPS.",
    "classic": "**Phase classic**: block_io in classic mode (the tracepoint program of before) alone, fio alone at "
               "{iops} IOPS.",
}


def render(res: dict) -> str:
    """The docs/performance.md section for the results of measure()."""
    lines = [
        BEGIN,
        "## eBPF probes (`make bench-probes`, `python -m benchmarks.probes`)",
        "",
        f"Measured {res['date']} on kernel {res['kernel']}, {res['cpus']} CPUs, 1-min load average "
        f"{res['load_avg']:.1f} before the run (a shared machine: other work inflates every number), "
        f"{res['seconds']:g} s per phase. Load: fio 4k randread O_DIRECT iodepth 32 on a loop device over /dev/shm; "
        f"in phase agent also 8 TCP connections to port 3260 across two namespaces with 10% random drop and "
        f"reconnect churn of {CHURN_PER_S} short connections/s to storage port 3262, event stream cap "
        f"{STREAM_CAP:,}/s (every event written to the ring buffer). The empty-program floor is attached in every "
        f"phase. bpftrace: {res.get('bpftrace') or 'not run'}.",
        "",
        "Goals (issue 17): block_io <= 2x the empty-program floor per run and never above bpftrace's tracepoint-only "
        "histogram (`BPFTRACE_SCRIPT`: issue time per (dev, sector) in a hash map, histogram per device at "
        "completion); TCP probes <= 300 ns per run, or their rate makes it irrelevant.",
        "",
        "| phase | programs | runs/s | ns per run | x floor | ns per I/O | before | per program (ns/run) | CPU (share of one core) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for ph in res["phases"]:
        btf_floor = _floor_of(ph["rows"], "tp_btf") or _floor_of(ph["rows"], "block")
        tp_floor = _floor_of(ph["rows"], "block")
        for r in ph["rows"]:
            ns = r["ns_per_run"]
            mode_floor = btf_floor if "btf mode" in r["name"] else tp_floor
            x = f"{ns / mode_floor:.2f}" if ns and mode_floor and not r["name"].startswith("floor") else "-"
            per = ", ".join(f"{k.split(':', 1)[-1]} {v:.0f}" for k, (v, _rate) in r["programs"].items() if v)
            cpu = r["runs_per_s"] * (ns or 0) / 1e9 * 100
            before = BEFORE_NS.get(r.get("probe", ""), "-") if ph["name"] == "agent" else "-"
            per_io = r["ns_per_io"] if r.get("probe") in ("block_io", "bpftrace") else None
            lines.append(f"| {ph['name']} | {r['name']} | {r['runs_per_s']:,.0f} | {'-' if ns is None else f'{ns:.0f}'} "
                         f"| {x} | {'-' if per_io is None else f'{per_io:.0f}'} | {before} | {per} | {cpu:.3f}% |")
    lines += [""]
    for ph in res["phases"]:
        lines.append(PHASE_TEXT.get(ph["name"], ph["name"]).format(iops=f"{ph['iops']:,.0f}"))
    agent = next((ph for ph in res["phases"] if ph["name"] == "agent"), None)
    lines += [
        "",
        "ns per run: BPF_ENABLE_STATS run_time_ns / run_cnt over the window, summed over a set's programs (block_io "
        "request mode: block_io_start + block_rq_complete, one run each per request; classic: insert (only when the "
        "request goes through an I/O scheduler; a loop device has none) + issue + complete; bpftrace: issue + "
        "complete). ns per I/O: all of a set's run time over the runs of its completion program. x floor: against "
        "the empty program of the same kind (tp_btf for btf mode, a tracepoint otherwise; the floor is dispatch plus "
        "the two clock reads BPF stats add to every run). Not in run_time_ns: a classic tracepoint also fills its "
        "trace record (rwbs, comm, ...) before its programs run, which raw and tp_btf programs never need. CPU = "
        "runs/s x ns per run. 'before': the previous measurement (2026-11-29, block_io's tracepoint program).",
    ]
    if agent is not None:
        reads = ", ".join(f"{r['probe']} {r['read_ms']:.1f}" for r in agent["rows"] if "read_ms" in r)
        lines += [
            "",
            f"Agent process (probes loaded, maps read every second, phase agent): CPU {agent['cpu_pct']:.1f}% of one "
            f"core; map reads per cycle {agent['read_ms']:.1f} ms ({reads} ms); RSS {res['rss_loaded']:.0f} MB after "
            f"loading, {res['rss_end']:.0f} MB at the end; compiling and attaching the probes (in child processes) "
            f"took {res['load_s']:.2f} s once at start. block_io ran in {res['block_mode']} mode.",
        ]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--no-classic", action="store_true", help="skip phase 2 (block_io in classic mode)")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmark needs root", file=sys.stderr)
        return 1
    text = render(measure(args.seconds, classic=not args.no_classic))
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
