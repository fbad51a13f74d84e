"""The live diagnosis alone, replayed over a recording: CPU per cycle as the agent runs it.

    python -m benchmarks.diagnosis RECORDING [--recent 0,2] [--ring 120] [--profile]

RECORDING: snapshots oldest first, for example the history of 200 VMs x 4 disks and 400 connections that
``python -m benchmarks.cycle --dump FILE`` writes (no lab, no root needed here). Each snapshot is put
into a ring of ``--ring`` snapshots (the agent's history) and :class:`agent.diagnose.live.LiveDiagnosis`
consumes it, as ``kvmscope run`` does after each cycle (the storage-path join is made before, in the
cycle, as the agent does); the CPU of each consume (thread time) is measured once the ring is full, for
each ``diagnose.recent_intervals`` of ``--recent``. Prints the numbers; writes nothing. An older
checkout's ``agent`` is measured from its directory: ``cd OLD && PYTHONPATH=THIS python -m
benchmarks.diagnosis ...``.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import pstats
import statistics
import sys
import time


def run(snaps, ring_size: int, recent: int, profile: bool = False) -> list[float]:
    from agent.config import DiagnoseConfig
    from agent.diagnose.live import LiveDiagnosis

    ring: collections.deque = collections.deque(maxlen=ring_size)
    cfg = DiagnoseConfig()
    if hasattr(cfg, "recent_intervals"):  # an older checkout (no recent intervals) can be measured as well
        cfg = DiagnoseConfig(recent_intervals=recent)
    live = LiveDiagnosis(lambda: list(ring), cfg)
    prof = cProfile.Profile(time.thread_time) if profile else None
    cpu = []
    for s in snaps:
        ring.append(s)
        s.paths  # noqa: B018 (joined in the cycle, before the consumers)
        gc.disable()  # as kvmscope run's cycle (agent.loop.Agent.cycle): the collector off while it runs ...
        c0 = time.thread_time()
        if prof is not None and len(ring) == ring_size:
            prof.enable()
        live.consume(s)
        if prof is not None:
            prof.disable()
        if len(ring) == ring_size:
            cpu.append(time.thread_time() - c0)
        gc.enable()
        gc.freeze()  # ... and what is alive frozen after it (the history is not re-scanned by the collector)
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recording")
    ap.add_argument("--recent", default="0,2", help="diagnose.recent_intervals to measure, comma-separated")
    ap.add_argument("--ring", type=int, default=120, help="snapshots of history (agent.history, default 120)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the measured cycles")
    args = ap.parse_args(argv)
    from agent.codec import read_recording

    snaps = read_recording(args.recording)
    if len(snaps) <= args.ring:
        print(f"{args.recording}: {len(snaps)} snapshots, more than --ring {args.ring} needed", file=sys.stderr)
        return 2
    gc.freeze()  # the recording, read above
    for recent in (int(x) for x in args.recent.split(",")):
        cpu = [c * 1000 for c in run(snaps, args.ring, recent, args.profile)]
        print(f"recent_intervals {recent}: {len(cpu)} cycles, CPU per cycle median {statistics.median(cpu):.1f} ms, "
              f"min {min(cpu):.1f}, max {max(cpu):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
