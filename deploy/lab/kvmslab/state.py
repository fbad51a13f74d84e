"""LAB_DIR/state.json: what the lab made, so that separate invocations agree.

Written atomically (tmp + rename) after every step that creates something, so
a failed `lab up` leaves a state that `lab down` can undo. Faults live here
too ("faults", the keys of every fault shape; keys of shapes newer than the
file are filled in by faults.fill_defaults()): the fault mechanisms always rebuild
the kernel's rules from this record, never edit them incrementally.
"""

import contextlib
import fcntl
import json
import os
import time

from . import common
from .common import LabError

STATE_FILE = "state.json"
STATE_VERSION = 1


def empty_state(fault_defaults=None):
    """A new lab's state; fault_defaults is faults.empty_faults() (this module
    sits below faults, so the caller passes the shapes' defaults in)."""
    return {
        "version": STATE_VERSION,
        "created": time.time(),
        "lab_dir": common.LAB_DIR,
        "vm_count": 0,
        "vms": [],
        "tgtd_pid": None,
        "started_libvirtd": False,
        "started_virtlogd": False,
        "kernel": None,
        "faults": dict(fault_defaults or {}),
    }


def load_state():
    path = common.lab_path(STATE_FILE)
    try:
        with open(path) as f:
            st = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"cannot read lab state {path}: {e} "
                       f"(run `lab down` to clean up)")
    return st


def save_state(st):
    os.makedirs(common.LAB_DIR, exist_ok=True)
    path = common.lab_path(STATE_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(st, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def state_lock():
    """Exclusive hold of the state for a read-modify-write (two `lab flap` processes on two portals at
    once each load, change and save it: without the lock one's change is lost, and with it the drop
    rules it rebuilds)."""
    os.makedirs(common.LAB_DIR, exist_ok=True)
    with open(common.lab_path("state.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def require_state():
    st = load_state()
    if st is None:
        raise LabError(f"the lab is not up (no state in {common.LAB_DIR}); "
                       f"run `lab up` first")
    return st
