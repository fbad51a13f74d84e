"""The agent loop: failure isolation, deadlines, no pile-up of hung sources."""

import threading
import time

from agent.errors import NoData
from agent.loop import Agent
from agent.records.snapshot import Status


class Src:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def collect(self):
        return self.fn()

    def close(self):
        pass


def boom():
    raise RuntimeError("sysfs vanished")


def nodata():
    raise NoData("no iSCSI sessions")


def test_one_failure_does_not_hide_others():
    a = Agent([Src("good", lambda: 42), Src("bad", boom), Src("empty", nodata)], timeout=2)
    snap = a.collect_once()
    assert snap.data == {"good": 42}
    assert snap.health["good"].status is Status.OK
    assert snap.health["bad"].status is Status.FAILED
    assert snap.health["bad"].reason == "RuntimeError: sysfs vanished"
    assert snap.health["empty"].status is Status.NODATA and snap.health["empty"].success
    assert snap.health["empty"].reason == "no iSCSI sessions"
    a.close()


def test_hung_source_times_out_and_is_not_restarted():
    release = threading.Event()
    calls = []

    def hang():
        calls.append(1)
        release.wait(10)
        return "late"

    a = Agent([Src("hung", hang), Src("good", lambda: 1)], timeout=0.3)
    t0 = time.monotonic()
    s1 = a.collect_once()
    assert time.monotonic() - t0 < 2.0
    assert s1.health["hung"].status is Status.FAILED
    assert s1.health["hung"].reason == "timed out after 0.3s"
    assert s1.data == {"good": 1}
    s2 = a.collect_once()
    assert s2.health["hung"].status is Status.FAILED
    assert s2.health["hung"].reason.startswith("still running since")
    assert len(calls) == 1
    release.set()
    time.sleep(0.1)
    s3 = a.collect_once()
    assert len(calls) == 2
    assert s3.health["hung"].status is Status.OK and s3.data["hung"] == "late"
    a.close()


def test_history_ring_is_bounded_and_ordered():
    a = Agent([Src("n", lambda: 1)], history=3)
    for _ in range(5):
        a.collect_once()
    assert [s.seq for s in a.history()] == [3, 4, 5]
    assert a.latest.seq == 5
    a.close()


def test_run_stops_on_event():
    a = Agent([Src("n", lambda: 1)], interval=0.5)
    stop = threading.Event()
    t = threading.Thread(target=a.run, args=(stop,))
    t.start()
    time.sleep(1.2)
    stop.set()
    t.join(2)
    assert not t.is_alive()
    assert 2 <= a.latest.seq <= 4
    a.close()


class Loading(Src):
    """A source that is loading (an eBPF probe compiling) until ``ready`` is set."""

    def __init__(self, name, ready):
        super().__init__(name, lambda: "probe data" if ready.is_set() else nodata())
        self.ready = ready

    @property
    def loading(self):
        return not self.ready.is_set()


