"""Host kind "kernel-host": a second KVM host whose storage path is the
kernel's own: open-iscsi (iscsi_tcp) logged in to one LUN through both
portals, dm-multipath over the two sessions, an O_DIRECT load on the map.

`lab up --kernel-host` boots kvmslab-kh, a QEMU/TCG guest (not libvirt: the
host's libvirtd is the VMs') of the Debian kernel. Its root is the host's own
`/` over 9p (read-only, multidevs=remap) under a tmpfs overlay, so it runs
the host's real userland (iscsid/iscsiadm, multipathd, udevd, bcc, this
checkout's venv) with its own /etc/iscsi, /etc/multipath.conf and
/etc/kvmscope written here into LAB_DIR/kernelhost/etc (copied in at boot).

Network: three taps, routed by the host (per-interface forwarding on the
storage taps and the portal veths only; no NAT, no proxy):

  kvmslab-kt1  host 198.18.11.1/24  guest 198.18.11.2  -> portal 1 via kvmslab-h1
  kvmslab-kt2  host 198.18.12.1/24  guest 198.18.12.2  -> portal 2 via kvmslab-h2
  kvmslab-km   host 198.18.10.1/24  guest 198.18.10.2  host-only: agent, kvmscope

The storage namespace routes 198.18.1{1,2}.0/24 back through the host end of
its portal's veth, so the guest's TCP segments cross the same veth links as
the VMs': `lab loss`, `target-offline`, `flap` (iptables chain KVMSLAB, also
jumped to from the host's FORWARD) and `lab shape` (tbf on the veths) act on
the guest's own TCP stack, and `throttle-target` on its LUN's loop device.

Its LUN: target tid 101, IQN ...:kvmslab-kh-lun, LUN 1. Ready when the console
shows `kvmslab-kh: ready` and the agent (guestagent.py) answers.
"""

import os
import shutil
import subprocess
import time

from . import guest, target
from .common import (HERE, ISCSI_PORT, NETNS, PORTALS, PREFIX, LabError,
                     all_pids, kill_escalating, lab_path, log, missing_binaries, ok,
                     pid_alive, proc_cmdline, run)
from .guestagent import AGENT_PORT, guest_run
from .hostkind import HostKind
from .state import save_state

NAME = f"{PREFIX}-kh"
STATE_KEY = "kernel_hosts"
TID = 101
IQN = f"{target.IQN_PREFIX}:{NAME}-lun"
INITIATOR_IQN = f"{target.IQN_PREFIX}:{NAME}-initiator"
MAP = "mpatha"
MEMORY_MB = 1024
METRICS_PORT = 9847
REPO = os.path.dirname(os.path.dirname(HERE))

# what the guest runs from the host's userland (checked by `lab up --kernel-host`)
GUEST_BINARIES = ["iscsid", "iscsiadm", "multipathd", "multipath", "dmsetup", "udevadm",
                  "openssl", "virsh", "tcpretrans-bpfcc"]

MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "netfs", "fscache", "9pnet", "9pnet_virtio", "9p", "overlay"]

# link -> tap name, host address, guest address, MAC, portal it reaches (None: host-only)
LINKS = [
    {"tap": f"{PREFIX}-kt1", "host_addr": "198.18.11.1", "guest_addr": "198.18.11.2",
     "net": "198.18.11.0/24", "mac": "52:54:00:12:0b:02", "portal": 1},
    {"tap": f"{PREFIX}-kt2", "host_addr": "198.18.12.1", "guest_addr": "198.18.12.2",
     "net": "198.18.12.0/24", "mac": "52:54:00:12:0c:02", "portal": 2},
    {"tap": f"{PREFIX}-km", "host_addr": "198.18.10.1", "guest_addr": "198.18.10.2",
     "net": "198.18.10.0/24", "mac": "52:54:00:12:0a:02", "portal": None},
]
MGMT = LINKS[2]
PREFIXLEN = 24


def kh_dir(*parts):
    return lab_path("kernelhost", *parts)


def mgmt_addr():
    return MGMT["guest_addr"]


# --------------------------------------------------------------------------
# Pure builders
# --------------------------------------------------------------------------

