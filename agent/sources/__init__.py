"""Sources: each reads one thing from the host and returns typed records.

One source per module, registered by name with :func:`register` (the
node_exporter ``collector/*.go`` habit). Each declares whether it is on by
default; ``agent.collectors.enable/disable`` in the configuration changes
that by name. A source never formats output and never knows who consumes it.

A source's ``collect()``:
  * returns its records (any value; usually a dataclass),
  * raises :class:`agent.errors.NoData` with a reason when the host simply
    has no such thing (not a failure),
  * raises anything else on failure; the agent loop records the reason and
    the duration and carries on with the other sources.

A source that validates outside input or bounds a per-object table keeps
``dropped``: a dict of cumulative counts by reason (``invalid_value``: a
value of the wrong type or out of range, left out; ``evicted``: an object
left out because its table was full; ``expired``: an object forgotten after
it was not seen for a while). The loop copies it into the source's health
each cycle; /metrics exports it as ``kvmscope_collector_dropped_samples_total``.
"""

from __future__ import annotations

import importlib
import pkgutil

from agent.config import Config
from agent.errors import ConfigError
from agent.source_api import REGISTRY, Source, SourceContext, SourceInfo, Unchanged, register

__all__ = ["REGISTRY", "Source", "SourceContext", "SourceInfo", "Unchanged", "register", "load_registry", "selected"]


def load_registry() -> dict[str, SourceInfo]:
    """Import every module of this package (each registers its sources).

    Lazy, so `kvmscope --help` stays fast; modules do no I/O at import time.
    """
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return REGISTRY


def selected(config: Config) -> list[SourceInfo]:
    """The sources to run, after the configuration's enable/disable lists."""
    reg = load_registry()
    sel = config.agent.collectors
    for key, names in (("enable", sel.enable), ("disable", sel.disable)):
        for n in names:
            if n not in reg:
                raise ConfigError(
                    f"agent.collectors.{key}: got {n!r}; unknown collector, known: {', '.join(sorted(reg))}"
                )
    out = []
    for info in reg.values():
        on = (info.default_enabled or info.name in sel.enable) and info.name not in sel.disable
        if on:
            out.append(info)
    return out
