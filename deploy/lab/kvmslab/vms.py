"""Host kind "vm": libvirt VMs whose vda is an iSCSI LUN reached by QEMU's
built-in libiscsi, and whose vdb is a raw file on the host block layer.

kvmslab-vm<i>: <domain type='qemu'> (TCG), 256 MiB, 1 vCPU, serial console to
LAB_DIR/kvmslab-vm<i>.console.log, direct kernel boot of the guest kernel and
initramfs (guest.py). vda = target tid i+1, IQN ...:kvmslab-vm<i>-vda, LUN 1,
through portal (i % 2) + 1; vdb = LAB_DIR/kvmslab-vm<i>-vdb.img, cache=none,
io=native. Ready when the console shows the load marker and both disks'
request counters (libvirt bulk block stats) grow between two polls.
"""

import glob
import os
import shutil
import time

from . import guest, target
from .common import (ISCSI_PORT, LAB_DIR, LIBVIRT_URI, PORTALS, PREFIX, LabError,
                     all_pids, kill_escalating, lab_path, libvirt_mod, log,
                     pid_alive, proc_cmdline)
from .hostkind import HostKind
from .libvirtd import ensure_libvirt, libvirtd_up, stop_lab_daemons
from .state import save_state

VM_MEMORY_MB = 256
MAX_VMS = 16
LOAD_MARKER = "kvmslab: load started"
STAT_KEYS = ("rd.reqs", "rd.times", "rd.bytes", "wr.reqs",
             "wr.times", "wr.bytes", "fl.reqs", "fl.times")


def vm_name(i):
    return f"{PREFIX}-vm{i}"


def vm_portal(i):
    return (i % 2) + 1


def vm_iqn(i):
    return f"{target.IQN_PREFIX}:{vm_name(i)}-vda"


def lun_file(i):
    return lab_path(f"{vm_name(i)}-lun.img")


def vdb_file(i):
    return lab_path(f"{vm_name(i)}-vdb.img")


def vm_record(i, backing):
    """What the state records about VM i (backing: {loop, loop_majmin})."""
    return {"name": vm_name(i), "index": i, "portal": vm_portal(i),
            "iqn": vm_iqn(i), "tid": i + 1, "lun": target.LUN,
            "lun_file": lun_file(i), "loop": backing["loop"],
            "loop_majmin": backing["loop_majmin"],
            "vdb_file": vdb_file(i), "console": lab_path(f"{vm_name(i)}.console.log")}


