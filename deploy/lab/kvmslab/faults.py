"""Faults: each fault shape is one class in FAULTS; each is applied by a
mechanism that rebuilds the kernel's rules from st["faults"] as a whole.

Shapes today (key in st["faults"] -> subcommands -> mechanism):
  loss_pct         `lab loss PCT [--portal N]`           iptables drops (statistic)
  offline_portals  `lab target-offline/online [--portal N]` iptables drops (all)
  throttle_iops    `lab throttle-target IOPS|off`        blkio throttle (cgroup v1)

Mechanisms:
  IptablesDrops  chain KVMSLAB, jumped to first thing from INPUT on the host
                 and inside the storage namespace. Each direction is dropped at
                 the *receiving* end of its veth link, so both TCP stacks see
                 real in-flight loss and retransmit:
                   target -> host (sport 3260): host INPUT
                   host -> target (dport 3260): namespace INPUT
                 (A drop in the sender's own OUTPUT hook is reported to TCP as a
                 local send error; the segment is re-sent as new data and never
                 counted in RetransSegs, so it would not look like network loss.)
                 At most one rule per portal and direction: the drop shape with
                 the lowest `precedence` that has something for that portal wins
                 (offline beats loss).
  BlkioThrottle  MAJ:MIN IOPS in blkio.throttle.{read,write}_iops_device of the
                 root cgroup v1 blkio hierarchy for every LUN's loop device;
                 tgtd opens them O_DIRECT, so the page cache cannot hide it.

A new shape is a FaultShape subclass registered with @fault: its state key and
default, its subcommand(s), and either drop_match() (for IptablesDrops) or a
mechanism of its own (e.g. tc qdiscs on the veths) with apply()/clear().
"""

import os

from . import hosts, target
from .common import (ISCSI_PORT, NETNS, PORTALS, LabError, check_root_and_binaries,
                     log, ok, portal_list, run)
from .network import netns_exists
from .state import require_state, save_state

CHAIN = "KVMSLAB"
BLKIO_ROOT = "/sys/fs/cgroup/blkio"

NETWORK, TARGET = "network", "target"    # when `lab up` applies a mechanism

FAULTS = []          # registered shapes, in the order of their subcommands


def fault(cls):
    FAULTS.append(cls())
    return cls


def empty_faults():
    return {shape.key: shape.default() for shape in FAULTS}


def mechanisms():
    out = []
    for shape in FAULTS:
        if shape.mechanism not in out:
            out.append(shape.mechanism)
    return out


def apply_all(st, stage):
    """Make the kernel match st['faults'] for every mechanism of `stage`."""
    for m in mechanisms():
        if m.stage == stage:
            m.apply(st)


def clear_all(st, errors):
    """`lab down`: remove whatever every mechanism made (also without state)."""
    for m in mechanisms():
        m.clear(st, errors)


# --------------------------------------------------------------------------
# Mechanism: iptables drops in chain KVMSLAB
# --------------------------------------------------------------------------

def ipt(ns=None):
    """iptables command prefix for the host (ns None) or the storage namespace."""
    return (["ip", "netns", "exec", ns] if ns else []) + ["iptables", "-w"]


def drop_rules(faults):
    """The commands that fill the (flushed) chains for `faults`, in order:
    [(ns or None, argv), ...]. Pure."""
    shapes = sorted((s for s in FAULTS if s.mechanism is IPTABLES),
                    key=lambda s: s.precedence)
    out = []
    for idx, p in PORTALS.items():
        extra = next((m for m in (s.drop_match(faults, idx) for s in shapes)
                      if m is not None), None)
        if extra is None:
            continue
        addr = p["address"]
        out.append((None, ipt() + ["-A", CHAIN, "-i", p["host_if"], "-s", addr, "-p", "tcp",
                                   "--sport", str(ISCSI_PORT)] + extra + ["-j", "DROP"]))
        out.append((NETNS, ipt(NETNS) + ["-A", CHAIN, "-i", p["ns_if"], "-d", addr, "-p", "tcp",
                                         "--dport", str(ISCSI_PORT)] + extra + ["-j", "DROP"]))
    return out


