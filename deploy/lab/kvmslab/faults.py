"""Faults: each fault shape is one class in FAULTS; each is applied by a
mechanism that rebuilds the kernel's rules from st["faults"] as a whole.

Shapes (key in st["faults"] -> subcommands -> mechanism):
  loss_pct, loss_direction  `lab loss PCT [--portal N] [--direction D]`  iptables drops (statistic)
  throttle_iops,            `lab throttle-target IOPS|off [--vm V|--lun L]`  blkio throttle
    throttle_iops_by_lun
  offline_portals           `lab target-offline/online [--portal N]`   iptables drops (all)
  shape_rate_kbit           `lab shape RATE|off [--portal N]`          tc tbf on both veth ends
  flaps                     `lab flap --portal N --down S [--up S --count K]`  iptables drops (all),
                            timed, each down period recorded with its start and end

Mechanisms:
  IptablesDrops  chain KVMSLAB, jumped to first thing from INPUT (and FORWARD,
                 for the routed kernel-initiator host) on the host and from
                 INPUT inside the storage namespace. Each direction is dropped at
                 the *receiving* end of its veth link, so both TCP stacks see
                 real in-flight loss and retransmit:
                   to-host   (target -> host, sport 3260): host INPUT
                   to-target (host -> target, dport 3260): namespace INPUT
                 (A drop in the sender's own OUTPUT hook is reported to TCP as a
                 local send error; the segment is re-sent as new data and never
                 counted in RetransSegs, so it would not look like network loss.)
                 At most one rule per portal and direction: the drop shape with
                 the lowest `precedence` that has something for that portal and
                 direction wins (offline beats a flap beats loss).
  BlkioThrottle  MAJ:MIN IOPS in blkio.throttle.{read,write}_iops_device of the
                 root cgroup v1 blkio hierarchy for every LUN's loop device
                 (one LUN's own setting beats the setting for all); tgtd opens
                 them O_DIRECT, so the page cache cannot hide it.
  TcShaper       a token bucket (tc tbf) as the root qdisc of both ends of a
                 portal's veth link (host kvmslab-hN egress = host -> target,
                 namespace kvmslab-nN egress = target -> host), with a queue of
                 up to 2 s of traffic: packets wait instead of being dropped, so
                 the RTT grows with no random loss (this kernel has no netem
                 and no police action).

A new shape is a FaultShape subclass registered with @fault: its state key and
default, its subcommand(s), and either drop_match() (for IptablesDrops) or a
mechanism of its own with apply()/clear().
"""

import argparse
import os
import re
import signal
import time

from . import hosts, target
from .common import (ISCSI_PORT, NETNS, PORTALS, LabError, check_root_and_binaries,
                     log, ok, portal_list, run)
from .network import link_exists, netns_exists
from .state import require_state, save_state, state_lock

CHAIN = "KVMSLAB"
BLKIO_ROOT = "/sys/fs/cgroup/blkio"

NETWORK, TARGET = "network", "target"    # when `lab up` applies a mechanism
TO_HOST, TO_TARGET, BOTH = "to-host", "to-target", "both"   # directions on a portal
DIRECTIONS = (TO_HOST, TO_TARGET)

FAULTS = []          # registered shapes, in the order of their subcommands


def fault(cls):
    FAULTS.append(cls())
    return cls


def empty_faults():
    out = {}
    for shape in FAULTS:
        out.update(shape.defaults())
    return out


def fill_defaults(fault_state):
    """Add the keys of shapes newer than the state file (in place); returns it."""
    for key, value in empty_faults().items():
        fault_state.setdefault(key, value)
    return fault_state


def load_faults_state():
    """The lab's state (it must be up) with every shape's key present."""
    st = require_state()
    fill_defaults(st.setdefault("faults", {}))
    return st


def mechanisms():
    out = []
    for shape in FAULTS:
        if shape.mechanism not in out:
            out.append(shape.mechanism)
    return out


