"""The contract between the agent and its sources: what a source gets, what it is, how it registers.

Below both ``agent.sources`` (the host's sources) and ``agent.ebpf`` (the
probes and their source glue), so neither package imports the other in a
loop: ``agent.sources`` re-exports these names and its ``ebpf_*`` modules
import ``agent.ebpf``; ``agent.ebpf`` imports only this module. See
:mod:`agent.sources` for the rules a source follows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

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
