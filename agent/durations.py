"""Durations written by people ('500ms', '30s', '5m', '1h', '1d'), one parser for every caller."""

from __future__ import annotations

import re

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(text: str, integer: bool = False) -> float:
    """'500ms', '30s', '2m', '1h', '1d' (a bare number is seconds) -> seconds.
    ``integer``: whole numbers only. ValueError when it is not a duration;
    range checks are the caller's."""
    num = r"\d+" if integer else r"\d+(?:\.\d+)?"
    m = re.fullmatch(rf"\s*({num})\s*(ms|s|m|h|d)?\s*", text or "")
    if not m:
        raise ValueError(f"{text!r} is not a duration")
    return float(m[1]) * _UNITS[m[2]]