def iscsid_conf(replacement_timeout=15, noop_interval=5, noop_timeout=5):
    """The guest's /etc/iscsi/iscsid.conf (its own timeouts, manual start-up)."""
    return "\n".join([
        "# kvmscope lab kernel-initiator host (deploy/lab/kvmslab/kernelhost.py)",
        "iscsid.startup = /usr/sbin/iscsid",
        "node.startup = manual",
        "node.leading_login = No",
        f"node.session.timeo.replacement_timeout = {replacement_timeout}",
        "node.conn[0].timeo.login_timeout = 15",
        "node.conn[0].timeo.logout_timeout = 15",
        f"node.conn[0].timeo.noop_out_interval = {noop_interval}",
        f"node.conn[0].timeo.noop_out_timeout = {noop_timeout}",
        "node.session.err_timeo.abort_timeout = 15",
        "node.session.err_timeo.lu_reset_timeout = 30",
        "node.session.err_timeo.tgt_reset_timeout = 30",
        "node.session.err_timeo.host_reset_timeout = 60",
        "node.session.initial_login_retry_max = 8",
        "node.session.cmds_max = 128",
        "node.session.queue_depth = 32",
        "node.session.iscsi.InitialR2T = No",
        "node.session.iscsi.ImmediateData = Yes",
        "node.session.iscsi.FirstBurstLength = 262144",
        "node.session.iscsi.MaxBurstLength = 16776192",
        "node.conn[0].iscsi.MaxRecvDataSegmentLength = 262144",
        "node.conn[0].iscsi.MaxXmitDataSegmentLength = 0",
        "node.session.nr_sessions = 1",
        "node.session.scan = auto",
        ""])


def multipath_conf(no_path_retry=12, polling_interval=5):
    """The guest's /etc/multipath.conf: only tgt's LUNs (vendor IET), one
    path group per path (failover), queueing no_path_retry checker intervals."""
    return f"""# kvmscope lab kernel-initiator host (deploy/lab/kvmslab/kernelhost.py)
defaults {{
    user_friendly_names yes
    find_multipaths no
    polling_interval {polling_interval}
    path_checker tur
    path_grouping_policy failover
    failback immediate
    no_path_retry {no_path_retry}
}}
blacklist {{
    device {{
        vendor ".*"
        product ".*"
    }}
}}
blacklist_exceptions {{
    device {{
        vendor "IET"
        product "VIRTUAL-DISK"
    }}
}}
"""


GUEST_TLS = "/etc/kvmscope/tls"      # in the guest: server cert/key, client CA
# Under TCG one `iscsiadm -m session -r SID -s` takes up to ~2.2 s: a 12 s
# collector deadline gives iscsi_kernel a 6 s budget for both sessions' counters.
KVMSCOPE_INTERVAL = 15
# The guest agent's shipped documents (the same ECS documents it would send to Elasticsearch: events,
# findings, metrics docs) as JSON lines, for the lab tests to read; tmpfs, so bounded: 8 MiB + one rotation.
GUEST_SHIPPED = "/var/log/kvmscope/kvmscope.ndjson"
# One probe's bcc compile takes ~15-25 s of the guest's one emulated vCPU alone; kvmscope compiles its four
# probes in parallel at start, beside the load: minutes of wall time, past the 60 s default (every probe
# then failed for good, "no answer from the compiler process").
KVMSCOPE_COMPILE_TIMEOUT = 600


# the guest agent's eBPF collectors; `lab up --kernel-host-probes off` leaves them out
EBPF_COLLECTORS = ("ebpf_block_io", "ebpf_libiscsi", "ebpf_tcp_lifecycle", "ebpf_tcp_retrans")


