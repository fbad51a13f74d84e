"""Build the agent from a configuration; collect once in-process for the CLI."""

from __future__ import annotations

from agent.config import Config
from agent.hostpaths import HostPaths
from agent.loop import Agent
from agent.records.snapshot import Snapshot
from agent.sources import SourceContext, load_registry, selected


def build_agent(cfg: Config, only: list[str] | None = None, owns_state: bool = False) -> Agent:
    """The agent with the configured sources (or just ``only``, enabled or not).

    ``owns_state``: the sources may move their durable state (``kvmscope run`` only, see SourceContext).
    """
    ctx = SourceContext(cfg, HostPaths.from_config(cfg.paths), owns_state=owns_state)
    if only is None:
        infos = selected(cfg)
    else:
        reg = load_registry()
        infos = [reg[n] for n in only if n in reg]
    return Agent(
        [i.factory(ctx) for i in infos],
        interval=cfg.agent.interval,
        timeout=cfg.agent.collector_timeout,
        history=cfg.agent.history,
        hostname=cfg.agent.hostname,
    )


def collect_now(cfg: Config, only: list[str] | None = None, samples: int = 1, gap: float = 0.0) -> list[Snapshot]:
    """Run the sources in-process ``samples`` times, ``gap`` seconds apart."""
    import time

    agent = build_agent(cfg, only)
    try:
        out = []
        for i in range(samples):
            if i:
                time.sleep(gap)
            out.append(agent.collect_once())
        return out
    finally:
        agent.close()
