"""The storage host's iSCSI target: tgtd inside the namespace, its portals,
one target + LUN per disk a host kind asks for, each LUN backed by a loop
device (`losetup --direct-io=on`) over a file in the lab dir and opened by
tgtd with `--bsoflags direct`, so every initiator I/O reaches the loop device
and its blkio throttle.

tgtd runs with its own management socket (`-C 42`, /var/run/tgtd/socket.42)
so it never clashes with a system tgtd. tgtd ignores SIGTERM while targets
exist: they are deleted with `--force` first, then the system is shut down.
"""

import os
import re
import subprocess
import time

from . import common
from .common import (ISCSI_PORT, NETNS, PORTALS, LabError, all_pids,
                     kill_escalating, lab_path, log, ok, pid_alive,
                     proc_cmdline, run, wait_dead)
from .state import save_state

TGT_CONTROL_PORT = 42          # tgtd -C: management socket /var/run/tgtd/socket.42
LUN = 1                        # LUN 0 is tgtd's controller LUN
IQN_PREFIX = "iqn.2025-01.io.kvmscope.lab"
DISK_MB = 64

# --------------------------------------------------------------------------
# tgtd command lines (pure)
# --------------------------------------------------------------------------


def tgtadm_cmd(*args):
    return ["tgtadm", "-C", str(TGT_CONTROL_PORT), "--lld", "iscsi"] + [str(a) for a in args]


def tgtd_cmd():
    """tgtd in the foreground inside the storage namespace, on portal 1 (the
    other portals are added with tgtadm once it answers)."""
    return ["ip", "netns", "exec", NETNS, "tgtd", "-f",
            "-C", str(TGT_CONTROL_PORT),
            "--iscsi", f"portal={PORTALS[1]['address']}:{ISCSI_PORT}"]


def new_target_args(tid, iqn):
    return ["--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn]


def new_lun_args(tid, dev, direct=True):
    return (["--op", "new", "--mode", "logicalunit", "--tid", str(tid),
             "--lun", str(LUN), "-b", dev] + (["--bsoflags", "direct"] if direct else []))


def bind_args(tid):
    return ["--op", "bind", "--mode", "target", "--tid", str(tid),
            "--initiator-address", "ALL"]


def delete_target_args(tid):
    return ["--op", "delete", "--mode", "target", "--tid", str(tid), "--force"]


def parse_targets(text):
    """`tgtadm --op show --mode target` -> {tid: iqn}."""
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"^Target (\d+): (\S+)", text or "", re.M)}


# --------------------------------------------------------------------------
# tgtd
# --------------------------------------------------------------------------

def tgtadm(*args, check=True):
    return run(tgtadm_cmd(*args), check=check)


def tgtd_responds():
    return ok(tgtadm_cmd("--op", "show", "--mode", "sys"))


def is_lab_tgtd(pid):
    if not pid_alive(pid, "tgtd"):
        return False
    args = proc_cmdline(pid)
    return ("-C" in args and str(TGT_CONTROL_PORT) in args) or \
        f"--control-port={TGT_CONTROL_PORT}" in args


def find_lab_tgtd_pids():
    return [pid for pid in all_pids() if is_lab_tgtd(pid)]


def ensure_tgtd(st):
    pid = st.get("tgtd_pid")
    if not (pid and is_lab_tgtd(pid) and tgtd_responds()):
        for other in find_lab_tgtd_pids():
            raise LabError(f"a tgtd with control port {TGT_CONTROL_PORT} is already "
                           f"running (pid {other}) but is not recorded in the lab "
                           f"state; run `lab down` first")
        logf = open(lab_path("tgtd.log"), "ab")
        log(f"starting tgtd in {NETNS} (log {lab_path('tgtd.log')})")
        proc = subprocess.Popen(tgtd_cmd(), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True)
        logf.close()
        st["tgtd_pid"] = proc.pid
        save_state(st)
        end = time.monotonic() + 15
        while not tgtd_responds():
            if proc.poll() is not None:
                raise LabError(f"tgtd exited with rc={proc.returncode}; see "
                               f"{lab_path('tgtd.log')}")
            if time.monotonic() > end:
                raise LabError("tgtd did not answer on its control socket within 15 s")
            time.sleep(0.2)
    # portals
    shown = tgtadm("--op", "show", "--mode", "portal").stdout
    for p in PORTALS.values():
        portal = f"{p['address']}:{ISCSI_PORT}"
        if portal not in shown:
            tgtadm("--op", "new", "--mode", "portal", "--param", f"portal={portal}")


