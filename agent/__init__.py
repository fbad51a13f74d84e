"""kvmscope: why is this VM's iSCSI disk slow?

A host agent for KVM (libvirt/QEMU) hosts whose VM disks live on iSCSI LUNs.
It collects iSCSI session, TCP and per-VM disk statistics, joins them into
storage paths and exports them to Prometheus and Elasticsearch.
"""

__version__ = "0.1.0"
