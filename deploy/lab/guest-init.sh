#!/bin/busybox sh
# /init of the kvmscope lab guest initramfs (busybox-static).
# Built into the initramfs by deploy/lab/lab; @MODULES@ is replaced by the
# ordered list of kernel modules copied to /lib/modules/<name>.ko.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1

echo "kvmslab: init started"
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "kvmslab: insmod $m failed"
done

n=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    n=$((n + 1))
    if [ "$n" -gt 60 ]; then
        echo "kvmslab: ERROR /dev/vda or /dev/vdb did not appear"
        ls -l /dev/vd* 2>&1
        break
    fi
    sleep 0.5
done

# Steady mixed read/write O_DIRECT load on one disk: random 64 KiB chunks of
# 4 KiB requests (16 requests per dd), alternately read and written.
load() {
    dev=$1
    blocks=$(( $(cat /sys/block/$dev/size) / 8 ))
    span=$((blocks - 16))
    [ "$span" -gt 0 ] || span=1
    while true; do
        off=$((RANDOM % span))
        dd if=/dev/$dev of=/dev/null bs=4k count=16 skip=$off iflag=direct 2>/dev/null \
            || { echo "kvmslab: read error on $dev"; sleep 1; }
        off=$((RANDOM % span))
        dd if=/dev/zero of=/dev/$dev bs=4k count=16 seek=$off oflag=direct 2>/dev/null \
            || { echo "kvmslab: write error on $dev"; sleep 1; }
    done
}

load vda &
load vdb &
echo "kvmslab: load started on vda vdb"
while true; do
    sleep 3600
done
