"""Kinds of host the lab runs on its iSCSI target.

A host kind owns its records in the state (under `state_key`), the LUNs it
asks the target for, how its hosts are started and removed, and their part
of `lab status`. Today there is one kind, LibvirtVMs (deploy/lab/kvmslab/vms.py:
QEMU's libiscsi in libvirt VMs on the host). A kernel-initiator host (open-iscsi
+ dm-multipath in a QEMU guest) is a second subclass registered in HOST_KINDS;
`lab up`, `lab down`, `lab status` and the faults pick it up from there.
"""


class HostKind:
    name = ""            # short name, e.g. "vm"
    state_key = ""       # its list of records in state.json and status --json

    def add_up_arguments(self, parser):
        """Options of `lab up` for this kind."""

    def validate(self, args):
        """Check this kind's `lab up` options (before the state is read)."""

    def check_against(self, st, args):
        """Refuse a `lab up` that does not fit the lab already recorded."""

    def provision(self, st, args):
        """Before the hosts start: images, LUN backing files, targets. Records
        each LUN in the state (lun_file, loop, loop_majmin, tid, iqn)."""

    def start(self, st, args):
        """Start the hosts and wait until their I/O flows."""

    def summary(self, st):
        """For `lab is up: ...`."""
        return ""

    def luns(self, st):
        """The LUN records this kind made (for throttles and `lab down`)."""
        return []

    def remove(self, st, errors):
        """`lab down`: everything this kind made, also when st is None."""

    def status(self, st, interval):
        """(records for status --json under state_key, all of them up)."""
        return [], True


def host_kinds():
    from .vms import LIBVIRT_VMS
    return [LIBVIRT_VMS]


def recorded_luns(st):
    """Every LUN recorded in the state, across host kinds."""
    return [lun for kind in host_kinds() for lun in kind.luns(st)]