def domain_xml(vm):
    p = PORTALS[vm["portal"]]
    return f"""<domain type='qemu'>
  <name>{vm['name']}</name>
  <description>kvmscope lab VM (deploy/lab/lab); removed by `lab down`</description>
  <memory unit='MiB'>{VM_MEMORY_MB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{lab_path('vmlinuz')}</kernel>
    <initrd>{lab_path('initramfs.cpio.gz')}</initrd>
    <cmdline>console=ttyS0 loglevel=4 panic=-1 mitigations=off</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source protocol='iscsi' name='{vm['iqn']}/{target.LUN}'>
        <host name='{p['address']}' port='{ISCSI_PORT}'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source file='{vm['vdb_file']}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{vm['console']}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


# --------------------------------------------------------------------------
# libvirt domains
# --------------------------------------------------------------------------

def lab_domain_names(conn):
    return [d.name() for d in conn.listAllDomains(0) if d.name().startswith(PREFIX + "-")]


def ensure_vm(conn, vm):
    libvirt = libvirt_mod()
    try:
        dom = conn.lookupByName(vm["name"])
    except libvirt.libvirtError:
        dom = None
    if dom is None:
        log(f"defining VM {vm['name']} (vda: iSCSI {vm['iqn']}/{target.LUN} via "
            f"portal {vm['portal']} {PORTALS[vm['portal']]['address']}; "
            f"vdb: {vm['vdb_file']})")
        dom = conn.defineXML(domain_xml(vm))
    if not dom.isActive():
        # fresh console per boot so the load marker reflects this boot
        try:
            os.unlink(vm["console"])
        except FileNotFoundError:
            pass
        log(f"starting VM {vm['name']}")
        try:
            dom.create()
        except libvirt.libvirtError as e:
            raise LabError(f"cannot start {vm['name']}: {e} "
                           f"(see /var/log/libvirt/qemu/{vm['name']}.log)")


def lab_leftovers(st):
    """What of the lab's libvirt side outlives libvirtd: domains in the
    state file, persistent definitions under /etc/libvirt/qemu, status files
    under /run/libvirt/qemu (a machine restored from a snapshot, or libvirtd
    killed, has them with no daemon to answer for them)."""
    found = [vm["name"] for vm in (st or {}).get("vms", [])]
    for pattern in (f"/etc/libvirt/qemu/{PREFIX}-vm*.xml", f"/run/libvirt/qemu/{PREFIX}-vm*.xml"):
        found += [os.path.basename(p)[:-4] for p in glob.glob(pattern)]
    return sorted(set(found))


def lab_qemu_pids():
    """QEMU processes of lab domains, by their `-name guest=kvmslab-vm<i>`."""
    pids = []
    for pid in all_pids():
        args = proc_cmdline(pid)
        if args and "qemu-system" in os.path.basename(args[0]) and any(
                a.startswith(f"guest={PREFIX}-vm") for a in args) and pid_alive(pid):
            pids.append(pid)
    return pids


def connect_for_cleanup(st, errors):
    """A libvirt connection for `down`, or None when there is nothing of the
    lab's to remove through libvirt. libvirtd not answering while lab domains
    are left (dead daemon, stale socket) is started by the lab for the
    cleanup; stop_lab_daemons stops it again."""
    libvirt = libvirt_mod()
    if libvirtd_up():
        return libvirt.open(LIBVIRT_URI)
    leftovers = lab_leftovers(st)
    if not leftovers:
        return None
    log(f"libvirtd does not answer but the lab left {', '.join(leftovers)}: "
        "starting libvirtd to remove them")
    try:
        os.makedirs(LAB_DIR, exist_ok=True)     # the lab's pid file for libvirtd
        ensure_libvirt(dict(st) if st else {"started_libvirtd": False, "started_virtlogd": False})
        return libvirt.open(LIBVIRT_URI)
    except (LabError, libvirt.libvirtError, OSError) as e:
        errors.append(f"cannot connect to libvirt to remove VMs {', '.join(leftovers)}: {e}")
    for pid in lab_qemu_pids():
        log(f"killing QEMU pid {pid} of a lab VM (libvirt unreachable)")
        kill_escalating(pid, 10, errors, "qemu")
    return None


def _still_active(dom):
    try:
        return dom.isActive()
    except Exception:
        return True


def remove_domains(st, errors):
    libvirt = libvirt_mod()
    conn = connect_for_cleanup(st, errors)
    if conn is None:
        return
    try:
        for name in lab_domain_names(conn):
            dom = conn.lookupByName(name)
            if dom.isActive():
                log(f"destroying VM {name}")
                try:
                    dom.destroy()
                except libvirt.libvirtError as e:
                    # a libvirtd that was just (re)started may still be settling a QEMU that died
                    # meanwhile: what `down` wants (the domain not running) is then already so
                    if not _still_active(dom):
                        log(f"{name} stopped on its own meanwhile ({e.get_error_message() or e})")
                    else:
                        errors.append(f"cannot destroy {name}: {e}")
            log(f"undefining VM {name}")
            try:
                dom.undefine()
            except libvirt.libvirtError as e:
                errors.append(f"cannot undefine {name}: {e}")
    finally:
        conn.close()


def parse_block_stats(rec):
    """One domain's bulk-stats record -> {dev: {rd.reqs, ..., fl.times}}."""
    disks = {}
    for k in range(int(rec.get("block.count", 0))):
        name = rec.get(f"block.{k}.name")
        if not name:
            continue
        disks[name] = {key: int(rec.get(f"block.{k}.{key}", 0)) for key in STAT_KEYS}
    return disks


def block_stats(conn, names):
    """{vm: {'state': int, 'disks': {dev: {...}}}} from bulk stats."""
    libvirt = libvirt_mod()
    doms = []
    for n in names:
        try:
            doms.append(conn.lookupByName(n))
        except libvirt.libvirtError:
            pass
    out = {}
    if not doms:
        return out
    flags = getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
    # NOWAIT: a domain whose job another client holds comes without its disks' counters; that
    # sample is taken again rather than read as zeros (a window of nonsense rates)
    for _attempt in range(10):
        res = conn.domainListGetStats(doms, libvirt.VIR_DOMAIN_STATS_BLOCK |
                                      libvirt.VIR_DOMAIN_STATS_STATE, flags)
        partial = False
        for dom, rec in res:
            out[dom.name()] = {"state": rec.get("state.state"), "disks": parse_block_stats(rec)}
            partial = partial or (rec.get("state.state") == libvirt.VIR_DOMAIN_RUNNING and any(
                f"block.{k}.rd.reqs" not in rec for k in range(int(rec.get("block.count", 0)))))
        if not partial:
            break
        time.sleep(0.3)
    return out