def apply_all(st, stage):
    """Make the kernel match st['faults'] for every mechanism of `stage`."""
    fill_defaults(st.setdefault("faults", {}))
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
    [(ns or None, argv), ...]. Pure. Per portal and direction, the shape with
    the lowest precedence that drops something there wins."""
    shapes = sorted((s for s in FAULTS if s.mechanism is IPTABLES),
                    key=lambda s: s.precedence)
    out = []
    for idx, p in PORTALS.items():
        addr = p["address"]
        for direction in DIRECTIONS:
            extra = next((m for m in (s.drop_match(faults, idx, direction) for s in shapes)
                          if m is not None), None)
            if extra is None:
                continue
            if direction == TO_HOST:
                out.append((None, ipt() + ["-A", CHAIN, "-i", p["host_if"], "-s", addr,
                                           "-p", "tcp", "--sport", str(ISCSI_PORT)]
                            + extra + ["-j", "DROP"]))
            else:
                out.append((NETNS, ipt(NETNS) + ["-A", CHAIN, "-i", p["ns_if"], "-d", addr,
                                                 "-p", "tcp", "--dport", str(ISCSI_PORT)]
                            + extra + ["-j", "DROP"]))
    return out


# hooks that jump to KVMSLAB: {in the namespace?: hooks}
JUMP_HOOKS = {False: ("INPUT", "FORWARD"), True: ("INPUT",)}


class IptablesDrops:
    stage = NETWORK

    @staticmethod
    def chain_exists(ns=None):
        return ok(ipt(ns) + ["-S", CHAIN])

    def ensure_chain(self, ns=None):
        """Chain KVMSLAB, jumped to first thing from INPUT (host or namespace)
        and, on the host, from FORWARD too: the kernel-initiator host's
        segments are routed by the host (kernelhost.py), so a to-host drop
        (`-i kvmslab-hN -s PORTAL --sport 3260`) must also catch what is
        forwarded from the veth to its tap."""
        if not self.chain_exists(ns):
            run(ipt(ns) + ["-N", CHAIN])
        for hook in JUMP_HOOKS[bool(ns)]:
            if not ok(ipt(ns) + ["-C", hook, "-j", CHAIN]):
                run(ipt(ns) + ["-I", hook, "1", "-j", CHAIN])

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
        for hook in ("INPUT", "FORWARD", "OUTPUT"):
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


def throttle_plan(faults, luns):
    """{MAJ:MIN: iops} for every recorded LUN: its own setting (by IQN) beats
    the setting for all; 0 = no rule. Pure."""
    per_lun = faults.get("throttle_iops_by_lun") or {}
    every = faults.get("throttle_iops") or 0
    return {lun["loop_majmin"]: int(per_lun.get(lun["iqn"], every) or 0)
            for lun in luns if lun.get("loop_majmin")}


class BlkioThrottle:
    stage = TARGET

    def apply(self, st):
        plan = throttle_plan(st["faults"], hosts.recorded_luns(st))
        if not any(plan.values()) and not blkio_available():
            return                      # nothing to throttle, nothing to clear
        for iops in sorted(set(plan.values())):
            set_throttle(sorted(mm for mm, v in plan.items() if v == iops), iops)

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
# Mechanism: tc token bucket on both ends of a portal's veth link
# --------------------------------------------------------------------------

QUEUE_SECONDS = 2            # tbf queue depth, in seconds of traffic at the rate
MIN_LIMIT = 64 * 1024        # bytes
MAX_LIMIT = 16 * 1024 * 1024
MIN_BURST = 1600             # one full Ethernet frame (MTU 1500 + header) and a bit


def tc(ns=None):
    """tc command prefix for the host (ns None) or the storage namespace."""
    return ["tc"] + (["-n", ns] if ns else [])


def tbf_params(rate_kbit):
    """(burst, limit) in bytes for a rate: a bucket of ~2 ms of traffic (at
    least one frame, so a short request is not sent in one go after an idle
    spell) and a queue of QUEUE_SECONDS of traffic (packets wait rather than
    drop). Pure."""
    bytes_per_s = rate_kbit * 1000 // 8
    burst = max(MIN_BURST, bytes_per_s * 2 // 1000)
    limit = min(MAX_LIMIT, max(MIN_LIMIT, bytes_per_s * QUEUE_SECONDS))
    return burst, limit


def link_ends(idx):
    """[(ns or None, ifname)] of portal idx: host end then namespace end."""
    p = PORTALS[idx]
    return [(None, p["host_if"]), (NETNS, p["ns_if"])]


def shape_cmds(faults):
    """The `tc qdisc replace` commands for every shaped portal: [(ns, argv)].
    Portals without a rate are not listed (see unshape_cmd). Pure."""
    out = []
    for idx in PORTALS:
        rate = (faults.get("shape_rate_kbit") or {}).get(str(idx))
        if not rate:
            continue
        burst, limit = tbf_params(rate)
        for ns, dev in link_ends(idx):
            out.append((ns, tc(ns) + ["qdisc", "replace", "dev", dev, "root", "tbf",
                                      "rate", f"{int(rate)}kbit", "burst", str(burst),
                                      "limit", str(limit)]))
    return out


def unshape_cmd(ns, dev):
    return tc(ns) + ["qdisc", "del", "dev", dev, "root"]


def has_tbf(qdisc_show):
    """`tc qdisc show dev X` output -> a tbf is the root qdisc. Pure."""
    return re.search(r"^qdisc tbf \S+ root", qdisc_show or "", re.M) is not None


def root_tbf(ns, dev):
    p = run(tc(ns) + ["qdisc", "show", "dev", dev], check=False)
    return p.returncode == 0 and has_tbf(p.stdout)


class TcShaper:
    stage = NETWORK

    def apply(self, st):
        cmds = shape_cmds(st["faults"])
        shaped = {(ns, argv[argv.index("dev") + 1]) for ns, argv in cmds}
        for idx in PORTALS:
            for ns, dev in link_ends(idx):
                if (ns, dev) not in shaped and link_exists(dev, ns) and root_tbf(ns, dev):
                    run(unshape_cmd(ns, dev))
        for _, cmd in cmds:
            run(cmd)

    def clear(self, st, errors):
        for idx in PORTALS:
            for ns, dev in link_ends(idx):
                if ns and not netns_exists():
                    continue
                if link_exists(dev, ns) and root_tbf(ns, dev):
                    log(f"removing tc tbf on {dev}" + (f" in {ns}" if ns else ""))
                    p = run(unshape_cmd(ns, dev), check=False)
                    if p.returncode != 0:
                        errors.append(f"cannot remove tbf on {dev}: {p.stderr.strip()}")


TC = TcShaper()


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------

def add_portal_arg(p, required=False):
    p.add_argument("--portal", type=int, choices=sorted(PORTALS), required=required,
                   help="portal 1 or 2" + ("" if required else " (default: both)"))


def iso(ts):
    """Epoch seconds -> '2026-11-29T03:10:01.234Z'."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class FaultShape:
    """One fault shape: key/default in st['faults'], subcommand(s), mechanism."""
    key = ""
    mechanism = None
    precedence = 100        # IptablesDrops: lower wins on the same portal and direction

    def default(self):
        raise NotImplementedError

    def defaults(self):
        """Every key this shape keeps in st['faults'] with its default (the
        main key, plus any companion key, e.g. the direction of a loss)."""
        return {self.key: self.default()}

    def add_parsers(self, sub):
        """Add this shape's subcommand(s); each sets func=callable(args)->rc."""
        raise NotImplementedError

    def drop_match(self, faults, idx, direction):
        """IptablesDrops shapes: the iptables match list that selects the
        packets to drop on portal idx in `direction` (TO_HOST or TO_TARGET),
        or None when the shape is off there."""
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


