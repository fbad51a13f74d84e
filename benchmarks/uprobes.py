"""What the libiscsi uprobes cost an iSCSI initiator in QEMU: the same I/O with the probe off and on,
side by side in one run.

    python -m benchmarks.uprobes [--rounds 5] [--count 20000] [--no-write]      (make bench-uprobes)

A tgtd of its own on loopback (127.0.0.1:TGT_PORT, control socket TGT_CONTROL; the lab's tgtd is
untouched), one LUN over a file in /dev/shm, and QEMU's own block layer + libiscsi driving it:

  * high IOPS: ``qemu-img bench -d 32`` (4 KiB reads, queue depth 32; QEMU's block layer and its
    libiscsi driver in one process, CPU-bound on this machine) and ``-d 1`` (one command at a time);
  * the lab's rate: ``qemu-io`` issuing one 4 KiB read every 5 ms (~200/s, what one lab VM's vda
    does under its guest's dd loop).

Each round runs every workload with the probe off, then loaded and always attached
(``--uprobe-budget 1``), then as the agent runs it by default ("sampled": ``ebpf.uprobe_budget``
0.02, the probe read every CYCLE seconds as the agent's cycle reads it, so the duty cycle of
agent/ebpf/libiscsi.py detaches the command uprobes of a busy initiator; that run lasts
SAMPLED_SECONDS so it spans whole duty periods), rounds interleaved so the machine's drift hits
all alike. Per run: I/O per second, the initiator process's CPU per I/O (user + system from
rusage: a uprobe's trap and its BPF program are charged to the process that hits it), the host's
busy CPU per I/O (/proc/stat, everything else on the machine included), and with the probe on its
BPF run time per program run (BPF stats). Medians over the rounds are written to
docs/performance.md between the "uprobes benchmark" markers.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks._doc import write_section
from agent.ebpf.libiscsi import LibiscsiProbe
from agent.ebpf.loader import ATTACHED, LoadOptions, find_library

BEGIN, END = "<!-- uprobes benchmark: begin -->", "<!-- uprobes benchmark: end -->"
TGT_PORT, TGT_CONTROL = 3270, 73
IQN = "iqn.2026-11.io.kvmscope.bench:uprobes"
LUN_FILE = Path("/dev/shm/kvmscope-bench-uprobes.img")
URL = f"iscsi://127.0.0.1:{TGT_PORT}/{IQN}/1"
LAB_RATE_GAP_MS = 5  # one read every 5 ms: ~200/s, one lab VM's vda
CYCLE = 1.0  # seconds between the probe's reads in the sampled runs (the agent's default is 5: same duty)
SAMPLED_SECONDS = 60.0
# The initiators load a private copy of libiscsi.so.7 (LD_LIBRARY_PATH): uprobes live on a file's
# inode, so another kvmscope agent on this machine (its libiscsi probe on the system's library)
# never turns "off" into "on" here, and the probe under test is attached to this copy only.
LIB_DIR = Path("/dev/shm/kvmscope-bench-uprobes-lib")


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check, timeout=60)


class Target:
    """tgtd on loopback with one RAM-backed LUN."""

    def __enter__(self):
        with open(LUN_FILE, "wb") as f:
            f.truncate(256 << 20)
        self.proc = subprocess.Popen(["tgtd", "-f", "-C", str(TGT_CONTROL), "--iscsi", f"portal=127.0.0.1:{TGT_PORT}"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        adm = ["tgtadm", "-C", str(TGT_CONTROL), "--lld", "iscsi"]
        for _ in range(50):
            if sh(*adm, "--op", "show", "--mode", "sys", check=False).returncode == 0:
                break
            time.sleep(0.1)
        sh(*adm, "--op", "new", "--mode", "target", "--tid", 1, "-T", IQN)
        sh(*adm, "--op", "new", "--mode", "logicalunit", "--tid", 1, "--lun", 1, "-b", LUN_FILE)
        sh(*adm, "--op", "bind", "--mode", "target", "--tid", 1, "--initiator-address", "127.0.0.1")
        return self

    def __exit__(self, *exc):
        adm = ["tgtadm", "-C", str(TGT_CONTROL), "--lld", "iscsi"]
        sh(*adm, "--op", "delete", "--mode", "target", "--tid", 1, "--force", check=False)
        sh(*adm, "--op", "delete", "--mode", "system", check=False)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for p in (LUN_FILE, Path(f"/var/run/tgtd/socket.{TGT_CONTROL}"), Path(f"/var/run/tgtd/socket.{TGT_CONTROL}.lock"),
                  LIB_DIR / LibiscsiProbe.library):
            p.unlink(missing_ok=True)


def host_busy() -> float:
    """Busy CPU seconds of the whole host so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def private_library() -> Path:
    LIB_DIR.mkdir(exist_ok=True)
    src = find_library(LibiscsiProbe.library, LoadOptions().library_dirs)
    if src is None:
        raise SystemExit(f"{LibiscsiProbe.library} not found (Debian: libiscsi7)")
    shutil.copyfile(src, LIB_DIR / LibiscsiProbe.library)
    return LIB_DIR


def timed(argv, n) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH=str(LIB_DIR))
    r0, h0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), host_busy(), time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    dt, h1, r1 = time.monotonic() - t0, host_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"iops": n / dt, "cpu_us": cpu / n * 1e6, "host_us": (h1 - h0) / n * 1e6}