def ops_between(a, b):
    """Requests completed (reads + writes) between two stat samples of a disk."""
    return (b["rd.reqs"] + b["wr.reqs"]) - (a["rd.reqs"] + a["wr.reqs"])


def stats_delta(a, b, dt):
    """ops/s and average latency (ms) between two block stat samples."""
    ops = ops_between(a, b)
    ns = (b["rd.times"] + b["wr.times"]) - (a["rd.times"] + a["wr.times"])
    return {
        "ops": ops,
        "ops_per_s": round(ops / dt, 1) if dt > 0 else 0.0,
        "avg_latency_ms": round(ns / ops / 1e6, 3) if ops > 0 else None,
    }


def console_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_for_load(conn, vms, timeout):
    libvirt = libvirt_mod()
    names = [vm["name"] for vm in vms]
    consoles = {vm["name"]: vm["console"] for vm in vms}
    ready = {}
    prev = {}
    start = time.monotonic()
    last_report = 0.0
    while True:
        elapsed = time.monotonic() - start
        stats = block_stats(conn, names)
        notes = []
        for n in names:
            if n in ready:
                notes.append(f"{n} load running")
                continue
            s = stats.get(n)
            if s is None or s["state"] != libvirt.VIR_DOMAIN_RUNNING:
                raise LabError(f"VM {n} is not running (state {s and s['state']}); "
                               f"see /var/log/libvirt/qemu/{n}.log and {consoles[n]}")
            con = console_text(consoles[n])
            if "Kernel panic" in con or "kvmslab: ERROR" in con:
                tail = "\n".join(con.strip().splitlines()[-15:])
                raise LabError(f"VM {n} failed to boot; console {consoles[n]}:\n{tail}")
            if LOAD_MARKER not in con:
                notes.append(f"{n} booting")
                prev[n] = s["disks"]
                continue
            p = prev.get(n)
            grown = {}
            if p:
                for dev in ("vda", "vdb"):
                    if dev in s["disks"] and dev in p:
                        grown[dev] = ops_between(p[dev], s["disks"][dev])
            prev[n] = s["disks"]
            if grown.get("vda", 0) > 0 and grown.get("vdb", 0) > 0:
                ready[n] = round(elapsed, 1)
                log(f"{n}: load running after {elapsed:.1f}s "
                    f"(vda +{grown['vda']} ops, vdb +{grown['vdb']} ops in last poll)")
                notes.append(f"{n} load running")
            else:
                notes.append(f"{n} load starting (vda +{grown.get('vda', 0)}, "
                             f"vdb +{grown.get('vdb', 0)})")
        if len(ready) == len(names):
            return ready
        if elapsed > timeout:
            raise LabError(f"timed out after {timeout}s waiting for VM disk I/O: "
                           + "; ".join(notes) + ". Consoles: " +
                           ", ".join(consoles.values()))
        if elapsed - last_report >= 5:
            log(f"[{elapsed:5.1f}s] " + "; ".join(notes))
            last_report = elapsed
        time.sleep(2)


def host_device_of(path):
    try:
        s = os.stat(path)
    except OSError:
        return None, None
    mm = f"{os.major(s.st_dev)}:{os.minor(s.st_dev)}"
    try:
        name = os.path.basename(os.path.realpath(f"/sys/dev/block/{mm}"))
        return f"/dev/{name}", mm
    except OSError:
        return None, mm