RATE_UNITS = {"kbit": 1, "mbit": 1000, "gbit": 1000 * 1000}
MIN_RATE_KBIT, MAX_RATE_KBIT = 64, 10 * 1000 * 1000


def parse_rate(text):
    """'2mbit' / '500kbit' / '1.5mbit' / '1gbit' -> kbit/s (int); 'off'/'0' -> None."""
    val = text.strip().lower()
    if val in ("off", "0", "none"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(kbit|mbit|gbit)", val)
    if not m:
        raise LabError(f"RATE must be a number with a unit kbit, mbit or gbit "
                       f"(e.g. 2mbit) or 'off', got {text!r}")
    kbit = int(round(float(m.group(1)) * RATE_UNITS[m.group(2)]))
    if not (MIN_RATE_KBIT <= kbit <= MAX_RATE_KBIT):
        raise LabError(f"RATE must be between {MIN_RATE_KBIT}kbit and 10gbit, got {text}")
    return kbit


def fmt_rate(kbit):
    if kbit % 1000000 == 0:
        return f"{kbit // 1000000}gbit"
    if kbit % 1000 == 0:
        return f"{kbit // 1000}mbit"
    return f"{kbit}kbit"


@fault
class PortalLoss(FaultShape):
    """Random loss on a portal, in one direction or both (dropped at the
    receiving end of each direction)."""
    key = "loss_pct"
    mechanism = IPTABLES
    precedence = 10

    def default(self):
        return {str(i): 0.0 for i in PORTALS}

    def defaults(self):
        return {self.key: self.default(), "loss_direction": {str(i): BOTH for i in PORTALS}}

    def add_parsers(self, sub):
        p = sub.add_parser(
            "loss", help="random packet loss on a portal's path (one direction or both)",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n"
                   "  lab loss 5 --portal 1                      # both directions\n"
                   "  lab loss 5 --portal 2 --direction to-host  # target -> host only: "
                   "the target retransmits\n"
                   "  lab loss 2 --direction to-target           # host -> target, both portals\n"
                   "  lab loss 0                                 # clear everywhere")
        p.add_argument("pct", metavar="PCT", help="loss percentage 0..100 (0 clears)")
        add_portal_arg(p)
        p.add_argument("--direction", choices=(TO_HOST, TO_TARGET, BOTH), default=BOTH,
                       help="to-host: packets from the target to the host are dropped "
                            "(host INPUT); to-target: packets from the host to the target "
                            "(namespace INPUT); default both")
        p.set_defaults(func=self.run)

    def drop_match(self, faults, idx, direction):
        pct = float(faults["loss_pct"].get(str(idx), 0) or 0)
        if pct <= 0:
            return None
        way = (faults.get("loss_direction") or {}).get(str(idx), BOTH)
        if way not in (BOTH, direction):
            return None
        extra = [] if pct >= 100 else ["-m", "statistic", "--mode", "random",
                                        "--probability", f"{pct / 100.0:.6f}"]
        label = f"kvmslab portal {idx} loss {pct:g}%" + ("" if way == BOTH else f" {way}")
        return extra + ["-m", "comment", "--comment", label]

    def run(self, args):
        check_root_and_binaries(["iptables"])
        pct = parse_pct(args.pct)
        st = load_faults_state()
        f = st["faults"]
        for idx in portal_list(args.portal):
            f[self.key][str(idx)] = pct
            f["loss_direction"][str(idx)] = args.direction if pct > 0 else BOTH
        self.commit(st)
        log("packet loss now: " + ", ".join(
            f"portal {k} ({PORTALS[int(k)]['address']}) {v:g}%"
            + ("" if f["loss_direction"][k] == BOTH or not v else f" {f['loss_direction'][k]}")
            for k, v in sorted(f[self.key].items())))
        return 0


def resolve_luns(st, vm=None, lun=None):
    """--vm NAME|INDEX or --lun IQN|TID|/dev/loopN -> the LUN records; neither
    -> every LUN."""
    luns = hosts.recorded_luns(st)
    if vm is None and lun is None:
        return luns
    if vm is not None:
        hits = [x for x in luns if vm in (x.get("name"), str(x.get("index")))]
        what = f"--vm {vm}"
    else:
        hits = [x for x in luns if lun in (x.get("iqn"), str(x.get("tid")), x.get("loop"))]
        what = f"--lun {lun}"
    if not hits:
        known = ", ".join(f"{x.get('name')} ({x.get('iqn')}, tid {x.get('tid')}, {x.get('loop')})"
                          for x in luns) or "none"
        raise LabError(f"{what}: no such LUN in the lab (LUNs: {known})")
    return hits


@fault
class TargetThrottle(FaultShape):
    """IOPS limit of the target's backing devices: every LUN, or one LUN
    (--vm/--lun; its own setting beats the setting for all)."""
    key = "throttle_iops"
    mechanism = BLKIO

    def default(self):
        return None

    def defaults(self):
        # one LUN's own limit, {IQN: iops}, set with --vm/--lun
        return {self.key: None, "throttle_iops_by_lun": {}}

    def add_parsers(self, sub):
        p = sub.add_parser(
            "throttle-target",
            help="limit IOPS of the target's backing devices: all, or one LUN (no network fault)",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n"
                   "  lab throttle-target 20                    # every LUN: 20 r + 20 w IOPS\n"
                   "  lab throttle-target 30 --vm kvmslab-vm0   # only vm0's LUN\n"
                   "  lab throttle-target 30 --lun 2            # only target tid 2's LUN\n"
                   "  lab throttle-target off --vm kvmslab-vm0  # that LUN back to the setting for all\n"
                   "  lab throttle-target off                   # no throttle anywhere")
        p.add_argument("iops", metavar="IOPS|off")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--vm", metavar="NAME", help="only the LUN of this VM (name or index)")
        g.add_argument("--lun", metavar="IQN|TID|/dev/loopN", help="only this LUN")
        p.set_defaults(func=self.run)

    def run(self, args):
        check_root_and_binaries([])
        st = load_faults_state()
        iops = parse_iops(args.iops)
        if not hosts.recorded_luns(st):
            raise LabError("no target backing devices recorded; run `lab up`")
        f = st["faults"]
        if args.vm is None and args.lun is None:
            f[self.key] = iops
            f["throttle_iops_by_lun"] = {}          # one setting for all again
            chosen = hosts.recorded_luns(st)
        else:
            chosen = resolve_luns(st, args.vm, args.lun)
            for lun in chosen:
                if iops:
                    f["throttle_iops_by_lun"][lun["iqn"]] = iops
                else:
                    f["throttle_iops_by_lun"].pop(lun["iqn"], None)
        self.commit(st)
        plan = throttle_plan(f, hosts.recorded_luns(st))
        for lun in chosen:
            v = plan.get(lun["loop_majmin"], 0)
            log(f"{lun.get('name', lun['iqn'])} LUN ({lun['loop']}): "
                + (f"throttled to {v} read IOPS + {v} write IOPS" if v else "not throttled"))
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
                                           "undo target-offline (and a flap's down period)"),
                               epilog=f"example: lab {name} --portal 1")
            add_portal_arg(p)
            p.set_defaults(func=lambda a, off=off: self.run(a, off))

    def drop_match(self, faults, idx, direction):
        if idx in faults["offline_portals"]:
            return ["-m", "comment", "--comment", f"kvmslab portal {idx} offline"]
        return None

    def run(self, args, offline):
        check_root_and_binaries(["iptables"])
        st = load_faults_state()
        cur = set(st["faults"][self.key])
        for idx in portal_list(args.portal):
            if offline:
                cur.add(idx)
            else:
                cur.discard(idx)
                # a flap killed in its down period would leave the portal down
                down = st["faults"]["flaps"]["down"]
                st["faults"]["flaps"]["down"] = [i for i in down if i != idx]
        st["faults"][self.key] = sorted(cur)
        self.commit(st)
        log("offline portals: " + (", ".join(
            f"{i} ({PORTALS[i]['address']})" for i in sorted(cur)) or "none"))
        return 0