def workloads(count: int, seconds: float | None = None, iops: float = 15000) -> dict:
    if seconds:
        count = int(seconds * iops)
    rate_n = max(200, count // 20) if not seconds else int(seconds * 1000 / (LAB_RATE_GAP_MS + 1))
    reads = []
    for i in range(rate_n):
        reads += ["-c", f"read {(i * 4096) % (200 << 20)} 4k", "-c", f"sleep {LAB_RATE_GAP_MS}"]
    bench = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-s", "4096", "-c", str(count)]
    return {
        "qemu-img bench, depth 32": (bench + ["-d", "32", URL], count),
        "qemu-img bench, depth 1": (bench + ["-d", "1", URL], count),
        "qemu-io, ~200 reads/s (lab rate)": (["qemu-io", "-f", "raw", "-t", "none", *reads, URL], rate_n),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=20000, help="I/Os per qemu-img bench run")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/performance.md")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (eBPF, tgtd)", file=sys.stderr)
        return 2
    runs: dict[tuple[str, str], list[dict]] = {}
    bpf_ns: list[float] = []
    hits: list[float] = []
    lib_dir = private_library()
    with Target():
        wl = workloads(a.count)
        off_iops = {}
        for rnd in range(a.rounds):
            for state in ("off", "on", "sampled"):
                probe = reader = None
                if state != "off":
                    probe = LibiscsiProbe(LoadOptions(library_dirs=(lib_dir,),
                                                      uprobe_budget=1.0 if state == "on" else 0.02))
                    rep = probe.load()
                    if rep.state != ATTACHED:
                        print(f"libiscsi probe {rep.state}: {rep.reason}", file=sys.stderr)
                        return 1
                    s0 = probe.stats()
                    hits.append(probe.hit_ns)
                if state == "sampled":
                    stop = threading.Event()
                    duty: list[dict] = []

                    def cycles(probe=probe, stop=stop, duty=duty):
                        while not stop.wait(CYCLE):
                            duty.append(probe.read().sampling)
                    reader = threading.Thread(target=cycles, daemon=True)
                    reader.start()
                items = workloads(a.count, SAMPLED_SECONDS, off_iops.get("qemu-img bench, depth 32", 15000)).items() \
                    if state == "sampled" \
                    else wl.items()
                try:
                    for name, (cmd, n) in items:
                        if state == "sampled" and "depth 1" in name:
                            continue  # same duty as depth 32; time goes to the two that matter
                        at0 = len(duty) if reader else 0
                        r = timed(cmd, n)
                        if reader:
                            seen = duty[at0:]
                            r["attached"] = sum(1 for d in seen if d.get("attached")) / max(1, len(seen))
                        if state == "off":
                            off_iops[name] = r["iops"]
                        runs.setdefault((name, state), []).append(r)
                        print(f"round {rnd} {state:>3} {name}: {r['iops']:.0f} IO/s, {r['cpu_us']:.2f} us CPU/IO "
                              f"in the initiator, {r['host_us']:.2f} us host", file=sys.stderr)
                    if probe is not None:
                        s1 = probe.stats()
                        runs_n = s1.run_cnt - s0.run_cnt
                        if runs_n:
                            bpf_ns.append((s1.run_time_ns - s0.run_time_ns) / runs_n)
                finally:
                    if reader is not None:
                        stop.set()
                        reader.join()
                    if probe is not None:
                        probe.close()
    text = report(runs, bpf_ns, hits, a)
    print(text)
    if not a.no_write:
        write_section(text, BEGIN, END)
    return 0


def report(runs, bpf_ns, hits, a) -> str:
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("iops", "cpu_us", "host_us")} for k, v in runs.items()}
    att = {k: statistics.median(r["attached"] for r in v) for k, v in runs.items() if "attached" in v[0]}
    names = list(dict.fromkeys(k[0] for k in runs))
    lines = [BEGIN, "## libiscsi uprobes: cost per I/O, off, always on, sampled (`make bench-uprobes`)", "",
             f"`python -m benchmarks.uprobes --rounds {a.rounds} --count {a.count}`, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} CPUs shared with other work (medians of "
             "interleaved rounds). tgtd on loopback, one LUN in /dev/shm; the initiator is QEMU's own block layer + "
             "libiscsi (qemu-img / qemu-io) on a private copy of libiscsi.so.7. CPU/IO = the initiator's user + "
             "system CPU per I/O; host = the whole machine's busy CPU per I/O (other work included: noisy). "
             f"\"sampled\" = the default (`ebpf.uprobe_budget` 0.02), the probe read every {CYCLE:.0f} s for "
             f"{SAMPLED_SECONDS:.0f} s; \"attached\" = share of those cycles with the command uprobes on.",
             "", "| workload | probe | IO/s | vs off | CPU/IO (us) | added (us) | host/IO (us) | attached |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for n in names:
        off = med[(n, "off")]
        for state in ("off", "on", "sampled"):
            m = med.get((n, state))
            if m is None:
                continue
            share = att.get((n, state))
            lines.append(f"| {n} | {state} | {m['iops']:.0f} | {100 * (m['iops'] / off['iops'] - 1):+.1f} % | "
                         f"{m['cpu_us']:.2f} | {m['cpu_us'] - off['cpu_us']:+.2f} | {m['host_us']:.1f} | "
                         f"{'-' if share is None else f'{100 * share:.0f} %'} |")
    lines.append("")
    if bpf_ns:
        lines.append(f"BPF run time per program run (BPF stats, two runs per command): median "
                     f"{statistics.median(bpf_ns):.0f} ns.")
    hs = [h for h in hits if h]
    if hs:
        lines.append(f"One uprobe hit, as the probe calibrates it at load (wall time of scsi_free_scsi_task(NULL) "
                     f"attached minus detached): median {statistics.median(hs) / 1000:.1f} us.")
    lines.append(END)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
