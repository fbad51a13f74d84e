"""Kinds of host the lab runs on its iSCSI target.

A host kind owns its records in the state (under `state_key`), the LUNs it
asks the target for, how its hosts are started and removed, and their part
of `lab status`. Today there is one kind, LibvirtVMs (deploy/lab/kvmslab/vms.py:
QEMU's libiscsi in libvirt VMs on the host) and KernelHost
(deploy/lab/kvmslab/kernelhost.py: open-iscsi + dm-multipath in a QEMU guest,
`lab up --kernel-host`); `lab up`, `lab down`, `lab status` and the faults
pick them up from host_kinds().
"""

from .kernelhost import KERNEL_HOST
from .vms import LIBVIRT_VMS


def host_kinds():
    """Every kind of host, in the order `lab up` provisions and starts them."""
    return [LIBVIRT_VMS, KERNEL_HOST]


def recorded_luns(st):
    """Every LUN recorded in the state, across host kinds."""
    return [lun for kind in host_kinds() for lun in kind.luns(st)]
