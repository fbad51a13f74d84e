"""Which renderers turn a snapshot into Prometheus families.

A renderer is a plain function, marked where it is defined (the
agent/exporters/render_*.py modules) against what it reads (:mod:`agent.marks`):

* ``@renderer(Snapshot.host_tcp)``: fn(what that snapshot accessor returns)
  -> families; not called when the accessor returns None. A snapshot is
  rendered once (the collector keeps its families and text until the next
  one), so these must depend on their records alone.
* ``@snapshot_renderer``: fn(snapshot) -> families, for joins across sources
  (storage paths) or live state; runs at every scrape unless declared
  ``@snapshot_renderer(per_snapshot=True)`` (a function of the snapshot alone).

:func:`load_renderers` collects the marked functions of every render_*
module into a :class:`Renderers` value (an :class:`agent.marks.Outputs`),
which the caller hands to the collector. Renderers of live state outside
the snapshot (the shipper's counters, the live diagnosis) are built around
their provider and added with ``Renderers.with_snapshot``, so no module
keeps a mutable registry or provider.
"""

from __future__ import annotations

from agent import marks
from agent.marks import Outputs as Renderers

__all__ = ["Renderers", "renderer", "snapshot_renderer", "load_renderers"]

renderer = marks.reads


def snapshot_renderer(fn=None, *, per_snapshot: bool = False):
    """Mark fn(snapshot) -> families as a snapshot renderer (see the module docstring)."""

    def deco(f):
        f.per_snapshot = per_snapshot
        return marks.over_snapshot(f)

    return deco(fn) if fn is not None else deco


def load_renderers() -> Renderers:
    """The marked renderers of every render_* module (module name order, then definition order)."""
    return marks.load("agent.exporters", "render_")
