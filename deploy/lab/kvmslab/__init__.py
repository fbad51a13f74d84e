"""kvmscope test lab: KVM-style VMs whose disks are iSCSI LUNs, with faults.

Builds, on one Linux machine (root needed):
  * a "storage host" network namespace (kvmslab-stor) joined to the host by
    two veth links (two iSCSI paths, addresses from 198.18.0.0/15 only),
  * tgtd running inside it, with one portal per link and one target/LUN per VM
    whose backing store is a loop device over a file in the lab dir,
  * N libvirt VMs (TCG) booting a Debian kernel + busybox initramfs that keeps
    a mixed O_DIRECT read/write load on vda (iSCSI LUN via QEMU's libiscsi)
    and vdb (raw file on the host block layer),
and injects faults: packet loss per path (one direction or both), a
rate-limited link with queueing, slow target storage (every LUN or one), a
dead portal, short outages of a portal (flaps).

One module per part: common (names, addresses, process helpers), state
(state.json), network (namespace, veths), target (tgtd, LUNs, loop devices),
faults (fault shapes and their mechanisms), hosts (host kinds), guest (guest
kernel + initramfs), libvirtd (daemons), vms (the libvirt VM host kind),
status, cli. `deploy/lab/lab` is the command; see deploy/lab/README.md for
every subcommand and the `status --json` schema.
"""