def vm_status(vm, a, b, dt, running, vdb_device):
    """One VM's status --json record from two stat samples a, b ({'disks': ...})
    taken dt s apart. vdb_device: (host device, MAJ:MIN) under vdb's file. Pure."""
    p = PORTALS[vm["portal"]]
    hdev, hmm = vdb_device
    disks = [
        {"dev": "vda", "backend": "iscsi", "portal": vm["portal"],
         "address": p["address"], "port": ISCSI_PORT, "iqn": vm["iqn"],
         "lun": vm["lun"], "tid": vm["tid"],
         "url": f"iscsi://{p['address']}:{ISCSI_PORT}/{vm['iqn']}/{vm['lun']}",
         "target_backing_device": vm["loop"],
         "target_backing_majmin": vm["loop_majmin"],
         "target_backing_file": vm["lun_file"]},
        {"dev": "vdb", "backend": "file", "path": vm["vdb_file"],
         "host_device": hdev, "host_majmin": hmm},
    ]
    progressing_all = True
    for d in disks:
        sa, sb = a["disks"].get(d["dev"]), b["disks"].get(d["dev"])
        d["stats"] = sb
        if sa and sb:
            d.update(stats_delta(sa, sb, dt))
        else:
            d.update({"ops": 0, "ops_per_s": 0.0, "avg_latency_ms": None})
        d["progressing"] = d["ops"] > 0
        progressing_all = progressing_all and d["progressing"]
    return {"name": vm["name"], "index": vm["index"], "portal": vm["portal"],
            "running": running, "load_progressing": running and progressing_all,
            "console": vm["console"], "disks": disks}


# --------------------------------------------------------------------------
# The host kind
# --------------------------------------------------------------------------

class LibvirtVMs(HostKind):
    name = "vm"
    state_key = "vms"

    def add_up_arguments(self, parser):
        parser.add_argument("--vms", type=int, default=2, help="number of VMs (default 2)")

    def validate(self, args):
        if args.vms < 1 or args.vms > MAX_VMS:
            raise LabError(f"--vms must be between 1 and {MAX_VMS}")

    def check_against(self, st, args):
        n = args.vms
        if st is not None and st.get("vm_count") and st["vm_count"] != n:
            raise LabError(f"the lab is already up with {st['vm_count']} VMs; run "
                           f"`lab down` before `lab up --vms {n}`")

    def provision(self, st, args):
        ver, kpath = guest.pick_guest_kernel()
        st["kernel"] = {"version": ver, "source": kpath}
        if not os.path.exists(lab_path("vmlinuz")):
            shutil.copyfile(kpath, lab_path("vmlinuz"))
        if not os.path.exists(lab_path("initramfs.cpio.gz")):
            mods = guest.build_initramfs(ver, lab_path("initramfs.cpio.gz"))
            log(f"built initramfs with busybox + modules {' '.join(mods)} ({ver})")
        vms = []
        for i in range(args.vms):
            target.make_disk_file(lun_file(i))
            target.make_disk_file(vdb_file(i))
            vm = vm_record(i, target.ensure_backing(lun_file(i)))
            vms.append(vm)
            st["vms"] = vms
            st["vm_count"] = args.vms
            save_state(st)
            target.ensure_target(vm["tid"], vm["iqn"], vm["loop"])

    def start(self, st, args):
        ensure_libvirt(st)
        libvirt = libvirt_mod()
        conn = libvirt.open(LIBVIRT_URI)
        try:
            for vm in st["vms"]:
                ensure_vm(conn, vm)
            log(f"waiting up to {args.timeout}s for {len(st['vms'])} VM(s) to boot "
                f"and load vda+vdb")
            st["ready_after_s"] = wait_for_load(conn, st["vms"], args.timeout)
        finally:
            conn.close()

    def summary(self, st):
        return f"{st['vm_count']} VM(s)"

    def luns(self, st):
        return list((st or {}).get("vms", []))

    def remove(self, st, errors):
        remove_domains(st, errors)
        stop_lab_daemons(errors)      # only those the lab started
        for path in glob.glob(f"/var/log/libvirt/qemu/{PREFIX}-vm*.log*"):
            try:
                os.unlink(path)
            except OSError as e:
                errors.append(f"cannot remove {path}: {e}")

    def status(self, st, interval):
        libvirt = libvirt_mod()
        names = [vm["name"] for vm in st["vms"]]
        stats_a = stats_b = {}
        dt = 0.0
        if libvirtd_up():
            conn = libvirt.open(LIBVIRT_URI)
            try:
                t1 = time.monotonic()
                stats_a = block_stats(conn, names)
                time.sleep(interval)
                stats_b = block_stats(conn, names)
                dt = time.monotonic() - t1
            finally:
                conn.close()
        out, all_ok = [], bool(st["vms"])
        for vm in st["vms"]:
            a = stats_a.get(vm["name"], {"disks": {}})
            b = stats_b.get(vm["name"], {"disks": {}, "state": None})
            running = b.get("state") == libvirt.VIR_DOMAIN_RUNNING
            out.append(vm_status(vm, a, b, dt, running, host_device_of(vm["vdb_file"])))
            all_ok = all_ok and running
        return out, all_ok


LIBVIRT_VMS = LibvirtVMs()