def kvmscope_conf(probes=True):
    """The guest's /etc/kvmscope/config.yaml: /metrics on the host-only link,
    behind TLS with a verified client certificate (kvmscope refuses a
    listener beyond loopback without both); what it ships goes to a
    JSON-lines file (file_output: no Elasticsearch in the guest's reach).
    ``probes=False`` (`lab up --kernel-host-probes off`): without the eBPF
    collectors, for tests of other things (their bcc compiles would hold the
    guest's one CPU for minutes and slow every command and cycle there)."""
    return (f"# kvmscope lab kernel-initiator host\n"
            f"metrics:\n  listen: \"{MGMT['guest_addr']}:{METRICS_PORT}\"\n"
            f"  web_config: /etc/kvmscope/web.yml\n"
            f"agent:\n  interval: {KVMSCOPE_INTERVAL}\n  collector_timeout: 12\n"
            + ("" if probes else f"  collectors:\n    disable: [{', '.join(EBPF_COLLECTORS)}]\n")
            + f"file_output:\n  enabled: true\n  path: {GUEST_SHIPPED}\n  max_bytes: 8388608\n  keep: 1\n"
              f"ebpf:\n  compile_timeout: {KVMSCOPE_COMPILE_TIMEOUT}\n")


def probes_wanted(args, old=None):
    """Whether the guest's kvmscope runs its eBPF collectors: ``--kernel-host-probes`` when given, else
    what the kernel host already has (a plain `lab up` keeps it), else on. Pure."""
    asked = getattr(args, "kernel_host_probes", None)
    if asked is not None:
        return asked != "off"
    if old and old.get("probes") is not None:
        return bool(old["probes"])
    return True


GUEST_KVMSCOPE_PID = "/run/kvmscope-run.pid"
GUEST_KVMSCOPE_LOG = "/var/log/kvmscope/run.log"


def kvmscope_restart_script(kvmscope_bin, stop_timeout=60, config="/etc/kvmscope/config.yaml",
                            pidfile=GUEST_KVMSCOPE_PID, logfile=GUEST_KVMSCOPE_LOG, state_dir="/var/lib/kvmscope"):
    """Shell (run in the guest through its agent, the new config.yaml on stdin) that restarts the guest's
    `kvmscope run` with that config, as the guest's boot starts it: the running one stopped (SIGTERM,
    SIGKILL after ``stop_timeout`` s, its children, such as a probe's compiler, with it), its state
    directory emptied (stage 2 empties it at boot), the new one started in the background, its pid in the
    same file; prints the new pid. The eBPF object cache (/var/cache/kvmscope/bpf, the guest's tmpfs) is
    kept: a probe compiled once in this boot is loaded from it without clang. Pure (the paths are the
    guest's; a test gives its own)."""
    return f"""set -u
cat > '{config}'
pid=$(cat '{pidfile}' 2>/dev/null || true)
alive() {{ [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] && ! sed 's/.*) //' "/proc/$pid/stat" | grep -q '^[ZX]'; }}
if alive; then
    kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
    kill -TERM "$pid"
    n=0
    while alive; do
        n=$((n + 1))
        if [ "$n" -gt {int(stop_timeout * 5)} ]; then
            echo "kvmscope run (pid $pid) ignored SIGTERM for {stop_timeout} s: SIGKILL" >&2
            kill -KILL "$pid"
            break
        fi
        sleep 0.2
    done
    for k in $kids; do kill -KILL "$k" 2>/dev/null; done
fi
rm -rf '{state_dir}'
mkdir -p '{state_dir}' "$(dirname '{logfile}')"
echo "--- restarted by lab up (t=$(cut -d' ' -f1 /proc/uptime))" >>'{logfile}'
KVMSCOPE_CONFIG='{config}' '{kvmscope_bin}' run -q >>'{logfile}' 2>&1 </dev/null &
echo "$!" >'{pidfile}'
echo "$!"
"""


def web_yml():
    return (f"tls_server_config:\n"
            f"  cert_file: {GUEST_TLS}/server.crt\n"
            f"  key_file: {GUEST_TLS}/server.key\n"
            f"  client_auth_type: RequireAndVerifyClientCert\n"
            f"  client_ca_file: {GUEST_TLS}/ca.crt\n")


