"""Pure decoders of what the probes leave in their maps (no I/O here).

Kernel C only fills maps; every name and unit is decided here, in small
functions with unit tests (tests/unit/test_probe_decode.py):

* dev_t → device name: the tracepoints carry the kernel's internal dev_t
  (``MAJOR << 20 | MINOR``, include/linux/kdev_t.h), not the user-space
  encoding; names come from ``/sys/dev/block/MAJ:MIN/uevent`` (DEVNAME).
* address bytes (family + 16 bytes) → text, and a task's comm → text: each
  distinct value decoded once and shared (a bounded cache), so the agent's
  history holds one string per address or name, not one per event.
* log2 slot → histogram bound: slot ``s`` of ``bpf_log2l(ns)`` holds
  values in ``[2^(s-1), 2^s)`` ns, so its Prometheus ``le`` is ``2^s`` ns.
* TCP state numbers → names, checked against the running kernel's
  ``sock:inet_sock_set_state`` print format by an eBPF test.
* ``/proc/PID/fdinfo/FD`` of a BPF program → run_time_ns, run_cnt.
* the probes' shared totals (TOT_* counters + event stream) → sums.

The ctypes layouts here and in the probe modules mirror probes/common.h
and probes/<name>.h; tests/unit/test_probe_layouts.py compiles those
headers with cc and compares every field and constant.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re
import sys
from functools import lru_cache

# probes/common.h KS_AF_INET, KS_AF_INET6
AF_INET = 2
AF_INET6 = 10


class KsRate(ctypes.Structure):
    """probes/common.h struct ks_rate."""

    _fields_ = [("window_start", ctypes.c_uint64), ("sent", ctypes.c_uint64)]


class KsStream(ctypes.Structure):
    """probes/common.h struct ks_stream: one CPU's event stream counters."""

    _fields_ = [("sent", ctypes.c_uint64), ("capped", ctypes.c_uint64), ("full", ctypes.c_uint64), ("rate", KsRate)]


# C struct name -> ctypes mirror, for tests/unit/test_probe_layouts.py
STRUCTS = {"ks_rate": KsRate, "ks_stream": KsStream}

# internal kernel dev_t (include/linux/kdev_t.h: MINORBITS 20)
MINORBITS = 20
MINORMASK = (1 << MINORBITS) - 1


def dev_major_minor(dev: int) -> tuple[int, int]:
    """Kernel-internal dev_t (as in block tracepoints) → (major, minor)."""
    return dev >> MINORBITS, dev & MINORMASK


def parse_uevent(text: str) -> dict[str, str]:
    """``KEY=value`` lines of a sysfs uevent file."""
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


# distinct addresses / names kept decoded: a host talks to a bounded set of peers; beyond that the least
# recently used are decoded again (the same text, another copy)
TEXT_CACHE = 4096


def addr_text(family: int, raw: bytes) -> str:
    """Address bytes from a probe (IPv4 in the first 4 bytes) → text (one shared string per address)."""
    if family == AF_INET:
        return _addr_text(family, bytes(raw[:4]))
    if family == AF_INET6:
        return _addr_text(family, bytes(raw[:16]))
    return f"family{family}"


@lru_cache(maxsize=TEXT_CACHE)
def _addr_text(family: int, raw: bytes) -> str:
    if family == AF_INET:
        return sys.intern(str(ipaddress.IPv4Address(raw)))
    a = ipaddress.IPv6Address(raw)
    return sys.intern(str(a.ipv4_mapped) if a.ipv4_mapped else str(a))


_INTS: dict[int, int] = {}


def shared_int(n: int) -> int:
    """``n`` as the one int object kept for that value (ports, pids: values that repeat across events and
    snapshots; each big int is otherwise an object of its own). Bounded: the table starts afresh when full."""
    v = _INTS.get(n)
    if v is None:
        if len(_INTS) >= TEXT_CACHE:
            _INTS.clear()
        v = _INTS[n] = n
    return v


@lru_cache(maxsize=TEXT_CACHE)
def comm_text(raw: bytes) -> str:
    """A task's comm (TASK_COMM_LEN bytes, NUL-padded, or already cut at the NUL) → text (one shared string per
    name)."""
    return sys.intern(raw.split(b"\0", 1)[0].decode(errors="replace"))


def family_name(family: int) -> str:
    return {AF_INET: "ipv4", AF_INET6: "ipv6"}.get(family, f"af{family}")


# -- histograms -------------------------------------------------------------

def slot_upper_ns(slot: int) -> int:
    """Exclusive upper bound in ns of log2 slot ``slot`` (bpf_log2l).

    bpf_log2l(v) = floor(log2(v)) + 1 for v > 0 and 0 for v = 0, so slot 0
    holds 0 ns and slot s >= 1 holds [2^(s-1), 2^s).
    """
    if slot < 0:
        raise ValueError("slot must be >= 0")
    return 1 << slot


