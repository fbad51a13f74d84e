"""libvirtd and virtlogd without systemd: started standalone (`-d -p
LAB_DIR/<daemon>.pid`) only when not already running, after creating what
they need when missing (groups kvm and libvirt-qemu, user libvirt-qemu, dirs
under /var/log, /var/run, /var/lib). `lab down` stops only the daemons the
lab started, found by that pid file or by a command line naming it."""

import grp
import os
import pwd
import time

from .common import (LIBVIRT_URI, LabError, all_pids, kill_escalating,
                     lab_path, libvirt_mod, log, pid_alive, proc_cmdline,
                     read_pidfile, run)
from .state import save_state

LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
VIRTLOGD_SOCK = "/run/libvirt/virtlogd-sock"


def libvirtd_up():
    if not os.path.exists(LIBVIRT_SOCK):
        return False
    try:
        libvirt = libvirt_mod()
        c = libvirt.open(LIBVIRT_URI)
        c.close()
        return True
    except Exception:
        return False


def daemon_running(name, pidfiles):
    for pf in pidfiles:
        pid = read_pidfile(pf)
        if pid and pid_alive(pid, name):
            return pid
    for pid in all_pids():
        if pid_alive(pid, name):
            return pid
    return None


def ensure_libvirt_prereqs():
    try:
        grp.getgrnam("kvm")
    except KeyError:
        run(["groupadd", "--system", "kvm"])
    try:
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        run(["groupadd", "--system", "libvirt-qemu"])
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        run(["useradd", "--system", "--no-create-home", "--home-dir",
             "/var/lib/libvirt", "--shell", "/usr/sbin/nologin",
             "-g", "kvm", "-G", "libvirt-qemu", "libvirt-qemu"])
    for d in ("/var/log/libvirt", "/var/log/libvirt/qemu", "/var/run/libvirt",
              "/var/lib/libvirt/qemu"):
        os.makedirs(d, exist_ok=True)


def ensure_libvirt(st):
    ensure_libvirt_prereqs()
    if not daemon_running("virtlogd", ["/run/virtlogd.pid", lab_path("virtlogd.pid")]) \
            or not os.path.exists(VIRTLOGD_SOCK):
        if daemon_running("virtlogd", ["/run/virtlogd.pid", lab_path("virtlogd.pid")]):
            raise LabError("virtlogd runs but its socket is missing: "
                           f"{VIRTLOGD_SOCK}")
        log("starting virtlogd")
        run(["virtlogd", "-d", "-p", lab_path("virtlogd.pid")])
        st["started_virtlogd"] = True
        save_state(st)
    if not libvirtd_up():
        if daemon_running("libvirtd", ["/run/libvirtd.pid", lab_path("libvirtd.pid")]):
            # running but not answering yet: give it time below
            pass
        else:
            log("starting libvirtd")
            run(["libvirtd", "-d", "-p", lab_path("libvirtd.pid")])
            st["started_libvirtd"] = True
            save_state(st)
        end = time.monotonic() + 30
        while not libvirtd_up():
            if time.monotonic() > end:
                raise LabError(f"libvirtd does not answer on {LIBVIRT_URI} after 30 s "
                               f"(see /var/log/libvirt)")
            time.sleep(0.3)


def lab_daemon_pids(name):
    """PIDs of `name` started by the lab: recorded pid file, or a command
    line naming the lab's pid file (`-p LAB_DIR/<name>.pid`), which also
    finds them when the state file is lost."""
    pidfile = lab_path(f"{name}.pid")
    pids = set()
    pid = read_pidfile(pidfile)
    if pid and pid_alive(pid, name):
        pids.add(pid)
    for p in all_pids():
        if pid_alive(p, name) and pidfile in proc_cmdline(p):
            pids.add(p)
    return sorted(pids)


def stop_daemon(name, errors):
    for pid in lab_daemon_pids(name):
        log(f"stopping {name} (pid {pid}, started by the lab)")
        kill_escalating(pid, 15, errors, name)


def stop_lab_daemons(errors):
    """Only those the lab started."""
    stop_daemon("libvirtd", errors)
    stop_daemon("virtlogd", errors)
