"""File helpers shared by sources and outputs (below both: imports nothing of the agent)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def set_aside(path: Path, owner: str) -> None:
    """Rename an unusable state file to ``<name>.bad-<time>``: kept for a human, out of the way of the
    next save (``owner`` names who gave up on it in the log line). Never raises."""
    bad = path.with_name(f"{path.name}.bad-{int(time.time())}")
    try:
        os.replace(path, bad)
        log.warning("%s: kept the unusable %s as %s", owner, path.name, bad.name)
    except OSError as e:
        log.warning("%s: cannot rename the unusable %s: %s", owner, path, e.strerror or e)
