"""Prometheus families for the shipper's health (agent/shipping).

Shipping state lives outside the snapshot (it changes between cycles), so
``kvmscope run`` registers the live provider with :func:`set_provider`; the
renderer only reads counters kept in memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

from agent.exporters import catalog as C
from agent.exporters.prometheus import snapshot_renderer

_provider: Callable[[], dict] | None = None


def set_provider(fn: Callable[[], dict] | None) -> None:
    global _provider
    _provider = fn


def render_health(h: dict) -> Iterable:
    pairs = [
        (C.SHIPPING_QUEUED, "queued"),
        (C.SHIPPING_SHIPPED, "shipped"),
        (C.SHIPPING_RETRIED, "retried"),
        (C.SHIPPING_FAILED, "failed"),
        (C.SHIPPING_DROPPED, "dropped"),
        (C.SHIPPING_SPOOL_BYTES, "spool_bytes"),
        (C.SHIPPING_OLDEST_AGE, "oldest_age"),
        (C.SHIPPING_UP, "up"),
        (C.SHIPPING_BULK_REQUESTS, "bulk_requests"),
        (C.SHIPPING_BULK_ERRORS, "bulk_errors"),
        (C.SHIPPING_FILE_DOCS, "file_written"),
        (C.SHIPPING_LOCAL_ERRORS, "local_errors"),
    ]
    for d, key in pairs:
        v = h.get(key)
        if v is None:
            continue
        fam = d.family()
        fam.add_metric([], float(v))
        yield fam


@snapshot_renderer
def render_shipping(snap) -> Iterable:
    if _provider is None:
        return
    yield from render_health(_provider())