def slot_bound_seconds(slot: int) -> float:
    """Prometheus ``le`` of slot ``slot``, in seconds."""
    return slot_upper_ns(slot) / 1e9


def cumulative_buckets(slots: dict[int, int], slot_max: int, overflow_slot: int | None = None) -> list[tuple[str, int]]:
    """log2 slot counts → cumulative Prometheus buckets, every bound present.

    Bounds are ``2^s`` ns for s = 0..slot_max, then ``+Inf``; the overflow
    slot (slot_max + 1, values >= 2^slot_max ns) only reaches ``+Inf``.
    Returns ``[(le_text, cumulative_count), ...]`` ending with ``+Inf``.
    """
    overflow_slot = slot_max + 1 if overflow_slot is None else overflow_slot
    out = []
    acc = 0
    for s in range(slot_max + 1):
        acc += slots.get(s, 0)
        out.append((float_text(slot_bound_seconds(s)), acc))
    acc += sum(c for s, c in slots.items() if s > slot_max)
    out.append(("+Inf", acc))
    return out


def float_text(v: float) -> str:
    """The text prometheus_client writes for a bound (repr of a float)."""
    return repr(float(v))


def slot_of_ns(ns: int) -> int:
    """What bpf_log2l puts a latency in (for tests and fio comparisons)."""
    return 0 if ns <= 0 else int(ns).bit_length()


# -- block operations (probes/block_io.h enum op, in order) ------------------
BLOCK_OPS = ("read", "write", "flush", "discard", "other")


def block_op_name(op: int) -> str:
    return BLOCK_OPS[op] if 0 <= op < len(BLOCK_OPS) else "other"


def rwbs_op(rwbs: str) -> str:
    """The op the C's op_of() derives from an rwbs string (mirror, for tests)."""
    c0, c1 = (rwbs + "  ")[:2]
    if c0 == "F":
        return {"W": "write", "R": "read", "D": "discard"}.get(c1, "flush")
    return {"R": "read", "W": "write", "D": "discard"}.get(c0, "other")


# -- TCP states (include/net/tcp_states.h; probes/common.h KS_TCP_*) ---------
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}


def tcp_state_name(n: int) -> str:
    return TCP_STATES.get(n, f"STATE_{n}") if n >= 0 else "-"


def parse_state_symbols(format_text: str, field: str = "newstate") -> dict[int, str]:
    """``__print_symbolic(REC->newstate, { 1, "TCP_ESTABLISHED" }, ...)`` of a
    tracefs format file → {1: "ESTABLISHED", ...}."""
    m = re.search(r"__print_symbolic\(REC->" + re.escape(field) + r",((?:\s*\{[^}]*\}\s*,?)*)\)", format_text)
    if not m:
        return {}
    return {int(n): name.removeprefix("TCP_") for n, name in re.findall(r"\{\s*(\d+)\s*,\s*\"(\w+)\"\s*\}", m.group(1))}


def parse_format_fields(format_text: str) -> dict[str, str]:
    """Field name → declaration, from a tracefs ``events/<cat>/<name>/format``."""
    out = {}
    for m in re.finditer(r"field:([^;]+);", format_text):
        decl = m.group(1).strip()
        name = re.sub(r"\[.*\]$", "", decl.split()[-1])
        out[name] = decl
    return out


# -- BPF program self-measurement --------------------------------------------

def parse_fdinfo(text: str) -> dict[str, int]:
    """``/proc/PID/fdinfo/FD`` of a BPF program → integer fields.

    The kernel writes run_time_ns and run_cnt (5.1+; they move only while
    BPF stats are enabled) and recursion_misses (5.12+).
    """
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            try:
                out[k.strip()] = int(v.strip(), 0) if v.strip().startswith("0x") else int(v.strip())
            except ValueError:
                continue
    return out


def sum_totals(percpu, n: int) -> tuple[list[int], int, int]:
    """Per-CPU values of a streaming probe's totals (``u64 t[TOT_N]`` +
    ``struct ks_stream stream``) → (t summed over the CPUs, records sent,
    records dropped by the rate cap or a full ring buffer)."""
    t = [0] * n
    sent = dropped = 0
    for v in percpu:
        arr = v.t
        for i in range(n):
            t[i] += int(arr[i])
        s = v.stream
        sent += int(s.sent)
        dropped += int(s.capped) + int(s.full)
    return t, sent, dropped


def counter_delta(prev: int | None, now: int) -> int:
    """Increase of a kernel counter that may have been reset (map entry
    evicted and created again): a decrease means a restart from zero."""
    if prev is None or now < prev:
        return now
    return now - prev
