#!/bin/bash
# Stage 2 of the kernel-initiator host (PID 1 in the overlay root = the host's
# userland, read-only, under tmpfs). Written by deploy/lab/kvmslab/kernelhost.py;
# its settings come from guest.env next to it. Prints `kvmslab-kh: <step>`
# lines on the serial console; `kvmslab-kh: ready` when both sessions are
# logged in, the multipath map has two paths and the load runs.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/console >/dev/console 2>&1
HERE=$(dirname "$0")
. "$HERE/guest.env"
say() { echo "kvmslab-kh: $* (t=$(cut -d' ' -f1 /proc/uptime))"; }
fail() { echo "kvmslab-kh: ERROR $*"; while true; do sleep 3600; done; }
say "stage2 started"

mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/netns
# /tmp stays the overlay's: a checkout under the host's /tmp (mktemp -d clones) must stay visible
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
hostname "$KH_HOSTNAME"

# The host's own state that must not leak into this host: libvirt domains,
# iSCSI node records, kvmscope's state, the lab's VM logs.
for d in /etc/libvirt/qemu /var/lib/libvirt /var/log/libvirt /var/cache/libvirt \
         /etc/iscsi/nodes /etc/iscsi/send_targets /var/lib/iscsi /etc/multipath \
         /var/lib/kvmscope /etc/kvmscope; do
    rm -rf "$d" 2>/dev/null
    mkdir -p "$d"
done
cp -a "$HERE/etc/." /etc/

modprobe -a virtio_net iscsi_tcp sd_mod dm_multipath dm_round_robin dm_service_time \
    || fail "modprobe failed"

# network: NICs by MAC address
ip link set lo up
for spec in $KH_NICS; do          # MAC=ADDR/PREFIX
    mac=${spec%%=*}; addr=${spec#*=}
    for n in /sys/class/net/*; do
        if [ "$(cat "$n/address")" = "$mac" ]; then
            ip addr add "$addr" dev "${n##*/}"
            ip link set "${n##*/}" up
        fi
    done
done
for r in $KH_ROUTES; do           # NET,GW
    ip route add "${r%%,*}" via "${r#*,}" || fail "route $r"
done
say "network up: $(ip -br addr | tr '\n' ';')"

python3 "$HERE/guestagent.py" serve "$KH_MGMT_ADDR" "$KH_AGENT_PORT" >/run/kvmslab-agent.log 2>&1 &
mkdir -p /var/run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt
virtlogd -d || say "virtlogd did not start"
libvirtd -d || fail "libvirtd did not start"

/lib/systemd/systemd-udevd --daemon || say "udevd did not start"
udevadm trigger --action=add >/dev/null 2>&1
udevadm settle -t 20
say "udev settled"

iscsid || fail "iscsid did not start"
for portal in $KH_PORTALS; do
    iscsiadm -m node -T "$KH_IQN" -p "$portal" -o new >/dev/null || fail "node $portal"
done
t0=$(cut -d' ' -f1 /proc/uptime)
for portal in $KH_PORTALS; do
    iscsiadm -m node -T "$KH_IQN" -p "$portal" --login || fail "login to $portal"
done
say "logged in to $KH_IQN through $KH_PORTALS (login started t=$t0)"
udevadm settle -t 20

multipathd || fail "multipathd did not start"
n=0
while true; do
    paths=$(multipathd show maps format "%n %N" 2>/dev/null | awk -v m="$KH_MAP" '$1 == m {print $2}')
    [ "$paths" = 2 ] && break
    n=$((n + 1))
    [ $n -gt 120 ] && fail "multipath map $KH_MAP has ${paths:-no} paths: $(multipath -ll 2>&1)"
    sleep 0.5
done
say "multipath map $KH_MAP has 2 paths"

python3 "$HERE/guestagent.py" load "/dev/mapper/$KH_MAP" /run/kvmslab-load.log \
    >/run/kvmslab-load.out 2>&1 &
echo "$!" >/run/kvmslab-load.pid

# libvirt with one running domain (firmware only) whose disk is the map, so
# kvmscope's join has a VM disk -> dm -> sdX -> session -> portal to show.
# libvirtd (started early) takes a minute or more under TCG: this runs in the
# background and prints its own line; `ready` does not wait for it.
(
    n=0
    until virsh -q -c qemu:///system version >/dev/null 2>&1; do
        n=$((n + 1)); [ $n -gt 600 ] && { say "libvirtd does not answer"; exit 1; }; sleep 0.5
    done
    virsh -q -c qemu:///system define "$HERE/vm.xml" >/dev/null || { say "virsh define failed"; exit 1; }
    if virsh -q -c qemu:///system start "$KH_VM" >/dev/null; then
        say "libvirt domain $KH_VM running (disk /dev/mapper/$KH_MAP)"
    else
        say "libvirt domain $KH_VM defined, did not start (disk /dev/mapper/$KH_MAP)"
    fi
) &

if [ -n "$KH_KVMSCOPE" ]; then
    mkdir -p /var/log/kvmscope
    KVMSCOPE_CONFIG=/etc/kvmscope/config.yaml "$KH_KVMSCOPE" run -q \
        >/var/log/kvmscope/run.log 2>&1 &
    echo "$!" >/run/kvmscope-run.pid
fi
say "ready"
while true; do
    wait -n 2>/dev/null || sleep 5
done