@fault
class LinkShape(FaultShape):
    """A rate-limited link with a deep queue on one portal (both directions):
    queueing delay, no random loss."""
    key = "shape_rate_kbit"
    mechanism = TC

    def default(self):
        return {str(i): None for i in PORTALS}

    def add_parsers(self, sub):
        p = sub.add_parser(
            "shape", help="rate-limit a portal's link with a deep queue (RTT grows, no loss)",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description="A token bucket (tc tbf) on the egress of both ends of the "
                        "portal's veth link, queueing up to 2 s of traffic: packets wait "
                        "instead of being dropped, so the connections' RTT grows without "
                        "random loss.",
            epilog="examples:\n"
                   "  lab shape 2mbit --portal 1    # portal 1: 2 Mbit/s each way\n"
                   "  lab shape 500kbit             # both portals\n"
                   "  lab shape off --portal 1\n"
                   "  lab shape off                 # no shaping anywhere")
        p.add_argument("rate", metavar="RATE|off",
                       help="kbit, mbit or gbit per second (64kbit..10gbit), or off")
        add_portal_arg(p)
        p.set_defaults(func=self.run)

    def run(self, args):
        check_root_and_binaries(["tc"])
        rate = parse_rate(args.rate)
        st = load_faults_state()
        for idx in portal_list(args.portal):
            st["faults"][self.key][str(idx)] = rate
        self.commit(st)
        log("link shaping now: " + ", ".join(
            f"portal {k} ({PORTALS[int(k)]['address']}) "
            + (fmt_rate(v) + " each way" if v else "off")
            for k, v in sorted(st["faults"][self.key].items())))
        return 0