def pki_cmds(d):
    """openssl commands (run in directory d) for a lab CA, the guest's server
    certificate (IP SAN = its host-only address) and a client certificate
    for the host (tests, Prometheus). Pure."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    return [
        ["openssl", "req", "-x509", *ec, "-days", "7", "-subj", "/CN=kvmslab-kh lab CA",
         "-keyout", "ca.key", "-out", "ca.crt"],
        ["openssl", "req", *ec, "-subj", f"/CN={NAME}", "-keyout", "server.key",
         "-out", "server.csr"],
        ["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "7", "-extfile", "san.ext", "-out", "server.crt"],
        ["openssl", "req", *ec, "-subj", "/CN=kvmslab-host", "-keyout", "client.key",
         "-out", "client.csr"],
        ["openssl", "x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "7", "-out", "client.crt"],
    ]


def ensure_pki():
    """LAB_DIR/kernelhost/pki (made once); the guest gets ca.crt and the
    server pair under /etc/kvmscope/tls."""
    d = kh_dir("pki")
    if not os.path.exists(os.path.join(d, "client.crt")):
        os.makedirs(d, mode=0o700, exist_ok=True)
        with open(os.path.join(d, "san.ext"), "w") as f:
            f.write(f"subjectAltName=IP:{MGMT['guest_addr']}\n")
        for cmd in pki_cmds(d):
            p = subprocess.run(cmd, cwd=d, capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                raise LabError(f"`{' '.join(cmd)}` failed: {p.stderr.strip()}")
    tls = kh_dir("etc", "kvmscope", "tls")
    os.makedirs(tls, mode=0o700, exist_ok=True)
    for name in ("ca.crt", "server.crt", "server.key"):
        shutil.copyfile(os.path.join(d, name), os.path.join(tls, name))
        os.chmod(os.path.join(tls, name), 0o600)
    return {"ca": os.path.join(d, "ca.crt"), "cert": os.path.join(d, "client.crt"),
            "key": os.path.join(d, "client.key")}


VM = f"{NAME}-vm0"


def vm_xml():
    """A libvirt domain of the guest whose vda is the multipath map as a
    block device, as KVM hosts on kernel iSCSI do. Started with no kernel:
    its firmware reads the disk's first sector and waits for a bootable disk
    (mostly halted, cheap under TCG in TCG), so the domain is running with the
    map open while the guest's load process does the I/O."""
    return f"""<domain type='qemu'>
  <name>{VM}</name>
  <description>kvmscope lab: a VM of the kernel-initiator host (disk = the multipath map)</description>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/mapper/{MAP}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def guest_env(kvmscope_bin):
    """guest.env, sourced by the stage-2 script."""
    nics = " ".join(f"{ln['mac']}={ln['guest_addr']}/{PREFIXLEN}" for ln in LINKS)
    routes = " ".join(f"{PORTALS[ln['portal']]['address']}/32,{ln['host_addr']}"
                      for ln in LINKS if ln["portal"])
    portals = " ".join(f"{PORTALS[i]['address']}:{ISCSI_PORT}" for i in sorted(PORTALS))
    env = {"KH_HOSTNAME": NAME, "KH_NICS": nics, "KH_ROUTES": routes,
           "KH_PORTALS": portals, "KH_IQN": IQN, "KH_MAP": MAP, "KH_VM": VM,
           "KH_MGMT_ADDR": MGMT["guest_addr"], "KH_AGENT_PORT": str(AGENT_PORT),
           "KH_KVMSCOPE": kvmscope_bin or ""}
    return "".join(f"{k}='{v}'\n" for k, v in env.items())


def tap_cmds(link):
    """Host commands that make one tap (idempotent with `replace`)."""
    return [["ip", "tuntap", "add", "dev", link["tap"], "mode", "tap"],
            ["ip", "addr", "replace", f"{link['host_addr']}/{PREFIXLEN}", "dev", link["tap"]],
            ["ip", "link", "set", link["tap"], "up"]]


def forwarding_paths():
    """Per-interface IPv4 forwarding to switch on: the storage taps and the
    portal veths' host ends (never `all`, never the host-only link)."""
    ifs = [ln["tap"] for ln in LINKS if ln["portal"]] + \
          [PORTALS[i]["host_if"] for i in sorted(PORTALS)]
    return [f"/proc/sys/net/ipv4/conf/{i}/forwarding" for i in ifs]


def netns_route_cmds():
    """Routes in the storage namespace back to the guest's storage links."""
    return [["ip", "-n", NETNS, "route", "replace", ln["net"], "via",
             PORTALS[ln["portal"]]["host_addr"], "dev", PORTALS[ln["portal"]]["ns_if"]]
            for ln in LINKS if ln["portal"]]


