"""The storage host's network: namespace kvmslab-stor and one veth link per
portal (host end kvmslab-hN 198.18.N.1/24, namespace end kvmslab-nN
198.18.N.2/24). Only 198.18.0.0/15 addresses (RFC 2544 benchmarking range),
never a route out of the machine. A new kind of host joins these links (or a
bridge over them) rather than making its own paths, so the faults, which act
on the links' traffic, reach it too."""

import os

from .common import NETNS, PORTALS, log, ok, run


def netns_exists():
    return os.path.exists(f"/run/netns/{NETNS}")


def ip(ns=None):
    """`ip` command prefix for the host (ns None) or a namespace."""
    return ["ip"] + (["-n", ns] if ns else [])


def link_exists(name, ns=None):
    return ok(ip(ns) + ["link", "show", "dev", name])


def link_cmds(p):
    """Addresses and link state of one portal's veth pair (idempotent)."""
    return [
        ip() + ["addr", "replace", f"{p['host_addr']}/{p['prefix']}", "dev", p["host_if"]],
        ip() + ["link", "set", p["host_if"], "up"],
        ip(NETNS) + ["addr", "replace", f"{p['address']}/{p['prefix']}", "dev", p["ns_if"]],
        ip(NETNS) + ["link", "set", p["ns_if"], "up"],
    ]


def ensure_network():
    if not netns_exists():
        log(f"creating network namespace {NETNS}")
        run(["ip", "netns", "add", NETNS])
    run(ip(NETNS) + ["link", "set", "lo", "up"])
    for idx, p in PORTALS.items():
        if not link_exists(p["host_if"]):
            if link_exists(p["ns_if"]):
                run(["ip", "link", "del", p["ns_if"]], check=False)
            log(f"creating veth {p['host_if']} <-> {NETNS}:{p['ns_if']} "
                f"({p['host_addr']} <-> {p['address']}) for portal {idx}")
            run(["ip", "link", "add", p["host_if"], "type", "veth",
                 "peer", "name", p["ns_if"]])
            run(["ip", "link", "set", p["ns_if"], "netns", NETNS])
        elif not link_exists(p["ns_if"], NETNS):
            # host end exists but its peer is not in our namespace: recreate
            run(["ip", "link", "del", p["host_if"]])
            return ensure_network()
        for cmd in link_cmds(p):
            run(cmd)


def remove_network(errors):
    for p in PORTALS.values():
        if link_exists(p["host_if"]):
            log(f"deleting veth {p['host_if']}")
            p_ = run(["ip", "link", "del", p["host_if"]], check=False)
            if p_.returncode != 0:
                errors.append(f"cannot delete {p['host_if']}: {p_.stderr.strip()}")
    if netns_exists():
        log(f"deleting network namespace {NETNS}")
        p_ = run(["ip", "netns", "del", NETNS], check=False)
        if p_.returncode != 0:
            errors.append(f"cannot delete netns {NETNS}: {p_.stderr.strip()}")