class IptablesDrops:
    stage = NETWORK

    @staticmethod
    def chain_exists(ns=None):
        return ok(ipt(ns) + ["-S", CHAIN])

    def ensure_chain(self, ns=None):
        """Chain KVMSLAB, jumped to from INPUT first thing (host or namespace)."""
        if not self.chain_exists(ns):
            run(ipt(ns) + ["-N", CHAIN])
        if not ok(ipt(ns) + ["-C", "INPUT", "-j", CHAIN]):
            run(ipt(ns) + ["-I", "INPUT", "1", "-j", CHAIN])

    def apply(self, st):
        self.ensure_chain()
        self.ensure_chain(NETNS)
        run(ipt() + ["-F", CHAIN])
        run(ipt(NETNS) + ["-F", CHAIN])
        for _, cmd in drop_rules(st["faults"]):
            run(cmd)

    def clear(self, st, errors):
        self.remove_chain(errors)
        self.remove_chain(errors, NETNS)

    def remove_chain(self, errors, ns=None):
        if ns and not netns_exists():
            return
        for hook in ("INPUT", "OUTPUT"):
            while ok(ipt(ns) + ["-C", hook, "-j", CHAIN]):
                p = run(ipt(ns) + ["-D", hook, "-j", CHAIN], check=False)
                if p.returncode != 0:
                    errors.append(f"cannot remove jump {hook} -> {CHAIN}: {p.stderr.strip()}")
                    break
        if self.chain_exists(ns):
            log(f"removing iptables chain {CHAIN}" + (f" in {ns}" if ns else ""))
            run(ipt(ns) + ["-F", CHAIN], check=False)
            p = run(ipt(ns) + ["-X", CHAIN], check=False)
            if p.returncode != 0:
                errors.append(f"cannot delete chain {CHAIN}: {p.stderr.strip()}")


IPTABLES = IptablesDrops()


# --------------------------------------------------------------------------
# Mechanism: blkio throttle of the target's backing devices
# --------------------------------------------------------------------------

def blkio_files():
    return [os.path.join(BLKIO_ROOT, "blkio.throttle.read_iops_device"),
            os.path.join(BLKIO_ROOT, "blkio.throttle.write_iops_device")]


def blkio_available():
    return all(os.path.exists(f) for f in blkio_files())


def throttle_writes(majmins, iops):
    """[(file, line), ...] that set (iops) or clear (None/0) the rules. Pure."""
    return [(path, f"{mm} {int(iops or 0)}\n")
            for path in blkio_files() for mm in majmins]


def set_throttle(majmins, iops):
    """iops None/0 clears. Root blkio cgroup (cgroup v1) throttle rules."""
    if not blkio_available():
        raise LabError(f"cgroup v1 blkio throttling not available under {BLKIO_ROOT} "
                       f"(need blkio.throttle.*_iops_device)")
    for path, line in throttle_writes(majmins, iops):
        try:
            with open(path, "w") as f:
                f.write(line)
        except OSError as e:
            raise LabError(f"cannot write '{line.split()[0]} {iops}' to {path}: {e}")


def current_throttles():
    """{path: {majmin: iops}} for the blkio throttle files."""
    out = {}
    for path in blkio_files():
        rules = {}
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2:
                        rules[parts[0]] = int(parts[1])
        except OSError:
            pass
        out[path] = rules
    return out


class BlkioThrottle:
    stage = TARGET

    def apply(self, st):
        iops = st["faults"].get("throttle_iops")
        if iops:
            set_throttle([lun["loop_majmin"] for lun in hosts.recorded_luns(st)], iops)

    def clear(self, st, errors):
        """Clear the rules of every lab loop device (recorded and current)."""
        mms = {lun["loop_majmin"] for lun in hosts.recorded_luns(st) if lun.get("loop_majmin")}
        for d in target.lab_loops(hosts.recorded_luns(st)):
            try:
                mms.add(target.dev_majmin(d))
            except OSError:
                pass
        if mms and blkio_available():
            try:
                set_throttle(sorted(mms), 0)
            except LabError as e:
                errors.append(str(e))


BLKIO = BlkioThrottle()


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------

def add_portal_arg(p):
    p.add_argument("--portal", type=int, choices=sorted(PORTALS),
                   help="portal 1 or 2 (default: both)")


class FaultShape:
    """One fault shape: key/default in st['faults'], subcommand(s), mechanism."""
    key = ""
    mechanism = None
    precedence = 100        # IptablesDrops: lower wins on the same portal

    def default(self):
        raise NotImplementedError

    def add_parsers(self, sub):
        """Add this shape's subcommand(s); each sets func=callable(args)->rc."""
        raise NotImplementedError

    def drop_match(self, faults, idx):
        """IptablesDrops shapes: the iptables match list that selects the
        packets to drop on portal idx, or None when the shape is off there."""
        return None

    def commit(self, st):
        """Apply this shape's mechanism from st, then record st."""
        self.mechanism.apply(st)
        save_state(st)