def qemu_argv(kernel, initrd, console, pidfile):
    argv = ["qemu-system-x86_64", "-name", NAME, "-machine", "pc,accel=tcg",
            "-cpu", "max", "-m", str(MEMORY_MB), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 loglevel=4 panic=-1 mitigations=off",
            "-serial", f"file:{console}",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                       "readonly=on,multidevs=remap",
            "-pidfile", pidfile]
    for k, ln in enumerate(LINKS):
        argv += ["-netdev", f"tap,id=n{k},ifname={ln['tap']},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=n{k},mac={ln['mac']}"]
    return argv


def record(backing, kernel_ver):
    return {"name": NAME, "iqn": IQN, "tid": TID, "lun": target.LUN,
            "lun_file": kh_dir("lun.img"), "loop": backing["loop"],
            "loop_majmin": backing["loop_majmin"], "map": MAP, "vm": VM,
            "initiator_iqn": INITIATOR_IQN, "kernel": kernel_ver,
            "console": kh_dir("console.log"), "mgmt_addr": MGMT["guest_addr"],
            "agent_port": AGENT_PORT,
            "metrics_url": f"https://{MGMT['guest_addr']}:{METRICS_PORT}/metrics",
            "links": LINKS, "pid": None}


# --------------------------------------------------------------------------
# Building and starting
# --------------------------------------------------------------------------

def build_initramfs(ver, out_path):
    with open("/bin/busybox", "rb") as f:
        bb = f.read()
    mods = guest.ordered_modules(ver, MODULES)
    with open(os.path.join(HERE, "kernelhost-init.sh")) as f:
        init = f.read().replace("@MODULES@", " ".join(mods)).replace(
            "@STAGE2@", kh_dir("stage2.sh"))
    c = guest.Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", bb, 0o755)
    c.file("init", init.encode(), 0o755)
    for m in mods:
        c.file(f"lib/modules/{m}.ko", guest.read_module(guest.module_file(ver, m)))
    import gzip
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(c.finish(), compresslevel=6))
    os.replace(tmp, out_path)
    return mods


def kvmscope_binary():
    venv = os.environ.get("KVMSCOPE_VENV") or os.path.join(REPO, ".venv")
    path = os.path.join(venv, "bin", "kvmscope")
    return path if os.path.exists(path) else None


def write_guest_files(kvmscope_bin, probes=True):
    os.makedirs(kh_dir("etc", "iscsi"), exist_ok=True)
    os.makedirs(kh_dir("etc", "kvmscope"), exist_ok=True)
    files = {
        kh_dir("etc", "iscsi", "initiatorname.iscsi"): f"InitiatorName={INITIATOR_IQN}\n",
        kh_dir("etc", "iscsi", "iscsid.conf"): iscsid_conf(),
        kh_dir("etc", "multipath.conf"): multipath_conf(),
        kh_dir("etc", "kvmscope", "config.yaml"): kvmscope_conf(probes),
        kh_dir("etc", "kvmscope", "web.yml"): web_yml(),
        kh_dir("guest.env"): guest_env(kvmscope_bin),
        kh_dir("vm.xml"): vm_xml(),
    }
    for path, text in files.items():
        with open(path, "w") as f:
            f.write(text)
    shutil.copyfile(os.path.join(HERE, "kernelhost-stage2.sh"), kh_dir("stage2.sh"))
    shutil.copyfile(os.path.join(HERE, "kvmslab", "guestagent.py"), kh_dir("guestagent.py"))


def ensure_network():
    for ln in LINKS:
        if not ok(["ip", "link", "show", "dev", ln["tap"]]):
            log(f"creating tap {ln['tap']} ({ln['host_addr']} <-> guest {ln['guest_addr']})")
            run(tap_cmds(ln)[0])
        for cmd in tap_cmds(ln)[1:]:
            run(cmd)
    for path in forwarding_paths():
        with open(path, "w") as f:
            f.write("1\n")
    for cmd in netns_route_cmds():
        run(cmd)


