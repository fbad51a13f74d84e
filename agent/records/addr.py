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

import socket


def canonical_host(host: str | None) -> str | None:
    """An IP literal in its one text form, a name as is: the edge where addresses enter.

    ``FD00:0:0::0002`` or ``[fd00::2]`` -> ``fd00::2`` (RFC 5952 section 4:
    lower case, longest zero run compressed, no brackets), by the same
    ``inet_ntop`` that writes the addresses of the sockets the agent reads
    (inet_diag), so a portal a VM's definition names and the socket that
    serves it compare and print the same. Anything else (a host name, a
    zoned ``fe80::1%eth0``) is returned as is.
    """
    if not host:
        return host
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    for family in (socket.AF_INET6, socket.AF_INET):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, bare))
        except OSError:
            continue
    return host


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
