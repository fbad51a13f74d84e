"""Capture the kernel-initiator host's real sysfs and command outputs into
tests/fixtures/hosts/kernel-initiator-real/ (used by tests/unit/test_real_captures.py,
which holds the unit tests' fixture builders to them).

    sudo .venv/bin/python -m tests.lab.capture      # needs `lab up --kernel-host`

What is kept (`sys/`): the iSCSI hosts' subtrees under /sys/devices/platform/host<H>
(sessions, connections, targets, SCSI devices, their block devices) with the class
links (iscsi_session, iscsi_connection, iscsi_host, scsi_device), /sys/block links,
and the multipath map's dm-N; symlinks are kept as symlinks (their real relative
targets). Files bigger than 4 KiB, unreadable or binary ones are left out, as are
directories that say nothing about the storage path (power, queue, trace, mq, bsg...).
`cmd/`: iscsiadm -m session (-P 3, -s per session), multipathd show maps/paths (text,
raw format, json), multipath -ll, dmsetup table/status/info, the guest's
/etc/iscsi/iscsid.conf and /etc/multipath.conf, uname -r, iscsiadm --version.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DEST = REPO / "tests" / "fixtures" / "hosts" / "kernel-initiator-real"

# Runs in the guest (python3 -c): walks the roots, prints {path: entry} as JSON.
WALKER = r'''
import json, os, sys
SKIP = {"power", "queue", "trace", "integrity", "mq", "bsg", "scsi_generic", "subsystem",
        "driver", "firmware_node", "bdi", "generic", "uevent", "events", "events_async",
        "events_poll_msecs", "ext_range", "range", "removable", "capability", "hidden",
        "alignment_offset", "discard_alignment", "inflight", "ro", "diskseq", "badblocks",
        "evt_capacity_change_reported", "evt_inquiry_change_reported", "evt_lun_change_reported",
        "evt_media_change", "evt_mode_parameter_change_reported",
        "evt_soft_threshold_reached", "vpd_pg0", "vpd_pg80", "vpd_pg83", "vpd_pg89",
        "vpd_pgb0", "vpd_pgb1", "vpd_pgb2", "inquiry", "bsg_dev", "scsi_disk", "partscan",
        "autosuspend_delay_ms"}
out = {}
def walk(p, depth):
    if p in out or depth > 9:
        return
    name = os.path.basename(p)
    if name in SKIP:
        return
    if os.path.islink(p):
        out[p] = {"link": os.readlink(p)}
        return
    if os.path.isdir(p):
        out[p] = {"dir": True}
        try:
            names = sorted(os.listdir(p))
        except OSError:
            return
        for n in names:
            walk(os.path.join(p, n), depth + 1)
        return
    try:
        with open(p, "rb") as f:
            data = f.read(4097)
    except OSError:
        return
    if len(data) > 4096:
        return
    try:
        out[p] = {"file": data.decode()}
    except UnicodeDecodeError:
        return
for root in sys.argv[1:]:
    walk(root, 0)
print(json.dumps(out))
'''

ROOTS_SH = r"""
for c in iscsi_session iscsi_connection iscsi_host scsi_device scsi_host; do
  for l in /sys/class/$c/*; do
    t=$(readlink -f "$l")
    case "$t" in */platform/host*) echo "$l";; esac
  done
done
for h in /sys/class/iscsi_host/*; do readlink -f "$h" | sed -E 's#(/sys/devices/platform/host[0-9]+)/.*#\1#'; done | sort -u
for d in /sys/block/sd* /sys/block/dm-*; do echo "$d"; readlink -f "$d"; done
"""

COMMANDS = {
    "iscsiadm-m-session.txt": ["iscsiadm", "-m", "session"],
    "iscsiadm-m-session-P3.txt": ["iscsiadm", "-m", "session", "-P", "3"],
    "iscsiadm-version.txt": ["iscsiadm", "--version"],
    "multipathd-show-maps.txt": ["multipathd", "show", "maps"],
    "multipathd-show-paths.txt": ["multipathd", "show", "paths"],
    "multipathd-show-maps-json.json": ["multipathd", "show", "maps", "json"],
    "multipathd-show-paths-raw.txt": ["multipathd", "show", "paths", "raw", "format",
                                      "%d %m %t %T %o %i %w"],
    "multipath-ll.txt": ["multipath", "-ll"],
    "dmsetup-table.txt": ["dmsetup", "table"],
    "dmsetup-status.txt": ["dmsetup", "status"],
    "dmsetup-info-c.txt": ["dmsetup", "info", "-c"],
    "uname-r.txt": ["uname", "-r"],
    "etc-iscsid.conf": ["cat", "/etc/iscsi/iscsid.conf"],
    "etc-multipath.conf": ["cat", "/etc/multipath.conf"],
}


def capture(kh, dest: Path = DEST) -> dict:
    """Capture from the live guest into dest (replaced). Returns a summary."""
    roots = sorted({ln.strip() for ln in kh.sh(ROOTS_SH).splitlines() if ln.strip()})
    tree = json.loads(kh.run("python3", "-c", WALKER, *roots, timeout=120))
    if dest.exists():
        shutil.rmtree(dest)
    sysroot = dest / "sys"
    n_files = n_links = 0
    for path in sorted(tree):
        entry = tree[path]
        assert path.startswith("/sys/"), path
        local = sysroot / path[len("/sys/"):]
        if "dir" in entry:
            local.mkdir(parents=True, exist_ok=True)
        elif "link" in entry:
            local.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(entry["link"], local)
            n_links += 1
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(entry["file"])
            n_files += 1
    cmd = dest / "cmd"
    cmd.mkdir(parents=True)
    sids = [int(p.rsplit("session", 1)[1]) for p in tree
            if p.startswith("/sys/class/iscsi_session/session") and p.count("/") == 4]
    commands = dict(COMMANDS)
    for sid in sorted(sids):
        commands[f"iscsiadm-m-session-r{sid}-s.txt"] = ["iscsiadm", "-m", "session", "-r", str(sid), "-s"]
    for name, argv in commands.items():
        (cmd / name).write_text(kh.run(*argv))
    (dest / "README.md").write_text(
        "Captured from the lab's kernel-initiator host kvmslab-kh (`lab up --kernel-host`,\n"
        "Debian kernel under QEMU/TCG, open-iscsi + multipath-tools from Debian 12) by\n"
        "`python -m tests.lab.capture`: a real sysfs subtree (sys/) and command outputs (cmd/).\n"
        "Do not edit by hand: re-capture. tests/unit/test_real_captures.py holds the unit\n"
        "tests' fixture builders to it; tests/lab/test_kernel_host.py holds it to the live guest.\n")
    return {"files": n_files, "links": n_links, "sessions": sids, "commands": len(commands)}


def main() -> int:
    sys.path.insert(0, str(REPO))
    import subprocess

    from tests.lab.kernelhost import KernelHost

    st = json.loads(subprocess.run(["/usr/bin/python3", str(REPO / "deploy/lab/lab"), "status", "--json",
                                    "--interval", "0.2"], capture_output=True, text=True, check=True).stdout)
    if not st.get("kernel_hosts"):
        print("no kernel host: run `deploy/lab/lab up --kernel-host` first", file=sys.stderr)
        return 1
    print(capture(KernelHost(st["kernel_hosts"][0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