def qemu_pid(rec):
    """The guest's QEMU pid (recorded, else found by its -name)."""
    pid = rec.get("pid") if rec else None
    if pid and pid_alive(pid) and NAME in proc_cmdline(pid):
        return pid
    for p in all_pids():
        args = proc_cmdline(p)
        if args and "qemu-system" in args[0] and "-name" in args and NAME in args \
                and pid_alive(p):
            return p
    return None


def agent_ok(timeout=5.0):
    try:
        return guest_run(mgmt_addr(), ["true"], timeout=timeout)["rc"] == 0
    except OSError:
        return False


def wait_ready(rec, proc, timeout):
    t0 = time.monotonic()
    last = 0.0
    while True:
        el = time.monotonic() - t0
        con = _read(rec["console"])
        if "kvmslab-kh: ERROR" in con or "Kernel panic" in con:
            tail = "\n".join(con.strip().splitlines()[-25:])
            raise LabError(f"kernel host {NAME} failed; console {rec['console']}:\n{tail}")
        if proc is not None and proc.poll() is not None:
            raise LabError(f"QEMU of {NAME} exited rc={proc.returncode}; see "
                           f"{kh_dir('qemu.log')} and {rec['console']}")
        if "kvmslab-kh: ready" in con and agent_ok():
            return round(el, 1)
        if el > timeout:
            tail = "\n".join(con.strip().splitlines()[-10:])
            raise LabError(f"timed out after {timeout}s waiting for {NAME}; console "
                           f"{rec['console']}:\n{tail}")
        if el - last >= 10:
            steps = [ln for ln in con.splitlines() if ln.startswith("kvmslab-kh:")]
            log(f"[{el:5.1f}s] {NAME}: {steps[-1] if steps else 'booting'}")
            last = el
        time.sleep(1)


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def boot_marks(console_text):
    """{step: guest uptime s} from the console's `kvmslab-kh: ... (t=S)` lines. Pure."""
    out = {}
    for line in console_text.splitlines():
        if line.startswith("kvmslab-kh: ") and "(t=" in line:
            step = line[len("kvmslab-kh: "):line.rindex("(t=")].strip()
            try:
                out[step.split(":")[0]] = float(line[line.rindex("(t=") + 3:].rstrip(")\r "))
            except ValueError:
                pass
    return out


def restart_kvmscope(rec, timeout=180):
    """The running guest's kvmscope restarted with the record's probes setting (kvmscope_restart_script)."""
    exe = kvmscope_binary()
    rec["agent_probes"] = rec["probes"]
    if not exe:  # as at boot: no venv with bin/kvmscope (KVMSCOPE_VENV), no kvmscope in the guest
        return
    t0 = time.monotonic()
    try:
        res = guest_run(mgmt_addr(), sh=kvmscope_restart_script(exe), input=kvmscope_conf(rec["probes"]),
                        timeout=timeout)
    except OSError as e:
        raise LabError(f"cannot restart kvmscope in {NAME}: {e}") from e
    if res["rc"] != 0:
        raise LabError(f"restarting kvmscope in {NAME} failed rc={res['rc']}: {res['stderr'].strip()}")
    rec["kvmscope_restarts"] = int(rec.get("kvmscope_restarts") or 0) + 1
    log(f"{NAME}: kvmscope restarted with its eBPF probes {'on' if rec['probes'] else 'off'} in "
        f"{time.monotonic() - t0:.1f}s, no reboot (pid {res['stdout'].strip()})"
        + (f"; {res['stderr'].strip()}" if res["stderr"].strip() else ""))


def stop_guest(rec, errors):
    pid = qemu_pid(rec)
    if pid:
        log(f"stopping {NAME} (QEMU pid {pid})")
        kill_escalating(pid, 5, errors, f"QEMU of {NAME}")


def remove_network(errors):
    for ln in LINKS:
        if ok(["ip", "link", "show", "dev", ln["tap"]]):
            log(f"deleting tap {ln['tap']}")
            p = run(["ip", "link", "del", ln["tap"]], check=False)
            if p.returncode != 0:
                errors.append(f"cannot delete {ln['tap']}: {p.stderr.strip()}")
    for i in sorted(PORTALS):
        path = f"/proc/sys/net/ipv4/conf/{PORTALS[i]['host_if']}/forwarding"
        if os.path.exists(path):
            with open(path, "w") as f:
                f.write("0\n")
    if os.path.exists(f"/run/netns/{NETNS}"):
        for ln in LINKS:
            if ln["portal"]:
                run(["ip", "-n", NETNS, "route", "del", ln["net"]], check=False)


