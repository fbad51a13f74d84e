"""Prometheus families for the shipper's health (agent/shipping).

Shipping state lives outside the snapshot (it changes between cycles), so
``kvmscope run`` builds the renderer around the shipper's health provider
(:func:`shipping_renderer`) and adds it to the collector's renderers; the
renderer only reads counters kept in memory.
"""

from __future__ import annotations

from typing import Callable, Iterable

from agent.exporters import catalog as C


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


def shipping_renderer(health: Callable[[], dict]) -> Callable:
    """A snapshot renderer (run at every scrape) of the counters ``health()`` returns."""

    def render_shipping(_snap) -> Iterable:
        yield from render_health(health())

    return render_shipping
