"""The agent loop: run every source on an interval, each with a deadline.

Each cycle starts every enabled source in its own worker thread and waits
for all of them until ``agent.collector_timeout``. A source that raises is
recorded as failed with its reason; one that overruns is recorded as failed
("timed out") and the cycle completes on time anyway. Python cannot kill a
thread, so a hung source keeps its worker: the next cycle does not start it
again until it returns (reported as "still running since ..."), which keeps
a hung QMP socket or libvirt call from piling up threads. Each source has a
daemon worker thread of its own, started at its first run and kept across
cycles (no thread start-up per source per cycle); a hung source holds only
its own worker. Not ``concurrent.futures``: it joins its workers at
interpreter exit, so one source stuck for good in a read of a FIFO or a hung
NFS file would hold the stopping agent until systemd's SIGKILL.

The loop keeps the latest snapshot and a bounded ring of recent ones
(``agent.history``) for diagnosis and the local API.

Garbage collection (``freeze_gc``, set by ``kvmscope run``): the history is
plain data, freed by reference counting when it leaves the ring, but
Python's cyclic collector re-scans all of it whenever the objects that
survived its young generations reach a quarter of the old ones, which each
cycle's short-lived documents and metric families do every few cycles: at
200 VMs a 450 ms pause every ~6 cycles (docs/performance.md). So after each
cycle what is alive is frozen (``gc.freeze``: out of the collector's sight,
still freed by reference counting), and every ``GC_FULL_EVERY`` cycles all
of it is unfrozen and collected once, so cyclic garbage never lingers longer
than that. The collector is also off while a cycle runs (:meth:`Agent.cycle`):
its young-generation collections there only scanned, about twice each, the
objects the cycle keeps (the snapshot, the windows, the rendered text), all
frozen at its end anyway; a cycle leaves next to no cyclic garbage (none in
the cycle benchmark at 200 VMs, tens of objects a minute over a run), which
the periodic full collection takes.
"""

from __future__ import annotations

import gc
import logging
import queue
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, wait
from typing import Callable, Iterable

from agent.errors import NoData
from agent.records.snapshot import Snapshot, SourceHealth, Status
from agent.sources import Source

log = logging.getLogger(__name__)

GC_FULL_EVERY = 120  # cycles between full collections when freeze_gc is on (10 minutes at the default 5 s)


def _dropped(src: Source) -> dict[str, int]:
    """A copy of the source's cumulative ``dropped`` counters ({reason: n}), if it keeps any.

    The source's own thread may be adding to them (a timed-out source still runs): a copy that
    races with a new key is retried, and given up (empty) rather than failing the cycle."""
    d = getattr(src, "dropped", None)
    if not d:
        return {}
    for _ in range(3):
        try:
            return dict(d)
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return {}


class _Worker:
    """A source's own daemon thread: runs one job at a time, as the loop hands them over, until closed."""

    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=f"source-{name}", daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        self._jobs.put((fn, fut))
        return fut

    def close(self) -> None:
        self._jobs.put(None)

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            try:
                fut.set_result(fn())
            except BaseException as e:  # _run_source catches Exception; this is SystemExit & co.
                fut.set_exception(e)
            del job, fn, fut  # nothing of a finished run stays referenced while the worker waits


