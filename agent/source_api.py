"""The contract between the agent and its sources: what a source gets, what it is, how it registers.

Below both ``agent.sources`` (the host's sources) and ``agent.ebpf`` (the
probes and their source glue), so neither package imports the other in a
loop: ``agent.sources`` re-exports these names and its ``ebpf_*`` modules
import ``agent.ebpf``; ``agent.ebpf`` imports only this module. See
:mod:`agent.sources` for the rules a source follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, Protocol, TypeVar

from agent.config import Config
from agent.hostpaths import HostPaths


@dataclass(frozen=True)
class SourceContext:
    config: Config
    paths: HostPaths
    # True only in the agent (`kvmscope run`): it alone moves durable state such as storage_log's read
    # positions; CLI commands that collect in-process read that state but never move it.
    owns_state: bool = False


class Source(Protocol):
    name: str

    def collect(self) -> Any: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SourceInfo:
    name: str
    default_enabled: bool
    description: str
    factory: Callable[[SourceContext], Source]


REGISTRY: dict[str, SourceInfo] = {}


def register(name: str, *, default_enabled: bool = True, description: str = ""):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = SourceInfo(name, default_enabled, description or (cls.__doc__ or "").strip().split("\n")[0], cls)
        return cls

    return deco


R = TypeVar("R")


class Unchanged(Generic[R]):
    """Gives back last cycle's record for a key when this cycle's equals it.

    The agent's history (``agent.history`` snapshots, 120 by default) then
    holds an unchanged record (an idle device, an interface whose counters did
    not move) once instead of once per snapshot. Records are immutable, so
    sharing them is safe. Keeps only the keys of the last cycle."""

    def __init__(self):
        self._prev: dict[Hashable, R] = {}
        self._cur: dict[Hashable, R] = {}

    def same(self, key: Hashable, rec: R) -> R:
        """``rec``, or last cycle's record of ``key`` when equal to it."""
        prev = self._prev.get(key)
        if prev is not None and prev == rec:
            rec = prev
        self._cur[key] = rec
        return rec

    def end_cycle(self) -> bool:
        """Start the next cycle; True when every record of this one was last cycle's (same keys)."""
        unchanged = self._cur.keys() == self._prev.keys() and all(self._prev[k] is v for k, v in self._cur.items())
        self._prev, self._cur = self._cur, {}
        return unchanged
