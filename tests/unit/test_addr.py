"""The one formatter of addresses, endpoints, portals and connections."""

import pytest

from agent.records.addr import canonical_host, fmt_conn, fmt_endpoint, fmt_host, fmt_portal
from agent.records.iscsi import IscsiConnection, IscsiSession
from agent.records.tcp import StorageConnection


@pytest.mark.parametrize(
    "addr, host, endpoint",
    [
        ("10.0.0.1", "10.0.0.1", "10.0.0.1:3260"),
        ("fd00:10::1", "[fd00:10::1]", "[fd00:10::1]:3260"),
        ("::1", "[::1]", "[::1]:3260"),
        ("::ffff:10.0.0.1", "[::ffff:10.0.0.1]", "[::ffff:10.0.0.1]:3260"),  # IPv4-mapped is IPv6 text
        ("[fd00::1]", "[fd00::1]", "[fd00::1]:3260"),  # already bracketed: not twice
        ("target.example", "target.example", "target.example:3260"),
        ("", "", ""),
        (None, "", ""),
    ],
)
def test_host_and_endpoint(addr, host, endpoint):
    assert fmt_host(addr) == host
    assert fmt_endpoint(addr, 3260) == endpoint
    assert fmt_portal(addr, 3260) == (endpoint or None)


def test_unknown_port():
    assert fmt_endpoint("fd00::1", None) == "[fd00::1]"
    assert fmt_endpoint("10.0.0.1", None) == "10.0.0.1"
    assert fmt_portal("10.0.0.1", None) is None and fmt_portal(None, 3260) is None


def test_connection():
    assert fmt_conn("10.0.0.2", 40000, "10.0.0.1", 3260) == "10.0.0.2:40000->10.0.0.1:3260"
    assert fmt_conn("fd00::2", 40000, "fd00::1", 3260) == "[fd00::2]:40000->[fd00::1]:3260"
    assert fmt_conn("::ffff:10.0.0.2", 1, "::ffff:10.0.0.1", 2) == "[::ffff:10.0.0.2]:1->[::ffff:10.0.0.1]:2"


def test_records_use_it():
    c = StorageConnection("ipv6", "ESTABLISHED", "fd00::2", 40000, "fd00::1", 3260, 1, None, None, None)
    assert c.portal == "[fd00::1]:3260" and c.four_tuple == "[fd00::2]:40000->[fd00::1]:3260"
    conn = IscsiConnection("1:0", "fd00::1", 3260, None, None, 40000, "up", 5, 5)
    s = IscsiSession(1, "iqn.x", 1, "LOGGED_IN", 5, "default", None, "host1", None, None, connections=(conn,))
    assert s.portal == "[fd00::1]:3260"
    assert IscsiSession(2, "iqn.x", 1, "FREE", 5, None, None, None, None, None).portal is None


@pytest.mark.parametrize(
    "given, canonical",
    [
        ("FD00:0:0::0002", "fd00::2"),  # what a VM definition may say -> what inet_diag says
        ("[fd00:6b76:6d73:6::2]", "fd00:6b76:6d73:6::2"),
        ("fd00:0000:0000:0000:0000:0000:0000:0001", "fd00::1"),
        ("::ffff:10.0.0.1", "::ffff:10.0.0.1"),  # inet_ntop keeps the dotted tail
        ("10.0.0.1", "10.0.0.1"),
        ("010.0.0.1", "010.0.0.1"),  # not an inet_pton address: left as written
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("target.example", "target.example"),
        ("", ""),
        (None, None),
    ],
)
def test_canonical_host(given, canonical):
    assert canonical_host(given) == canonical


def test_canonical_then_formatted_is_one_string():
    forms = ["FD00:6B76:6D73:6::2", "fd00:6b76:6d73:0006:0:0:0:2", "[fd00:6b76:6d73:6::2]"]
    assert {fmt_portal(canonical_host(f), 3260) for f in forms} == {"[fd00:6b76:6d73:6::2]:3260"}
