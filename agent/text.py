"""Text for terminals, shared by the library's text reports and the CLI.

Values shown on a terminal come from outside (VM names, portals, log lines):
:func:`clean` makes control characters visible so that a crafted name cannot
move the cursor or forge lines of a report.
"""

from __future__ import annotations

_CTRL = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
_CTRL.update({chr(i): f"\\x{i:02x}" for i in list(range(32)) + [127] if chr(i) not in _CTRL})


def clean(value) -> str:
    """A value for a terminal table: control characters made visible, None as '-'."""
    if value is None:
        return "-"
    s = str(value)
    return "".join(_CTRL.get(c, c) if (ord(c) < 32 or c == "\x7f") else c for c in s)
