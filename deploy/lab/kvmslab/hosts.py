"""Kinds of host the lab runs on its iSCSI target.

A host kind owns its records in the state (under `state_key`), the LUNs it
asks the target for, how its hosts are started and removed, and their part
of `lab status`. Today there is one kind, LibvirtVMs (deploy/lab/kvmslab/vms.py:
QEMU's libiscsi in libvirt VMs on the host). A kernel-initiator host (open-iscsi
+ dm-multipath in a QEMU guest) is a second subclass added to host_kinds();
`lab up`, `lab down`, `lab status` and the faults pick it up from there.
"""

from .vms import LIBVIRT_VMS


def host_kinds():
    """Every kind of host, in the order `lab up` provisions and starts them."""
    return [LIBVIRT_VMS]


def recorded_luns(st):
    """Every LUN recorded in the state, across host kinds."""
    return [lun for kind in host_kinds() for lun in kind.luns(st)]
