"""`kvmscope run`: the agent in the foreground."""

from __future__ import annotations

import logging
import signal
import threading
import time

import typer
from pydantic import ValidationError

from agent import __version__, sdnotify
from agent.cli import app, examples
from agent.cli.common import check_config, load_config, msg
from agent.config import _check_listen
from agent.errors import ConfigError, KvmscopeError
from agent.engine import build_agent
from agent.loop import Agent
from agent.records.addr import fmt_endpoint
from agent.records.snapshot import Snapshot, Status


def _health_changes(snap: Snapshot, prev: Snapshot | None) -> list[str]:
    """A line for each collector whose status or reason changed since the last cycle."""
    lines = []
    for name in sorted(snap.health):
        h = snap.health[name]
        p = prev.health.get(name) if prev else None
        if p is not None and (p.status, p.reason) == (h.status, h.reason):
            continue
        if h.status is Status.OK:
            if p is not None:
                lines.append(f"collector {name}: ok again")
            continue
        word = "no data" if h.status is Status.NODATA else "FAILED"
        lines.append(f"collector {name}: {word}: {h.reason}")
    return lines


def _health_counts(snap: Snapshot) -> str:
    n = {s: sum(1 for h in snap.health.values() if h.status is s) for s in Status}
    return f"{n[Status.OK]} ok, {n[Status.NODATA]} no data, {n[Status.FAILED]} failed"


def _summary(snap: Snapshot, prev: Snapshot | None) -> str:
    """One console line per cycle: health counts, then what the sources saw."""
    parts = [f"{_health_counts(snap)} in {snap.duration_seconds * 1000:.0f}ms"]
    tcp = snap.host_tcp
    ptcp = prev.host_tcp if prev else None
    if tcp and ptcp:
        dt = max(snap.timestamp - prev.timestamp, 1e-9)
        d = tcp.tcp.get("RetransSegs", 0) - ptcp.tcp.get("RetransSegs", 0)
        out = tcp.tcp.get("OutSegs", 0) - ptcp.tcp.get("OutSegs", 0)
        pct = 100.0 * d / out if out > 0 else 0.0
        parts.append(f"tcp retrans {d / dt:.1f}/s ({pct:.2f}% of sent), estab {tcp.tcp.get('CurrEstab', 0)}")
    vms = snap.vms
    if vms:
        parts.append(f"vms {len(vms)} ({sum(len(v.disks) for v in vms)} disks)")
    sess = snap.iscsi
    if sess:
        bad = sum(1 for s in sess.sessions if s.state != "LOGGED_IN")
        parts.append(f"iscsi sessions {len(sess.sessions)}" + (f" ({bad} not logged in)" if bad else ""))
    conns = snap.storage_tcp
    if conns:
        rt = sum((c.info.total_retrans or 0) for c in conns.connections if c.info)
        parts.append(f"storage conns {len(conns.connections)} (retrans total {rt})")
    return f"cycle {snap.seq}: " + " | ".join(parts)


def shipping_summary(h: dict) -> str:
    """One console line about shipping: what waits, what went, what failed."""
    parts = []
    if "queued" in h:
        parts.append(f"queued {h['queued']}")
    if "shipped" in h:
        parts.append(f"shipped {h['shipped']}, retried {h['retried']}, failed {h['failed']}")
    if "dropped" in h:
        parts.append(f"dropped {h['dropped']}, spool {h['spool_bytes'] / 1024:.0f} KiB, oldest {h['oldest_age']:.0f}s")
    if h.get("file_written") is not None:
        parts.append(f"file {h['file_written']}")
    state = ""
    if "up" in h:
        state = " es up" if h.get("es_up", h["up"]) else f" es DOWN ({h['last_error'] or 'not reached yet'})"
    if h.get("local_ok") is False:
        state += f" LOCAL WRITES FAILING ({h['local_errors']} errors)"
    return "shipping:" + state + " | " + ", ".join(parts)


