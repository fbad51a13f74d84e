"""The `lab` command line: argument parsing, `up`, `down`, `status`, and the
one place where a LabError becomes `lab <cmd>: error: ...` and exit 1.
The fault subcommands come from the fault shapes (faults.FAULTS), the options
of `up` from the host kinds (hosts.host_kinds())."""

import argparse
import json
import os
import shutil
import sys
import time

from . import __doc__ as PACKAGE_DOC
from . import common, faults, hosts, network, target
from .common import LabError, check_root_and_binaries, log, require_root
from .state import empty_state, load_state, save_state
from .status import collect_status, render_text

EPILOG = """\
examples:
  lab up                       # storage namespace, tgtd, 2 VMs, wait for I/O
  lab up --vms 4 --timeout 300
  lab status                   # human summary (samples disk stats for 2 s)
  lab status --json            # stable JSON, schema in deploy/lab/README.md
  lab loss 5 --portal 1        # 5% random drop on portal 1 (198.18.1.2:3260)
  lab loss 0                   # clear loss on both portals
  lab throttle-target 20       # target's backing loop devices: 20 r + 20 w IOPS
  lab throttle-target off
  lab loss 5 --portal 2 --direction to-host   # only target -> host packets dropped
  lab throttle-target 30 --vm kvmslab-vm0     # one LUN only
  lab target-offline --portal 2   # drop all traffic of portal 2
  lab target-online               # all portals answer again
  lab shape 2mbit --portal 1      # portal 1's link: 2 Mbit/s, deep queue (RTT grows)
  lab shape off
  lab flap --portal 1 --down 10 --up 5 --count 3   # three 10 s outages (foreground)
  lab down                     # remove everything the lab made

environment:
  KVMSCOPE_LAB_DIR  lab state dir (default /var/tmp/kvmscope-lab)
"""


def cmd_up(args):
    check_root_and_binaries()
    kinds = hosts.host_kinds()
    for kind in kinds:
        kind.validate(args)
    st = load_state()
    for kind in kinds:
        kind.check_against(st, args)
    args.building = True
    os.makedirs(common.LAB_DIR, exist_ok=True)
    os.chmod(common.LAB_DIR, 0o755)
    if st is None:
        st = empty_state(faults.empty_faults())
        save_state(st)
    t0 = time.monotonic()

    network.ensure_network()
    faults.apply_all(st, faults.NETWORK)
    target.ensure_tgtd(st)
    for kind in kinds:
        kind.provision(st, args)
    faults.apply_all(st, faults.TARGET)
    for kind in kinds:
        kind.start(st, args)
    st["up_seconds"] = round(time.monotonic() - t0, 1)
    save_state(st)
    log(f"lab is up: {', '.join(s for s in (k.summary(st) for k in kinds) if s)}, ready in "
        f"{st['up_seconds']}s (lab dir {common.LAB_DIR})")
    return 0


def cmd_down(args):
    require_root()
    try:
        st = load_state()
    except LabError as e:
        log(f"warning: {e}; cleaning up by name")
        st = None
    errors = []
    for kind in hosts.host_kinds():
        kind.remove(st, errors)
    faults.clear_all(st, errors)
    loops = target.lab_loops(hosts.recorded_luns(st))
    target.stop_tgtd(st, errors)
    target.detach_loops(loops, errors)
    network.remove_network(errors)
    if os.path.isdir(common.LAB_DIR):
        log(f"removing {common.LAB_DIR}")
        shutil.rmtree(common.LAB_DIR, ignore_errors=True)
        if os.path.exists(common.LAB_DIR):
            errors.append(f"cannot remove {common.LAB_DIR}")
    if errors:
        raise LabError("down finished with errors:\n  " + "\n  ".join(errors))
    log("lab is down")
    return 0


def cmd_status(args):
    require_root()
    res = collect_status(args.interval)
    if args.json:
        json.dump(res, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(res))
    return 0


def build_parser():
    ap = argparse.ArgumentParser(
        prog="lab", description=PACKAGE_DOC.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("up", help="build the lab and wait until VM disk I/O flows",
                       epilog="example: lab up --vms 2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for kind in hosts.host_kinds():
        kind.add_up_arguments(p)
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds to wait for every VM's vda+vdb I/O (default 300)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="remove everything the lab made (safe when down)")
    p.set_defaults(func=cmd_down)

    for shape in faults.FAULTS:
        shape.add_parsers(sub)
    for kind in hosts.host_kinds():
        kind.add_parsers(sub)

    p = sub.add_parser("status", help="VMs, disks, backends, load, faults in force")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--interval", type=float, default=2.0,
                   help="seconds between the two disk-stat samples (default 2)")
    p.set_defaults(func=cmd_status)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LabError as e:
        print(f"lab {args.cmd}: error: {e}", file=sys.stderr)
        if args.cmd == "up" and getattr(args, "building", False):
            print("lab up: the partial lab is left for inspection; "
                  "`lab down` removes it", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lab {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `lab status --json | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