def test_a_source_done_loading_is_collected_at_once_not_an_interval_later():
    ready = threading.Event()
    a = Agent([Src("n", lambda: 1), Loading("probe", ready)], interval=30)
    stop = threading.Event()
    t = threading.Thread(target=a.run, args=(stop,))
    t.start()
    try:
        time.sleep(0.5)
        assert a.latest.seq == 1 and "probe" not in a.latest.data
        ready.set()
        deadline = time.monotonic() + 3
        while (a.latest.seq < 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.latest.seq == 2 and a.latest.data["probe"] == "probe data"
        time.sleep(0.5)
        assert a.latest.seq == 2  # then the interval again (realigned), no burst
    finally:
        stop.set()
        t.join(2)
        a.close()
    assert not t.is_alive()


def test_dropped_counters_reach_health_and_metrics_even_when_the_source_hangs():
    """A source's cumulative `dropped` counters are in its health every cycle (also while it hangs),
    and /metrics shows them as kvmscope_collector_dropped_samples_total."""
    from agent.exporters.collector import SnapshotCollector

    release = threading.Event()
    src = Src("qmp", lambda: 1)
    src.dropped = {"invalid_value": 0}

    def bad_then_hang():
        src.dropped["invalid_value"] += 3
        if len(calls) > 0:
            release.wait(10)
        calls.append(1)
        return 1

    calls: list = []
    src.fn = bad_then_hang
    a = Agent([src, Src("plain", lambda: 2)], timeout=0.3)
    snap = a.collect_once()
    assert snap.health["qmp"].dropped == {"invalid_value": 3} and snap.health["plain"].dropped == {}
    assert snap.health["qmp"].as_dict()["dropped"] == {"invalid_value": 3} and "dropped" not in snap.health["plain"].as_dict()
    snap = a.collect_once()  # hangs past the deadline: the counters are still reported
    assert snap.health["qmp"].status is Status.FAILED and snap.health["qmp"].dropped == {"invalid_value": 6}
    text = SnapshotCollector(lambda: snap).exposition().decode()
    assert 'kvmscope_collector_dropped_samples_total{collector="qmp",reason="invalid_value"} 6.0' in text
    assert 'collector="plain",reason' not in text
    release.set()
    a.close()


def test_freeze_gc_freezes_after_each_cycle_and_collects_everything_periodically(monkeypatch):
    """kvmscope run's agent (freeze_gc) leaves what is alive after a cycle out of the cyclic collector's
    scans, and every GC_FULL_EVERY cycles unfreezes and collects everything once (no garbage kept longer)."""
    import gc

    import agent.loop as loop

    calls = []
    monkeypatch.setattr(loop, "GC_FULL_EVERY", 3)
    monkeypatch.setattr(loop.gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(loop.gc, "unfreeze", lambda: calls.append("unfreeze"))
    monkeypatch.setattr(loop.gc, "collect", lambda *a: calls.append("collect") or 0)
    seen_on = []  # the collector's state while the sources run: off during a cycle (only freeze_gc)
    a = Agent([Src("n", lambda: seen_on.append(gc.isenabled()) or 1)], interval=0.05, freeze_gc=True)
    stop = threading.Event()
    t = threading.Thread(target=a.run, args=(stop,))
    t.start()
    deadline = time.monotonic() + 5
    while calls.count("freeze") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(2)
    assert calls[:6] == ["freeze", "freeze", "unfreeze", "collect", "freeze", "freeze"]
    a.close()
    assert calls[-1] == "unfreeze"
    assert seen_on and not any(seen_on)
    plain = Agent([Src("n", lambda: seen_on.append(gc.isenabled()) or 1)])
    assert plain.freeze_gc is False  # only kvmscope run asks for it
    plain.cycle()
    assert seen_on[-1] is True and gc.isenabled()
    plain.close()


def test_trim_heap_after_each_cycle_of_run():
    seqs = []
    a = Agent([Src("n", lambda: 1)], interval=0.05)
    a.trim_heap = lambda: seqs.append(a.latest.seq)  # after the cycle: its snapshot is the latest
    stop = threading.Event()
    t = threading.Thread(target=a.run, args=(stop,))
    t.start()
    deadline = time.monotonic() + 5
    while len(seqs) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    t.join(2)
    a.close()
    assert seqs[:3] == [1, 2, 3]
    assert Agent([Src("n", lambda: 1)]).trim_heap is None  # only kvmscope run sets it


def test_heap_trimmer_gives_freed_heap_pages_back():
    """glibc keeps free pages inside its heap resident; the trimmer (kvmscope run, after each cycle) returns
    them (in a fresh process, bounded like kvmscope run's)."""
    import subprocess
    import sys

    code = """
import ctypes
from agent.cli.run import bound_malloc, heap_trimmer
bound_malloc()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon"))
blocks = [libc.malloc(64 * 1024) for _ in range(800)]  # 50 MB below the mmap threshold: on the heap
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
keep = blocks[-1]  # the top stays in use: glibc cannot give the rest back by shrinking the heap
for b in blocks[:-1]:
    libc.free(b)
before = rss()
heap_trimmer()()
print(before - rss())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) > 30_000  # kB given back


def test_one_early_cycle_when_the_last_loading_source_is_done():
    first, second = threading.Event(), threading.Event()
    a = Agent([Loading("p1", first), Loading("p2", second)], interval=30)
    stop = threading.Event()
    t = threading.Thread(target=a.run, args=(stop,))
    t.start()
    try:
        time.sleep(0.4)
        first.set()
        time.sleep(0.5)
        assert a.latest.seq == 1  # p2 still loading: no cycle yet
        second.set()
        deadline = time.monotonic() + 3
        while a.latest.seq < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.latest.seq == 2 and set(a.latest.data) == {"p1", "p2"}
    finally:
        stop.set()
        t.join(2)
        a.close()


def test_each_source_keeps_its_own_worker_thread_across_cycles_and_a_hung_one_holds_only_its_own():
    """No thread start-up per source per cycle: a source runs in the same worker thread every cycle, each source
    in its own; a hung source's worker is not handed another run, the others go on; close() ends idle workers."""
    release = threading.Event()
    seen: dict[str, set] = {"a": set(), "b": set(), "hung": set()}

    def note(name, value=1):
        seen[name].add(threading.get_ident())
        return value

    def hang():
        note("hung")
        release.wait(10)
        return "late"

    a = Agent([Src("a", lambda: note("a")), Src("b", lambda: note("b")), Src("hung", hang)], timeout=0.3)
    for _ in range(4):
        a.collect_once()
    assert len(seen["a"]) == len(seen["b"]) == len(seen["hung"]) == 1  # three workers, started once
    assert seen["a"] != seen["b"] and threading.get_ident() not in seen["a"] | seen["b"]
    release.set()
    time.sleep(0.1)
    s = a.collect_once()
    assert s.data["hung"] == "late" and len(seen["hung"]) == 1
    workers = [t for t in threading.enumerate() if t.ident in seen["a"] | seen["b"] | seen["hung"]]
    assert len(workers) == 3 and all(t.daemon for t in workers)
    a.close()
    for t in workers:
        t.join(5)
    assert not any(t.is_alive() for t in workers)
