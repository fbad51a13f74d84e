"""Per-object state the agent keeps across cycles, bounded.

The kernel maps are bounded (LRU or fixed max_entries), but what Python
derives from them (running totals per remote, a name cache per device)
would grow with every object ever seen: a local user who makes SYN
retransmits to many addresses on a storage port would grow the agent's
memory, and every snapshot of the history would copy it.

:class:`AgingTable` keeps at most ``cap`` keys (the least recently seen one
is evicted to make room) and forgets a key not seen for ``expire_cycles``
cycles. Both are counted (``evicted``, ``expired``) for the source's
``dropped`` counters.

:class:`Reuse` and :func:`shared_copy` make what a read returns share the
last read's objects where nothing changed, so the agent's history
(``agent.history`` snapshots) holds an idle entry once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, Iterator, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class AgingTable(Generic[K, V]):
    def __init__(self, cap: int, expire_cycles: int):
        if cap < 1 or expire_cycles < 1:
            raise ValueError("cap and expire_cycles must be >= 1")
        self.cap = cap
        self.expire_cycles = expire_cycles
        self.cycle = 0
        self.evicted = 0
        self.expired = 0
        self._d: OrderedDict[K, tuple[int, V]] = OrderedDict()  # least recently seen first

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:
        return key in self._d

    def get(self, key: K, default=None):
        """The value, marked seen this cycle (or ``default``, nothing marked)."""
        item = self._d.get(key)
        if item is None:
            return default
        self._d[key] = (self.cycle, item[1])
        self._d.move_to_end(key)
        return item[1]

    def setdefault(self, key: K, make: Callable[[], V]) -> V:
        """The value of ``key`` (made with ``make()`` if absent, evicting the least recently seen key when
        full), marked seen this cycle."""
        item = self._d.get(key)
        if item is not None:
            self._d[key] = (self.cycle, item[1])
            self._d.move_to_end(key)
            return item[1]
        if len(self._d) >= self.cap:
            self._d.popitem(last=False)
            self.evicted += 1
        v = make()
        self._d[key] = (self.cycle, v)
        return v

    def put(self, key: K, value: V) -> None:
        self.setdefault(key, lambda: value)
        self._d[key] = (self.cycle, value)

    def end_cycle(self) -> None:
        """Forget the keys not seen in the last ``expire_cycles`` cycles; start the next cycle."""
        oldest = self.cycle - self.expire_cycles + 1
        while self._d:
            key, (seen, _) = next(iter(self._d.items()))
            if seen >= oldest:
                break
            del self._d[key]
            self.expired += 1
        self.cycle += 1

    def items(self) -> Iterator[tuple[K, V]]:
        return ((k, v) for k, (_, v) in self._d.items())

    def counts(self) -> dict[str, int]:
        return {"evicted": self.evicted, "expired": self.expired}


def shared_copy(items: Iterable[tuple[K, dict]], prev: dict[K, dict]) -> dict[K, dict]:
    """A snapshot's own copy of running totals (``items``: key, dict of counts), sharing with ``prev`` (the
    copy made at the last read) each inner dict whose counts did not change, and ``prev`` itself when nothing
    did (same keys, same order): the history holds an idle remote's totals once, not once per snapshot.
    Neither copy is ever changed afterwards."""
    out: dict[K, dict] = {}
    same = True
    for k, v in items:
        p = prev.get(k)
        if p is None or p != v:
            p = dict(v)
            same = False
        out[k] = p
    if same and len(out) == len(prev) and all(a is b for a, b in zip(out, prev)):
        return prev
    return out


class Tuples:
    """The tuples of records a probe's read returns (histograms, processes, live sockets...), each the last
    read's tuple when it holds the very same records in the same order: an idle host's snapshots then share
    one tuple per kind instead of each holding a copy of the same references."""

    def __init__(self):
        self._prev: dict[str, tuple] = {}

    def same(self, kind: str, items: Iterable) -> tuple:
        t = tuple(items)
        prev = self._prev.get(kind)
        if prev is not None and len(prev) == len(t) and all(a is b for a, b in zip(prev, t)):
            return prev
        self._prev[kind] = t
        return t


class Reuse(Generic[V]):
    """The records built from a kernel map's entries, rebuilt only when an entry's raw bytes change.

    An entry unchanged since the last read gives back the very record object
    of the last read, so the agent's history (``agent.history`` snapshots,
    120 by default) holds it once instead of once per snapshot, and the
    decoding (addresses, names) is not redone. Keeps only the entries of the
    last read: bounded by the map's own size."""

    def __init__(self):
        self._prev: dict[Hashable, V] = {}
        self._cur: dict[Hashable, V] = {}

    def get(self, raw: Hashable, make: Callable[[], V]) -> V:
        """The record of the entry whose raw content (bytes, or a tuple of numbers) is ``raw``."""
        rec = self._prev.get(raw)
        if rec is None:
            rec = make()
        self._cur[raw] = rec
        return rec

    def end_cycle(self) -> None:
        self._prev, self._cur = self._cur, {}

    def __len__(self) -> int:
        return len(self._prev)