@app.command(
    epilog=examples(
        "kvmscope run",
        "kvmscope run --listen 127.0.0.1:9900 --interval 2",
        "kvmscope run --once             # one cycle, print it, exit",
        "curl -s 127.0.0.1:9847/metrics | grep kvmscope_collector_success",
    )
)
def run(
    ctx: typer.Context,
    listen: str = typer.Option(None, help="HOST:PORT for /metrics [default: metrics.listen, 127.0.0.1:9847]"),
    interval: float = typer.Option(None, min=0.5, help="seconds between cycles [default: agent.interval, 5]"),
    once: bool = typer.Option(False, "--once", help="collect one cycle, print its summary and exit"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no per-cycle console lines"),
):
    """Run the agent in the foreground: collect every interval and serve /metrics. Stop with Ctrl-C or SIGTERM."""
    cfg, origin = load_config(ctx)
    _apply_options(cfg, listen, interval)
    from agent.exporters.server import check_exposure

    check_exposure(cfg.metrics)  # before anything starts: never serve the host's inventory unprotected
    logging.basicConfig(level=cfg.log.level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not once:
        bound_malloc()  # before any worker thread exists
    agent = build_agent(cfg, owns_state=not once)  # the agent owns the log read positions; --once does not move them
    agent.freeze_gc = True  # the long-lived agent: see agent/loop.py, garbage collection
    if not once:
        agent.trim_heap = heap_trimmer()
    msg(f"kvmscope {__version__}: configuration from {origin}")
    msg(f"collectors: {', '.join(s.name for s in agent.sources) or 'none'}; interval {cfg.agent.interval:g}s")
    if once:
        _run_once(agent)

    shipping = _start_shipping(cfg, agent)
    live = _start_live_diagnosis(cfg, agent, shipping, quiet)
    try:
        server = _start_server(cfg, agent, shipping, live)
    except BaseException:
        if shipping is not None:
            shipping.stop()
        agent.close()
        raise
    stop = _stop_on_signals(lambda: _recheck_config(ctx), cfg.elasticsearch.stop_timeout + STOP_GRACE)
    watchdog = _start_systemd(cfg, agent)
    if not quiet:
        agent.on_snapshot.append(_console_lines(shipping))
    try:
        agent.run(stop)
    finally:
        sdnotify.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.stop()
        if shipping is not None:
            shipping.stop()  # bounded by elasticsearch.stop_timeout; the rest stays in the spool
        if server:
            server.stop()
        agent.close()
    msg("stopped")
    _exit_without_stragglers()


def _apply_options(cfg, listen: str | None, interval: float | None) -> None:
    """Let ``--listen`` and ``--interval`` override the configuration."""
    if listen is not None:
        try:
            _check_listen(listen)
        except ValueError as e:
            raise ConfigError(f"--listen: got {listen!r}; {e}") from None
        cfg.metrics.listen = listen
    if interval is not None:
        # the configuration's own rule: a derived collector_timeout follows the new interval,
        # a configured one must fit in it
        try:
            cfg.agent.interval = interval
        except ValidationError as e:
            problem = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            raise ConfigError(f"--interval: got {interval:g}; {problem}") from None


MALLOC_ARENAS = 2  # glibc: arenas at most (default 8 per CPU)
MALLOC_MMAP_THRESHOLD = 128 * 1024  # glibc: blocks this big or more are mmap()ed and unmapped when freed


def bound_malloc() -> bool:
    """Keep glibc's heap from growing for good in the long-lived agent.

    Each cycle runs every source in a fresh thread, and glibc gives threads
    arenas of their own (up to 8 per CPU); a source's big transient buffers
    (a batch read of a per-CPU map, a rendered exposition, documents) are
    carved from whichever arena its thread got and, once freed, stay resident
    there: glibc raises its mmap threshold after freeing an mmap()ed block, so
    later blocks of that size land in the arenas. Measured on `kvmscope run`
    (docs/performance.md, "Footprint"): RSS grew without bound, to ~230 MB in
    13 minutes. A fixed mmap threshold (which also turns that adjustment off)
    and at most two arenas keep RSS flat. No-op off glibc; True when applied."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, MALLOC_MMAP_THRESHOLD) == 1  # M_MMAP_THRESHOLD
        return libc.mallopt(-8, MALLOC_ARENAS) == 1 and ok  # M_ARENA_MAX
    except (OSError, AttributeError):
        return False


def heap_trimmer():
    """glibc's ``malloc_trim(0)`` as a callable, for after each cycle; None off glibc.

    A cycle's transient buffers, freed, leave whole free pages inside glibc's heaps that glibc keeps
    resident (it returns only the top of a heap on its own); malloc_trim gives them back to the kernel
    (MADV_DONTNEED). Measured on `kvmscope run` (docs/performance.md, "Footprint"): 0.6-1.7 MB back after
    each cycle, 0.1-0.3 ms of CPU per call."""
    import ctypes

    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def _run_once(agent: Agent):
    """``--once``: one cycle, its summary, exit 1 if a collector failed."""
    snap = agent.collect_once()
    for line in _health_changes(snap, None):
        msg(line)
    msg(_summary(snap, None))
    agent.close()
    failed = [h for h in snap.health.values() if h.status is Status.FAILED]
    raise typer.Exit(1 if failed else 0)


def _start_shipping(cfg, agent: Agent):
    """Elasticsearch and/or the file output, fed by every snapshot; None when neither is enabled."""
    if not (cfg.elasticsearch.enabled or cfg.file_output.enabled):
        return None
    from agent.shipping.shipper import Shipping

    shipping = Shipping(cfg, on_notice=lambda t: msg(f"shipping: {t}")).start()
    agent.on_snapshot.insert(0, shipping.consume)  # only appends to the local spool/file
    if cfg.elasticsearch.enabled:
        from agent.config import redact_url

        msg(f"shipping to elasticsearch {', '.join(redact_url(h) for h in cfg.elasticsearch.hosts)} "
            f"(namespace {cfg.elasticsearch.namespace}) via spool {cfg.elasticsearch.spool_dir}")
    if cfg.file_output.enabled:
        msg(f"writing documents to {cfg.file_output.path}")
    return shipping


def _start_live_diagnosis(cfg, agent: Agent, shipping, quiet: bool):
    """The diagnosis rules over the agent's history after every cycle (new findings printed and shipped);
    None when ``diagnose.live`` is off."""
    if not cfg.diagnose.live:
        return None
    from agent.diagnose.live import LiveDiagnosis, ship_dict

    def _new_finding(f, snap):
        if not quiet:
            msg(f"finding: {f.severity.upper()} {f.title}")
        if shipping is not None:
            shipping.submit_finding(ship_dict(f), snap.host, snap.timestamp)

    def _incident(event, inc, snap):
        if not quiet:
            msg(f"incident {event}: {inc['severity'].upper()} {inc['key']}: "
                + (f"{inc['duration_seconds']:.1f} s, " if event == "resolved" else "") + inc["title"])
        if shipping is not None:
            shipping.submit_incident(inc, event)

    live = LiveDiagnosis(agent.history, cfg.diagnose, on_new=_new_finding, on_incident=_incident)
    agent.on_snapshot.append(live.consume)
    return live


def _start_server(cfg, agent: Agent, shipping, live):
    """The HTTP server (/metrics, the API; when ``metrics.enabled``) and the API's unix socket (when
    ``api.socket``), with the shipper's and the live diagnosis' renderers added; None when neither."""
    if not (cfg.metrics.enabled or cfg.api.socket):
        return None
    from agent.exporters.registry import load_renderers
    from agent.exporters.server import MetricsServer

    renderers = load_renderers()
    if live is not None:
        from agent.exporters.render_diagnosis import diagnosis_renderer

        from agent.exporters.render_diagnosis import incidents_renderer

        renderers = renderers.with_snapshot(diagnosis_renderer(lambda: live.current))
        renderers = renderers.with_snapshot(incidents_renderer(live.incidents))
    if shipping is not None:
        from agent.exporters.render_shipping import shipping_renderer

        renderers = renderers.with_snapshot(shipping_renderer(shipping.health))
    server = MetricsServer.from_config(cfg.metrics, lambda: agent.latest, history=agent.history,
                                       renderers=renderers, api=cfg.api,
                                       incidents=live.incidents.incidents if live is not None else None,
                                       findings=live.served if live is not None else None).start()
    agent.on_snapshot.append(server.prerender)  # the scrape after a cycle then costs ~1 ms
    if server.address is not None:
        h, p = server.address[:2]
        msg(f"serving {server.scheme}://{fmt_endpoint(h, p)}/metrics")
    if server.api_socket is not None:
        msg(f"serving the local API on {server.api_socket.path} (root only; what `kvmscope top|diagnose|paths` attach to)")
    elif server.api_socket_error:
        msg(f"warning: {server.api_socket_error}; carrying on without it (CLI commands collect in-process)")
    return server


# seconds the shutdown may take beyond elasticsearch.stop_timeout before the process exits anyway
# (below the unit's TimeoutStopSec=30s, so systemd never has to SIGKILL)
STOP_GRACE = 10.0
# seconds left, once everything is stopped, to threads that are not ours to stop (a QMP query or a bcc
# compile in flight in a library's pool) before the process exits without them
STRAGGLER_GRACE = 2.0


def _stop_on_signals(on_hup, deadline: float) -> threading.Event:
    """An event set by SIGTERM or SIGINT, which also arm a final deadline: ``deadline`` seconds
    later the process exits whatever still runs (exit 1). SIGHUP calls ``on_hup`` (in a thread of
    its own) and does not stop the agent."""
    stop = threading.Event()

    def _stop(signum, _frame):
        msg(f"{signal.Signals(signum).name}: stopping")
        if not stop.is_set():
            threading.Thread(target=_final_deadline, args=(deadline,), name="stop-deadline", daemon=True).start()
        stop.set()

    def _hup(_signum, _frame):
        threading.Thread(target=on_hup, name="sighup", daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _hup)
    return stop


def _final_deadline(seconds: float) -> None:
    time.sleep(seconds)
    msg(f"shutdown did not finish within {seconds:g}s ({_straggler_names() or 'no thread named'}): exiting now")
    _hard_exit(1)


def _straggler_names() -> str:
    return ", ".join(t.name for t in threading.enumerate()
                     if t.is_alive() and not t.daemon and t is not threading.main_thread())


def _exit_without_stragglers() -> None:
    """Everything of ours is stopped; threads of libraries' pools that are still busy (and that the
    interpreter would join at exit, for as long as they take) get STRAGGLER_GRACE seconds."""
    end = time.monotonic() + STRAGGLER_GRACE
    for t in threading.enumerate():
        if t.is_alive() and not t.daemon and t is not threading.main_thread():
            t.join(max(0.0, end - time.monotonic()))
    left = _straggler_names()
    if left:
        msg(f"exiting without waiting for: {left}")
        _hard_exit(0)


def _hard_exit(code: int) -> None:
    import os
    import sys

    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _recheck_config(ctx) -> None:
    """SIGHUP: check the configuration file again and say so. The running agent keeps the configuration
    it started with (a changed one is applied by a restart, after ExecStartPre= checked it)."""
    try:
        _cfg, origin = check_config(ctx)
    except KvmscopeError as e:
        msg(f"SIGHUP: {e}; keeping the running configuration")
        return
    msg(f"SIGHUP: {origin} is valid; kvmscope applies a changed configuration when restarted "
        "(systemctl restart kvmscope); keeping the running configuration until then")


def _start_systemd(cfg, agent: Agent):
    """systemd (Type=notify): ready once the first cycle is done and /metrics is served; the watchdog is
    pinged while cycles keep completing. Returns the running watchdog, or None."""
    last_cycle: list[float | None] = [None]

    def _systemd(snap: Snapshot):
        first = last_cycle[0] is None
        last_cycle[0] = time.monotonic()
        sdnotify.notify(*(["READY=1"] if first else []), f"STATUS=collectors: {_health_counts(snap)}")

    agent.on_snapshot.append(_systemd)
    every = sdnotify.watchdog_interval()
    if not every:
        return None
    alive = sdnotify.loop_alive(lambda: last_cycle[0], cfg.agent.interval, cfg.agent.collector_timeout)
    return sdnotify.Watchdog(alive, every).start()


def _console_lines(shipping):
    """An on_snapshot callback printing each cycle's health changes, summary and shipping line."""
    prev: list[Snapshot | None] = [None]

    def _print(snap: Snapshot):
        for line in _health_changes(snap, prev[0]):
            msg(line)
        msg(_summary(snap, prev[0]))
        if shipping is not None:
            msg(shipping_summary(shipping.health()))
        prev[0] = snap

    return _print