class Agent:
    def __init__(
        self,
        sources: Iterable[Source],
        *,
        interval: float = 5.0,
        timeout: float = 4.0,
        history: int = 120,
        hostname: str | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        freeze_gc: bool = False,
    ):
        self.sources = list(sources)
        self.interval = interval
        self.timeout = timeout
        self.hostname = hostname or socket.gethostname()
        self._clock = clock
        self._mono = monotonic
        self._inflight: dict[str, tuple[Future, float]] = {}
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.Lock()
        self._history: deque[Snapshot] = deque(maxlen=history)
        self._seq = 0
        self.on_snapshot: list[Callable[[Snapshot], None]] = []
        self.freeze_gc = freeze_gc
        self._since_full_gc = 0
        # called after each cycle of run() (kvmscope run: glibc's malloc_trim, see agent.cli.run.heap_trimmer)
        self.trim_heap: Callable[[], object] | None = None

    # -- results ---------------------------------------------------------
    @property
    def latest(self) -> Snapshot | None:
        with self._lock:
            return self._history[-1] if self._history else None

    def history(self) -> list[Snapshot]:
        with self._lock:
            return list(self._history)

    # -- one cycle -------------------------------------------------------
    def _run_source(self, src: Source):
        start = self._mono()
        try:
            data = src.collect()
            return Status.OK, data, "", self._mono() - start
        except NoData as e:
            return Status.NODATA, None, e.reason, self._mono() - start
        except Exception as e:  # one broken source never takes down the others
            log.debug("source %s failed", src.name, exc_info=True)
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return Status.FAILED, None, reason, self._mono() - start

    def _start(self, src: Source) -> Future:
        """Run the source in its worker thread (idle: the loop starts a source only when its last run is done);
        its result arrives in the returned future."""
        w = self._workers.get(src.name)
        if w is None or not w.thread.is_alive():
            w = self._workers[src.name] = _Worker(src.name)
        return w.submit(lambda: self._run_source(src))

    def collect_once(self) -> Snapshot:
        t0_wall, t0 = self._clock(), self._mono()
        started: dict[str, Future] = {}
        health: dict[str, SourceHealth] = {}
        data: dict[str, object] = {}
        for src in self.sources:
            prev = self._inflight.get(src.name)
            if prev and not prev[0].done():
                health[src.name] = SourceHealth(
                    src.name,
                    Status.FAILED,
                    0.0,
                    f"still running since {t0 - prev[1]:.1f}s ago (hung?); not restarted",
                    _dropped(src),
                )
                continue
            fut = self._start(src)
            self._inflight[src.name] = (fut, t0)
            started[src.name] = fut
        wait(started.values(), timeout=self.timeout)
        by_name = {src.name: src for src in self.sources}
        for name, fut in started.items():
            if not fut.done():
                health[name] = SourceHealth(name, Status.FAILED, self._mono() - t0, f"timed out after {self.timeout:g}s",
                                            _dropped(by_name[name]))
                continue
            status, value, reason, dur = fut.result()
            health[name] = SourceHealth(name, status, dur, reason, _dropped(by_name[name]))
            if status is Status.OK:
                data[name] = value
        with self._lock:
            self._seq += 1
            snap = Snapshot(
                seq=self._seq,
                timestamp=t0_wall,
                host=self.hostname,
                duration_seconds=self._mono() - t0,
                data=data,
                health=health,
            )
            self._history.append(snap)
        try:
            snap.paths  # the storage-path join, once per cycle, before any consumer reads it
        except Exception:
            log.exception("storage path join failed")
        for cb in self.on_snapshot:
            try:
                cb(snap)
            except Exception:
                log.exception("snapshot consumer failed")
        return snap

    # -- forever ---------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Collect every ``interval`` seconds (aligned to the start of the
        first cycle, no drift) until ``stop`` is set.

        Sources still loading (their ``loading`` attribute true: eBPF probes
        being compiled at start) make the loop collect again as soon as the
        last of them is done, instead of a whole interval later, and realign
        on that cycle (one early cycle, not one per probe: cycles in between
        would only compete with the compilers for the CPU)."""
        next_at = self._mono()
        while not stop.is_set():
            self.cycle()
            if self.trim_heap is not None:
                self.trim_heap()
            next_at += self.interval
            delay = next_at - self._mono()
            if delay < 0:  # a slow cycle: skip the missed slots, do not burst
                next_at = self._mono()
                delay = 0
            if self._wait(stop, delay):
                next_at = self._mono()

    def _loading(self) -> int:
        return sum(1 for src in self.sources if getattr(src, "loading", False) is True)

    def _wait(self, stop: threading.Event, delay: float) -> bool:
        """Wait ``delay`` seconds or until ``stop``; True when cut short because the sources that were loading
        are all ready (polled every 0.1 s, only while some source is loading)."""
        if not self._loading():
            stop.wait(delay)
            return False
        end = self._mono() + delay
        while not stop.is_set():
            left = end - self._mono()
            if left <= 0:
                return False
            stop.wait(min(left, 0.1))
            if not self._loading():
                return True
        return False

    def cycle(self) -> Snapshot:
        """One cycle of :meth:`run`: :meth:`collect_once`; with ``freeze_gc`` the cyclic collector off while it
        runs (see the module's docstring) and :meth:`gc_step` after it."""
        if not self.freeze_gc:
            return self.collect_once()
        was_on = gc.isenabled()
        gc.disable()
        try:
            return self.collect_once()
        finally:
            if was_on:
                gc.enable()
            self.gc_step()

    def gc_step(self) -> None:
        """After a cycle (``freeze_gc``): freeze what is alive; every GC_FULL_EVERY cycles first unfreeze
        everything and collect it once (see the module's docstring)."""
        self._since_full_gc += 1
        if self._since_full_gc >= GC_FULL_EVERY:
            self._since_full_gc = 0
            gc.unfreeze()
            gc.collect()
        gc.freeze()

    def close(self, grace: float = 1.0) -> None:
        """Close every source. One still running (hung) is closed from a daemon thread given
        ``grace`` seconds: its close() may unblock it, or hang as well; either way the process can exit.
        With ``freeze_gc``, frozen objects go back to the garbage collector."""
        if self.freeze_gc:
            gc.unfreeze()
        for w in self._workers.values():
            w.close()  # an idle worker ends; a hung one ends when (if) its source returns
        for src in self.sources:
            prev = self._inflight.get(src.name)
            if prev and not prev[0].done():
                log.warning("source %s still running at exit (since %.1fs)", src.name, self._mono() - prev[1])
                t = threading.Thread(target=self._close_one, args=(src,), name=f"close-{src.name}", daemon=True)
                t.start()
                t.join(grace)
                continue
            self._close_one(src)

    @staticmethod
    def _close_one(src: Source) -> None:
        try:
            src.close()
        except Exception:
            log.debug("closing %s failed", src.name, exc_info=True)