def parse_pct(text):
    try:
        pct = float(text)
    except ValueError:
        raise LabError(f"PCT must be a number 0..100, got {text!r}")
    if not (0 <= pct <= 100):
        raise LabError(f"PCT must be between 0 and 100, got {text}")
    return pct


def parse_iops(text):
    """'off'/'0'/'none' -> None, a positive integer -> int."""
    val = text.strip().lower()
    if val in ("off", "0", "none"):
        return None
    try:
        iops = int(val)
    except ValueError:
        raise LabError(f"IOPS must be a positive integer or 'off', got {text!r}")
    if iops <= 0:
        raise LabError("IOPS must be > 0 (use 'off' to remove the throttle)")
    return iops


@fault
class PortalLoss(FaultShape):
    key = "loss_pct"
    mechanism = IPTABLES
    precedence = 10

    def default(self):
        return {str(i): 0.0 for i in PORTALS}

    def add_parsers(self, sub):
        p = sub.add_parser("loss", help="random packet loss on a portal's path",
                           epilog="examples: lab loss 5 --portal 1; lab loss 0")
        p.add_argument("pct", metavar="PCT", help="loss percentage 0..100 (0 clears)")
        add_portal_arg(p)
        p.set_defaults(func=self.run)

    def drop_match(self, faults, idx):
        pct = float(faults["loss_pct"].get(str(idx), 0) or 0)
        if pct <= 0:
            return None
        extra = [] if pct >= 100 else ["-m", "statistic", "--mode", "random",
                                        "--probability", f"{pct / 100.0:.6f}"]
        return extra + ["-m", "comment", "--comment", f"kvmslab portal {idx} loss {pct:g}%"]

    def run(self, args):
        check_root_and_binaries(["iptables"])
        pct = parse_pct(args.pct)
        st = require_state()
        for idx in portal_list(args.portal):
            st["faults"][self.key][str(idx)] = pct
        self.commit(st)
        log("packet loss now: " + ", ".join(
            f"portal {k} ({PORTALS[int(k)]['address']}) {v:g}%"
            for k, v in sorted(st["faults"][self.key].items())))
        return 0


@fault
class TargetThrottle(FaultShape):
    key = "throttle_iops"
    mechanism = BLKIO

    def default(self):
        return None

    def add_parsers(self, sub):
        p = sub.add_parser("throttle-target",
                           help="limit IOPS of the target's backing devices (no network fault)",
                           epilog="examples: lab throttle-target 20; lab throttle-target off")
        p.add_argument("iops", metavar="IOPS|off")
        p.set_defaults(func=self.run)

    def run(self, args):
        check_root_and_binaries([])
        st = require_state()
        iops = parse_iops(args.iops)
        luns = hosts.recorded_luns(st)
        if not luns:
            raise LabError("no target backing devices recorded; run `lab up`")
        set_throttle([lun["loop_majmin"] for lun in luns], iops)
        st["faults"][self.key] = iops
        save_state(st)
        if iops:
            log(f"target backing devices {', '.join(lun['loop'] for lun in luns)} "
                f"throttled to {iops} read IOPS + {iops} write IOPS each")
        else:
            log("target throttle removed")
        return 0


@fault
class PortalOffline(FaultShape):
    """The target stops answering on a portal: every packet of its iSCSI
    traffic dropped, both directions (TCP sessions stay, the initiator sees a
    dead path). Per portal, unlike tgtd's per-target offline state."""
    key = "offline_portals"
    mechanism = IPTABLES
    precedence = 0

    def default(self):
        return []

    def add_parsers(self, sub):
        for name, off in (("target-offline", True), ("target-online", False)):
            p = sub.add_parser(name, help=("target stops answering on a portal (all "
                                           "its iSCSI packets dropped)" if off else
                                           "undo target-offline"),
                               epilog=f"example: lab {name} --portal 1")
            add_portal_arg(p)
            p.set_defaults(func=lambda a, off=off: self.run(a, off))

    def drop_match(self, faults, idx):
        if idx in faults["offline_portals"]:
            return ["-m", "comment", "--comment", f"kvmslab portal {idx} offline"]
        return None

    def run(self, args, offline):
        check_root_and_binaries(["iptables"])
        st = require_state()
        cur = set(st["faults"][self.key])
        for idx in portal_list(args.portal):
            if offline:
                cur.add(idx)
            else:
                cur.discard(idx)
        st["faults"][self.key] = sorted(cur)
        self.commit(st)
        log("offline portals: " + (", ".join(
            f"{i} ({PORTALS[i]['address']})" for i in sorted(cur)) or "none"))
        return 0