# --------------------------------------------------------------------------
# The host kind
# --------------------------------------------------------------------------

class KernelHost(HostKind):
    name = "kernel-host"
    state_key = STATE_KEY

    def add_up_arguments(self, parser):
        parser.add_argument("--kernel-host", action="store_true",
                            help="also boot the kernel-initiator host kvmslab-kh "
                                 "(open-iscsi + dm-multipath over both portals)")
        parser.add_argument("--kernel-host-probes", choices=("on", "off"), default=None,
                            help="off: the kernel host's kvmscope runs without its eBPF collectors "
                                 "(under TCG their bcc compiles hold the guest's one CPU for minutes). "
                                 "Default: what the running kernel host has, else on. On a running kernel "
                                 "host whose kvmscope has the other setting, `lab up` restarts only that "
                                 "kvmscope (no reboot)")

    def add_parsers(self, sub):
        p = sub.add_parser("kernel-host", help="the kernel-initiator host: exec in it, stop it",
                           epilog="examples:\n  lab kernel-host exec -- iscsiadm -m session\n"
                                  "  lab kernel-host stop      # remove only kvmslab-kh",
                           formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
        ks = p.add_subparsers(dest="kh_cmd", metavar="ACTION")
        ks.required = True
        e = ks.add_parser("exec", help="run a command in the guest (through its agent)")
        e.add_argument("--timeout", type=float, default=60)
        e.add_argument("argv", nargs="+", help="command and arguments (after --)")
        e.set_defaults(func=self.cmd_exec)
        s = ks.add_parser("stop", help="remove kvmslab-kh, its taps and its routes")
        s.set_defaults(func=self.cmd_stop)

    def validate(self, args):
        if getattr(args, "kernel_host", False):
            missing = missing_binaries(GUEST_BINARIES)
            if missing:
                raise LabError("the kernel host runs this machine's userland and needs: "
                               + ", ".join(missing) + " (Debian packages open-iscsi "
                               "multipath-tools udev openssl bpfcc-tools; deploy/setup.sh)")

    def wanted(self, st, args):
        return bool(getattr(args, "kernel_host", False) or (st or {}).get(STATE_KEY))

    def provision(self, st, args):
        if not self.wanted(st, args):
            return
        ver, kpath = guest.pick_guest_kernel()
        os.makedirs(kh_dir(), exist_ok=True)
        if not os.path.exists(kh_dir("vmlinuz")):
            shutil.copyfile(kpath, kh_dir("vmlinuz"))
        if not os.path.exists(kh_dir("initramfs.cpio.gz")):
            mods = build_initramfs(ver, kh_dir("initramfs.cpio.gz"))
            log(f"built kernel-host initramfs with busybox + {' '.join(mods)} ({ver})")
        old = (st.get(STATE_KEY) or [None])[0]
        probes = probes_wanted(args, old)
        write_guest_files(kvmscope_binary(), probes)
        tls = ensure_pki()
        rec = record(target.ensure_backing(kh_dir("lun.img")), ver)
        rec["metrics_tls"] = tls
        rec["probes"] = probes
        if old:
            for k in ("pid", "ready_after_s", "boot_marks", "agent_probes", "kvmscope_restarts"):
                if old.get(k) is not None:
                    rec[k] = old[k]
        st[STATE_KEY] = [rec]
        save_state(st)
        target.ensure_target(TID, IQN, rec["loop"])

    def start(self, st, args):
        if not st.get(STATE_KEY):
            return
        rec = st[STATE_KEY][0]
        ensure_network()
        if qemu_pid(rec) and agent_ok():
            log(f"{NAME} is up (QEMU pid {qemu_pid(rec)})")
            if rec.get("agent_probes") != rec["probes"]:
                restart_kvmscope(rec)
                save_state(st)
            return
        if qemu_pid(rec):
            errs = []
            stop_guest(rec, errs)
        try:
            os.unlink(rec["console"])
        except FileNotFoundError:
            pass
        argv = qemu_argv(kh_dir("vmlinuz"), kh_dir("initramfs.cpio.gz"), rec["console"],
                         kh_dir("qemu.pid"))
        log(f"booting {NAME} (QEMU/TCG, {MEMORY_MB} MiB, root = host / over 9p + tmpfs overlay)")
        with open(kh_dir("qemu.log"), "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True)
        rec["pid"] = proc.pid
        save_state(st)
        timeout = getattr(args, "timeout", 300)
        rec["ready_after_s"] = wait_ready(rec, proc, timeout)
        rec["boot_marks"] = boot_marks(_read(rec["console"]))
        rec["agent_probes"] = rec["probes"]
        rec["kvmscope_restarts"] = 0
        save_state(st)
        log(f"{NAME}: ready after {rec['ready_after_s']}s (guest uptime at steps: "
            f"{rec['boot_marks']})")

    def summary(self, st):
        return f"kernel host {NAME}" if st.get(STATE_KEY) else ""

    def luns(self, st):
        return list((st or {}).get(STATE_KEY, []))

    def remove(self, st, errors):
        rec = ((st or {}).get(STATE_KEY) or [{}])[0]
        stop_guest(rec, errors)
        remove_network(errors)

    def status(self, st, interval):
        out = []
        for rec in st.get(STATE_KEY, []):
            r = {k: rec.get(k) for k in ("name", "iqn", "tid", "lun", "loop", "loop_majmin",
                                         "map", "vm", "console",
                                         "mgmt_addr", "agent_port", "metrics_url", "metrics_tls",
                                         "kernel", "ready_after_s", "boot_marks", "kvmscope_restarts")}
            r["probes"] = rec.get("agent_probes")
            r["pid"] = qemu_pid(rec)
            r["running"] = bool(r["pid"])
            r["taps"] = [ln["tap"] for ln in LINKS]
            r["agent"] = False
            r["sessions"], r["paths"] = [], []
            if r["running"]:
                try:
                    s = guest_run(rec["mgmt_addr"], ["iscsiadm", "-m", "session"], timeout=10)
                    r["agent"] = True
                    r["sessions"] = parse_sessions(s["stdout"])
                    p = guest_run(rec["mgmt_addr"], ["multipathd", "show", "paths", "raw",
                                                     "format", "%d %m %t %T %o %i"], timeout=10)
                    r["paths"] = parse_paths(p["stdout"])
                except OSError:
                    pass
            out.append(r)
        return out, all(r["running"] and r["agent"] for r in out)

    # -- subcommands ----------------------------------------------------------
    def cmd_exec(self, args):
        from .state import require_state
        require_state()
        argv = [a for a in args.argv if a != "--"] if args.argv[:1] == ["--"] else args.argv
        res = guest_run(mgmt_addr(), argv, timeout=args.timeout)
        import sys
        sys.stdout.write(res["stdout"])
        sys.stderr.write(res["stderr"])
        return res["rc"]

    def cmd_stop(self, args):
        from .state import require_state
        st = require_state()
        errors = []
        self.remove(st, errors)
        st.pop(STATE_KEY, None)
        save_state(st)
        if errors:
            raise LabError("; ".join(errors))
        log(f"{NAME} removed (its target tid {TID} stays until `lab down`)")
        return 0


def parse_sessions(text):
    """`iscsiadm -m session` -> [{sid, portal, tpgt, iqn}]. Pure."""
    out = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "tcp:" and parts[1].startswith("["):
            portal, _, tpgt = parts[2].rpartition(",")
            out.append({"sid": int(parts[1].strip("[]")), "portal": portal,
                        "tpgt": int(tpgt), "iqn": parts[3]})
    return out


def parse_paths(text):
    """`multipathd show paths raw format "%d %m %t %T %o %i"` ->
    [{dev, map, dm_state, checker, dev_state, hcil}]. Pure."""
    out = []
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 6:
            out.append(dict(zip(("dev", "map", "dm_state", "checker", "dev_state", "hcil"),
                                parts)))
    return out


KERNEL_HOST = KernelHost()
