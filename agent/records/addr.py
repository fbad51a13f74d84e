"""Addresses, endpoints and portals as text: the one formatter.

An IPv6 literal is written in brackets when a port follows or when it
stands next to other endpoints (RFC 3986 section 3.2.2, RFC 5952 section 6):
``[fd00::1]:3260``, ``[::ffff:10.0.0.1]:3260`` (an IPv4-mapped address is
IPv6 text and keeps its brackets), ``10.0.0.1:3260``. A host name or an
IPv4 address is written as is. Every portal, connection and listen address
the agent prints, exports or ships goes through these functions, so
/metrics, ``paths``, ``diagnose`` and Elasticsearch show the same string.
"""

from __future__ import annotations


def fmt_host(addr: str | None) -> str:
    """``fd00::1`` -> ``[fd00::1]``; IPv4 and names unchanged; None or "" -> ""."""
    if not addr:
        return ""
    if ":" in addr and not addr.startswith("["):
        return f"[{addr}]"
    return addr


def fmt_endpoint(addr: str | None, port: int | str | None) -> str:
    """``ADDR:PORT`` with IPv6 bracketed; the bare host when the port is unknown; "" without an address."""
    host = fmt_host(addr)
    if not host or port is None or port == "":
        return host
    return f"{host}:{port}"


def fmt_portal(addr: str | None, port: int | str | None) -> str | None:
    """An iSCSI portal ``ADDR:PORT``, or None when the address or the port is unknown."""
    if not addr or port is None or port == "":
        return None
    return fmt_endpoint(addr, port)


def fmt_conn(src: str | None, sport: int | str | None, dst: str | None, dport: int | str | None) -> str:
    """A TCP connection ``SRC:SPORT->DST:DPORT`` (IPv6 bracketed on both ends)."""
    return f"{fmt_endpoint(src, sport)}->{fmt_endpoint(dst, dport)}"
