"""Which renderers turn a snapshot into Prometheus families.

A renderer is a plain function, marked where it is defined (the
agent/exporters/render_*.py modules):

* ``@renderer("libvirt")``: fn(records of that source) -> families. A
  snapshot is rendered once (the collector keeps its families and text until
  the next one), so these must depend on their records alone.
* ``@snapshot_renderer``: fn(snapshot) -> families, for joins across sources
  (storage paths) or live state; runs at every scrape unless declared
  ``@snapshot_renderer(per_snapshot=True)`` (a function of the snapshot alone).

The marks only tag the function; :func:`load_renderers` collects the marked
functions of every render_* module into a :class:`Renderers` value, which
the caller hands to the collector. Renderers of live state outside the
snapshot (the shipper's counters, the live diagnosis) are built around their
provider and added with :meth:`Renderers.with_snapshot`, so no module keeps
a mutable registry or provider.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

SourceRenderer = Callable[[object], Iterable]
SnapshotRenderer = Callable[[object], Iterable]


def renderer(source: str):
    """Mark fn(records of ``source``) -> families as that source's renderer."""

    def deco(fn):
        fn.renders_source = source
        return fn

    return deco


def snapshot_renderer(fn=None, *, per_snapshot: bool = False):
    """Mark fn(snapshot) -> families as a snapshot renderer (see the module docstring)."""

    def deco(f):
        f.per_snapshot = per_snapshot
        f.renders_snapshot = True
        return f

    return deco(fn) if fn is not None else deco


@dataclass(frozen=True)
class Renderers:
    """The renderers one collector runs: per source, and over the whole snapshot (in this order)."""

    by_source: Mapping[str, SourceRenderer] = field(default_factory=dict)
    snapshot: tuple[SnapshotRenderer, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "by_source", MappingProxyType(dict(self.by_source)))
        object.__setattr__(self, "snapshot", tuple(self.snapshot))

    def with_snapshot(self, *fns: SnapshotRenderer) -> "Renderers":
        """These renderers plus ``fns`` (run at every scrape unless marked per_snapshot)."""
        return Renderers(self.by_source, self.snapshot + fns)

    def with_source(self, source: str, fn: SourceRenderer) -> "Renderers":
        """These renderers with ``fn`` rendering ``source``'s records."""
        return Renderers({**self.by_source, source: fn}, self.snapshot)


def renderer_modules() -> list:
    """Every agent/exporters/render_*.py module, imported, in name order."""
    import agent.exporters as pkg

    return [importlib.import_module(f"{pkg.__name__}.{m.name}")
            for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)
            if m.name.startswith("render_")]


def load_renderers() -> Renderers:
    """The marked renderers of every render_* module (module name order, then definition order)."""
    by_source: dict[str, SourceRenderer] = {}
    snapshot: list[SnapshotRenderer] = []
    for mod in renderer_modules():
        for obj in vars(mod).values():
            if not callable(obj) or getattr(obj, "__module__", None) != mod.__name__:
                continue  # imported from elsewhere: counted where it is defined
            source = getattr(obj, "renders_source", None)
            if source is not None:
                by_source[source] = obj
            elif getattr(obj, "renders_snapshot", False):
                snapshot.append(obj)
    return Renderers(by_source, tuple(snapshot))
