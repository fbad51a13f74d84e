"""Checks for numbers that come from outside the agent (domain XML, QMP, libvirt stats).

``str.isdigit()`` is True for "²" and "٣", and ``int()`` takes Unicode
digits, signs, spaces and underscores: neither says "a plain decimal number
a peer may send". These do, and they never raise: a bad value is ``None``
(or False), and the caller reports it.
"""

from __future__ import annotations

U64_MAX = (1 << 64) - 1


def ascii_uint(text, maximum: int = U64_MAX) -> int | None:
    """``text`` as an int if it is ASCII decimal digits only (no sign, space or '_') and <= ``maximum``."""
    if not isinstance(text, str) or not text or len(text) > 20 or not (text.isascii() and text.isdigit()):
        return None
    v = int(text)
    return v if v <= maximum else None


def valid_counter(v) -> bool:
    """A counter from a structured peer (JSON, libvirt typed parameters): an int in 0..2**64-1, not a bool."""
    return type(v) is int and 0 <= v <= U64_MAX
