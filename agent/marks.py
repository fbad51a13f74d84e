"""How an output's functions are tied to the snapshot: marked where they are defined, against an accessor.

Every output that turns a snapshot into something (the Prometheus renderers
in ``agent/exporters/render_*.py``, the Elasticsearch document builders in
``agent/shipping/docs_*.py``) is a plain function marked in its own module:

* :func:`reads` ``(Snapshot.tcp_retrans)``: fn(records, ...) of what that
  snapshot accessor returns; not called when it returns None (the source did
  not deliver this cycle). The accessor is named by reference, so the flow
  from a source's records to its outputs is a reference a reader (or an
  editor) can follow, not a repeated source-name string.
* :func:`over_snapshot`: fn(snapshot, ...) for joins across sources or live state.

:func:`load` imports a package's modules with a prefix and collects the marked
functions into an :class:`Outputs` value (no module-level registry): the
caller keeps it and may add to it (:meth:`Outputs.with_snapshot`).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from agent.records.snapshot import accessor_name


def reads(accessor) -> Callable:
    """Mark fn(records, ...) as an output of the Snapshot accessor ``accessor`` (``Snapshot.vms``)."""
    name = accessor_name(accessor)

    def deco(fn):
        fn.reads = name
        return fn

    return deco


def over_snapshot(fn: Callable) -> Callable:
    """Mark fn(snapshot, ...) as an output over the whole snapshot."""
    fn.over_snapshot = True
    return fn


@dataclass(frozen=True)
class Outputs:
    """The functions one output runs: of records (accessor name, fn), then over the snapshot, each in its order."""

    records: tuple[tuple[str, Callable], ...] = ()
    snapshot: tuple[Callable, ...] = ()

    def with_snapshot(self, *fns: Callable) -> "Outputs":
        """These functions plus ``fns`` over the snapshot."""
        return Outputs(self.records, self.snapshot + fns)

    def with_records(self, accessor, fn: Callable) -> "Outputs":
        """These functions with ``fn`` in the place of the one (or at the end) reading ``accessor``."""
        name = accessor_name(accessor)
        if any(n == name for n, _f in self.records):
            return Outputs(tuple((n, fn if n == name else f) for n, f in self.records), self.snapshot)
        return Outputs(self.records + ((name, fn),), self.snapshot)

    def of(self, accessor) -> Callable | None:
        """The function reading ``accessor``, if any."""
        name = accessor_name(accessor)
        return next((f for n, f in self.records if n == name), None)


def modules(package: str, prefix: str) -> list:
    """Every module ``package.<prefix>*``, imported, in name order."""
    pkg = importlib.import_module(package)
    return [importlib.import_module(f"{package}.{m.name}")
            for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name) if m.name.startswith(prefix)]


def load(package: str, prefix: str) -> Outputs:
    """The marked functions of every ``package.<prefix>*`` module (module name order, then definition order)."""
    records: list[tuple[str, Callable]] = []
    snapshot: list[Callable] = []
    for mod in modules(package, prefix):
        for obj in vars(mod).values():
            if not callable(obj) or getattr(obj, "__module__", None) != mod.__name__:
                continue  # imported from elsewhere: counted where it is defined
            name = getattr(obj, "reads", None)
            if isinstance(name, str):
                records.append((name, obj))
            elif getattr(obj, "over_snapshot", False) is True:
                snapshot.append(obj)
    return Outputs(tuple(records), tuple(snapshot))
