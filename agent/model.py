"""The records every output renders: source health and the snapshot.

A :class:`Snapshot` is everything one collection cycle saw, with its time,
host identity and each source's health. Sources return their own typed
records (dataclasses in their modules); the snapshot carries them by source
name. Snapshots are immutable once built and safe to share across threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    OK = "ok"
    NODATA = "nodata"  # a normal host without this thing: not a failure
    FAILED = "failed"


@dataclass(frozen=True)
class SourceHealth:
    name: str
    status: Status
    duration_seconds: float
    reason: str = ""
    # samples or tracked objects the source left out since the agent started, by reason
    # (invalid_value, evicted, expired): the source's own cumulative ``dropped`` counters
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """node_exporter semantics: only a failure is unsuccessful."""
        return self.status is not Status.FAILED

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status.value,
            "duration_seconds": round(self.duration_seconds, 6),
            "reason": self.reason,
        } | ({"dropped": dict(self.dropped)} if self.dropped else {})


@dataclass(frozen=True)
class Snapshot:
    seq: int
    timestamp: float  # UNIX seconds at the start of the cycle
    host: str
    duration_seconds: float
    data: dict[str, Any] = field(default_factory=dict)
    health: dict[str, SourceHealth] = field(default_factory=dict)

    def get(self, source: str, default: Any = None) -> Any:
        return self.data.get(source, default)