MAX_FLAP_PERIODS = 100          # periods kept in the state (oldest dropped)


def now():
    return time.time()


def sleep(seconds):
    time.sleep(seconds)


@fault
class PortalFlap(FaultShape):
    """Short outages of a portal: offline for --down seconds, back for --up
    seconds, --count times, in the foreground. Each down period is recorded
    in st['faults']['flaps']['periods'] with the wall-clock times at which the
    drop rules were in place and removed (start/end, epoch seconds and ISO)."""
    key = "flaps"
    mechanism = IPTABLES
    precedence = 1

    def default(self):
        return {"down": [], "periods": []}

    def add_parsers(self, sub):
        p = sub.add_parser(
            "flap", help="portal goes offline for SECONDS then comes back, K times (foreground)",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description="Each down period drops every packet of the portal's iSCSI traffic "
                        "(both directions, like target-offline) and is recorded with its "
                        "start and end in `lab status --json` (faults.flaps.periods). "
                        "Interrupted (Ctrl-C, SIGTERM), the portal comes back first.",
            epilog="examples:\n"
                   "  lab flap --portal 1 --down 10                       # one 10 s outage\n"
                   "  lab flap --portal 2 --down 3 --up 7 --count 5       # 5 outages of 3 s")
        add_portal_arg(p, required=True)
        p.add_argument("--down", type=float, required=True, metavar="SECONDS",
                       help="length of each outage")
        p.add_argument("--up", type=float, default=5.0, metavar="SECONDS",
                       help="time back up between outages (default 5)")
        p.add_argument("--count", type=int, default=1, metavar="K",
                       help="number of outages (default 1)")
        p.set_defaults(func=self.run)

    def drop_match(self, faults, idx, direction):
        if idx in faults["flaps"]["down"]:
            return ["-m", "comment", "--comment", f"kvmslab portal {idx} flap down"]
        return None

    @staticmethod
    def validate(args):
        if not (0 < args.down <= 3600):
            raise LabError(f"--down must be > 0 and <= 3600 seconds, got {args.down:g}")
        if not (0 <= args.up <= 3600):
            raise LabError(f"--up must be between 0 and 3600 seconds, got {args.up:g}")
        if not (1 <= args.count <= 1000):
            raise LabError(f"--count must be between 1 and 1000, got {args.count}")

    def set_down(self, idx, down, period):
        """Portal idx down (True) or up, recorded with `period` (a dict updated
        in place: start or end) in a fresh copy of the state."""
        with state_lock():  # other flaps (another portal) change the same state meanwhile
            st = load_faults_state()
            fl = st["faults"][self.key]
            cur = set(fl["down"])
            (cur.add if down else cur.discard)(idx)
            fl["down"] = sorted(cur)
            self.mechanism.apply(st)
            t = now()
            if down:
                period.update(start=round(t, 3), start_iso=iso(t))
            else:
                period.update(end=round(t, 3), end_iso=iso(t),
                              seconds=round(t - period["start"], 3))
            fl["periods"] = [p for p in fl["periods"] if p.get("id") != period["id"]] + [dict(period)]
            fl["periods"] = fl["periods"][-MAX_FLAP_PERIODS:]
            save_state(st)
        return t

    def run(self, args):
        check_root_and_binaries(["iptables"])
        self.validate(args)
        idx = args.portal
        load_faults_state()                         # the lab must be up
        addr = PORTALS[idx]["address"]
        prev = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
        try:
            for k in range(1, args.count + 1):
                period = {"id": f"{idx}-{now():.6f}", "portal": idx, "n": k,
                          "count": args.count, "start": None, "start_iso": None,
                          "end": None, "end_iso": None, "seconds": None}
                try:
                    t0 = self.set_down(idx, True, period)
                    log(f"flap {k}/{args.count}: portal {idx} ({addr}) DOWN at "
                        f"{period['start_iso']} for {args.down:g}s")
                    sleep(max(0.0, t0 + args.down - now()))
                finally:
                    if period["start"] is not None:
                        self.set_down(idx, False, period)
                        log(f"flap {k}/{args.count}: portal {idx} ({addr}) UP at "
                            f"{period['end_iso']} (down {period['seconds']:.2f}s)")
                if k < args.count:
                    sleep(args.up)
        finally:
            signal.signal(signal.SIGTERM, prev)
        return 0


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt
