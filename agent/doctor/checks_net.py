"""MTU consistency along the interfaces that carry iSCSI connections.

Inputs: the storage TCP connections (inet_diag, with ``tcp_info.pmtu``, the
path MTU the socket currently uses), the host interfaces (sysfs ``mtu``)
and their addresses; a connection's interface is the one holding its source
address (as in :mod:`agent.records.paths`).
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict

from agent.doctor import DoctorInput, Result, check

REF_MTU = ("RFC 1191 / RFC 8201 (path MTU discovery); ip-link(8) mtu; "
           "open-iscsi README (iface settings: net_ifacename, MTU of offload ifaces)")


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


@check("mtu", 40, "MTU consistency along iSCSI interfaces")
def mtu(inp: DoctorInput) -> list[Result]:
    """MTU of every interface carrying storage connections, compared with each other and with the path MTU.

    Jumbo frames on some storage paths and not on others usually means one
    side (host, switch or target) was missed: large frames are dropped
    silently, logins (small PDUs) succeed and the first large write stalls.
    A path MTU below the interface MTU means something on the way has a
    smaller MTU; with ICMP "fragmentation needed" filtered, that is a black
    hole for full-size segments.
    """
    name = "mtu"
    st = inp.snapshot.storage_tcp
    if st is None or not st.connections:
        return [Result(name, "skipped", "host",
                       "no storage TCP connections to check" + (f" ({inp.health('storage_tcp')})"
                                                                if inp.health("storage_tcp") else ""),
                       reference=REF_MTU)]
    ni = inp.snapshot.interfaces
    if ni is None:
        return [Result(name, "skipped", "host", f"interfaces unknown ({inp.health('net_ifaces')})", reference=REF_MTU)]
    addr_map = ni.address_map()
    by_if: dict[str, list] = defaultdict(list)
    loopback, unknown = [], []
    for c in st.connections:
        if _is_loopback(c.src):
            loopback.append(c)
            continue
        ifname = addr_map.get(c.src)
        (by_if[ifname].append(c) if ifname else unknown.append(c))
    out: list[Result] = []
    mtus: dict[str, int | None] = {}
    for ifname, conns in sorted(by_if.items()):
        iface = ni.get(ifname)
        m = iface.mtu if iface else None
        mtus[ifname] = m
        low = [(c, c.info.pmtu) for c in conns if c.info and c.info.pmtu and m and c.info.pmtu < m]
        if low:
            out.append(Result(
                name, "warning", ifname,
                f"path MTU below the interface MTU {m}: " + ", ".join(f"{c.four_tuple} pmtu {p}" for c, p in low),
                why="something between host and portal has a smaller MTU; full-size segments depend on ICMP "
                    "'fragmentation needed' reaching the host, and a filter on the way makes them vanish "
                    "(stalls on large I/O, retransmits)",
                reference=REF_MTU,
                fix="make the MTU the same end to end (host NIC, switch ports, target portal), or lower the "
                    "interface MTU to the path MTU",
                values={"interface": ifname, "mtu": m,
                        "connections": {c.four_tuple: p for c, p in low}}))
    known = {k: v for k, v in mtus.items() if v is not None}
    values = {"interfaces": known, "connections": {k: len(v) for k, v in sorted(by_if.items())}}
    if len(set(known.values())) > 1:
        out.append(Result(
            name, "warning", ", ".join(sorted(known)),
            "storage interfaces have different MTUs: " + ", ".join(f"{k} {v}" for k, v in sorted(known.items())),
            why="paths to the same storage normally share one MTU; a jumbo-frame path whose switch or target side "
                "was not changed drops large frames, so I/O on that path stalls while logins work",
            reference=REF_MTU, fix="set the same MTU on every storage interface, switch port and portal",
            values=values))
    elif known and not out:
        m = next(iter(known.values()))
        out.append(Result(
            name, "ok", ", ".join(sorted(known)),
            f"MTU {m} on {', '.join(sorted(known))} ({sum(len(v) for v in by_if.values())} connections); "
            "path MTU not lower than the interface MTU",
            reference=REF_MTU, values=values))
    if unknown:
        out.append(Result(
            name, "info", "unknown interface",
            f"{len(unknown)} connection(s) from addresses on no local interface: "
            + ", ".join(c.four_tuple for c in unknown[:5]),
            why="their MTU cannot be checked (another network namespace, or the address went away)",
            reference=REF_MTU, values={"connections": [c.four_tuple for c in unknown]}))
    if loopback:
        out.append(Result(name, "info", "lo", f"{len(loopback)} connection(s) over loopback: MTU not relevant",
                          reference=REF_MTU, values={"connections": [c.four_tuple for c in loopback]}))
    return out