def tgt_targets():
    """{tid: iqn} currently defined in the lab tgtd."""
    return parse_targets(tgtadm("--op", "show", "--mode", "target", check=False).stdout)


def ensure_target(tid, iqn, dev):
    targets = tgt_targets()
    if targets.get(tid) == iqn:
        return
    if tid in targets:
        tgtadm(*delete_target_args(tid))
    tgtadm(*new_target_args(tid, iqn))
    p = tgtadm(*new_lun_args(tid, dev), check=False)
    if p.returncode != 0:
        log(f"warning: --bsoflags direct refused ({p.stderr.strip()}); "
            f"LUN without O_DIRECT")
        tgtadm(*new_lun_args(tid, dev, direct=False))
    tgtadm(*bind_args(tid))


def stop_tgtd(st, errors):
    pids = set(find_lab_tgtd_pids())
    if st and st.get("tgtd_pid") and is_lab_tgtd(st["tgtd_pid"]):
        pids.add(st["tgtd_pid"])
    if not pids:
        return
    if tgtd_responds():
        for tid in tgt_targets():
            tgtadm(*delete_target_args(tid), check=False)
        tgtadm("--op", "delete", "--mode", "system", check=False)
    for pid in pids:
        log(f"stopping tgtd (pid {pid})")
        if not wait_dead(pid, 3):
            kill_escalating(pid, 2, errors, "tgtd")
    sock = f"/var/run/tgtd/socket.{TGT_CONTROL_PORT}"
    for path in (sock, sock + ".lock"):
        try:
            os.unlink(path)
        except OSError:
            pass


# --------------------------------------------------------------------------
# Backing files and loop devices
# --------------------------------------------------------------------------

def make_disk_file(path):
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(DISK_MB * 1024 * 1024)


def parse_losetup_j(text):
    """`losetup -j FILE` -> [/dev/loopN, ...]."""
    out = []
    for line in (text or "").splitlines():
        dev = line.split(":", 1)[0].strip()
        if dev.startswith("/dev/loop"):
            out.append(dev)
    return out


def loops_for_file(path):
    return parse_losetup_j(run(["losetup", "-j", path], check=False).stdout)


def parse_losetup_list(text, lab_dir):
    """`losetup -l -n -O NAME,BACK-FILE` -> the loop devices whose backing
    file is inside lab_dir (also when the file was deleted)."""
    devs = []
    labdir = os.path.realpath(lab_dir) + "/"
    for line in (text or "").splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2:
            back = parts[1].strip()
            if back.endswith(" (deleted)"):
                back = back[:-len(" (deleted)")]
            if back.startswith(labdir) or back.startswith(lab_dir.rstrip("/") + "/"):
                devs.append(parts[0])
    return devs


def lab_loop_devices():
    """All loop devices whose backing file is inside the lab dir."""
    p = run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], check=False)
    return parse_losetup_list(p.stdout, common.LAB_DIR)


def lab_loops(luns):
    """Loop devices of the lab: found by backing file, plus those of the
    recorded LUNs' files (records with lun_file, loop, loop_majmin)."""
    loops = set(lab_loop_devices())
    for lun in luns:
        if lun.get("loop"):
            loops.update(loops_for_file(lun["lun_file"]))
    return loops


def ensure_loop(path):
    devs = loops_for_file(path)
    if devs:
        return devs[0]
    p = run(["losetup", "-f", "--show", "--direct-io=on", path], check=False)
    if p.returncode != 0:
        p = run(["losetup", "-f", "--show", path])
    return p.stdout.strip()


def detach_loops(loops, errors):
    for d in sorted(loops):
        log(f"detaching {d}")
        p = run(["losetup", "-d", d], check=False)
        if p.returncode != 0:
            errors.append(f"cannot detach {d}: {p.stderr.strip()}")


def dev_majmin(dev):
    st = os.stat(dev)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def ensure_backing(lun_file):
    """Backing file and its loop device; returns {loop, loop_majmin} to record
    (the target itself is made by ensure_target once that is saved)."""
    make_disk_file(lun_file)
    loop = ensure_loop(lun_file)
    return {"loop": loop, "loop_majmin": dev_majmin(loop)}
