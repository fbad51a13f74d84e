#!/bin/busybox sh
# /init of the kernel-initiator host's initramfs (busybox-static), stage 1.
# Built by deploy/lab/kvmslab/kernelhost.py: @MODULES@ = ordered virtio/9p/
# overlay modules in /lib/modules/<name>.ko, @STAGE2@ = the stage-2 script
# (a file of the lab dir, seen through the host's root).
# Root = the host's / over 9p, read-only, under a tmpfs overlay.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1

echo "kvmslab-kh: init started"
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "kvmslab-kh: insmod $m failed"
done
mkdir -p /lower /upper /newroot
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /lower; then
    echo "kvmslab-kh: ERROR cannot mount the host root over 9p"
    exec sh
fi
mount -t tmpfs -o size=600m,mode=0755 tmpfs /upper
mkdir -p /upper/root /upper/work
if ! mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/root,workdir=/upper/work /newroot; then
    echo "kvmslab-kh: ERROR cannot mount the overlay root"
    exec sh
fi
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
echo "kvmslab-kh: switching root"
exec switch_root /newroot /bin/bash @STAGE2@
