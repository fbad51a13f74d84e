"""The glue between a probe and the agent loop.

A probe source compiles its probe once, in a compiler child process
waited for on a background thread, started by the first ``collect()`` (so
``__init__`` does no I/O). That first ``collect()`` waits for the load for
at most ``first_wait`` seconds (well inside the collector deadline), so the
agent's first snapshot already has the probe's data (all probes compile in
parallel, ~1-2 s); if it is not done by then, ``collect()`` raises
NoData("loading ...") until it is, and no later cycle ever waits. A probe the
host cannot run raises NoData with the reason and the fix; a probe that
failed to compile raises with the compiler's message (a failure of this
source only). Once attached, ``collect()`` only reads maps.
"""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from agent.ebpf.loader import ATTACHED, UNAVAILABLE, LoadOptions, Probe
from agent.errors import NoData
from agent.source_api import SourceContext


def load_options(ctx: SourceContext) -> LoadOptions:
    cfg = ctx.config
    opts = LoadOptions(
        paths=ctx.paths,
        storage_ports=tuple(cfg.storage.ports),
        events_per_second=cfg.ebpf.events_per_second,
        kernel_build=Path(cfg.ebpf.kernel_build) if cfg.ebpf.kernel_build else None,
        library_dirs=tuple(Path(d) for d in cfg.ebpf.library_dirs),
        uprobe_budget=cfg.ebpf.uprobe_budget,
        cache_dir=Path(cfg.ebpf.cache_dir) if cfg.ebpf.cache_dir else None,
        compile_timeout=cfg.ebpf.compile_timeout,
    )
    if cfg.ebpf.probes_dir:
        opts.probes_dir = Path(cfg.ebpf.probes_dir)
    return opts


class ProbeSource:
    probe_class: type[Probe]

    def __init__(self, ctx: SourceContext):
        self.ctx = ctx
        self.probe: Probe | None = None
        self._future: Future | None = None

    @property
    def loading(self) -> bool:
        """True while the probe is being compiled (the loop collects again as soon as it is done)."""
        return self._future is not None and not self._future.done()

    @property
    def first_wait(self) -> float:
        """How long the first cycle waits for the compiler: 3 s, leaving a second of the collector deadline."""
        return max(0.0, min(3.0, float(self.ctx.config.agent.collector_timeout) - 1.0))

    def collect(self):
        if self._future is None:
            self.probe = self.probe_class(load_options(self.ctx))
            self._future = self.probe.load_async()
            try:
                self._future.result(timeout=self.first_wait)
            except FutureTimeout:
                pass
        if not self._future.done():
            raise NoData(f"probe {self.probe_class.name} loading (compiling with bcc); data from the next cycle")
        rep = self._future.result()
        if rep.state == UNAVAILABLE:
            raise NoData(f"probe {rep.name} unavailable: {rep.reason}" + (f" (fix: {rep.fix})" if rep.fix else ""))
        if rep.state != ATTACHED:
            raise RuntimeError(f"probe {rep.name} {rep.state}: {rep.reason}")
        return self.probe.read()

    @property
    def dropped(self) -> dict[str, int]:
        """The probe's own cumulative ``dropped`` counters (tracked objects evicted or expired), if any."""
        return dict(getattr(self.probe, "dropped", None) or {})

    def close(self) -> None:
        fut, probe = self._future, self.probe
        if fut is not None and probe is not None:
            if fut.done():
                probe.close()
            else:
                fut.add_done_callback(lambda _f: probe.close())
