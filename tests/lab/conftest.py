"""Session fixtures for the kvmscope lab tests (deploy/lab/lab).

The `lab` fixture brings the lab up once per session (`lab down` first for a
clean slate, then `lab up --vms 2`) and always runs `lab down` at the end.
Tests measure with libvirt bulk stats and /proc/net/snmp directly, not with
the lab's own status code, so a wrong `lab status` cannot hide a failure.

Skips (with the reason printed) when not root, when a required binary or the
python `libvirt` module is missing.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

# the Elasticsearch node of the lab tests that ship (test_es_lab, test_incidents_lab): one definition here,
# so they share one node (a definition imported into each module would be one more node start each)
from tests.es.conftest import es_node  # noqa: E402,F401

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAB = os.path.join(REPO, "deploy", "lab", "lab")
LAB_PYTHON = "/usr/bin/python3"      # the system Python that has python3-libvirt
LAB_DIR = os.environ.get("KVMSCOPE_LAB_DIR", "/var/tmp/kvmscope-lab")
URI = "qemu:///system"
LOCK_PATH = "/run/kvmscope-lab.lock"  # held for a whole pytest session that uses the lab
REQUIRED = ["ip", "iptables", "tgtd", "tgtadm", "losetup", "modinfo", "libvirtd",
            "virtlogd", "qemu-system-x86_64", "busybox"]


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "lab: needs root and the real kvmscope lab (tgtd, libvirt, "
                   "QEMU); brings up VMs, takes a few minutes")


def _skip_reason():
    if os.geteuid() != 0:
        return "lab tests need root"
    if not os.path.exists(LAB_PYTHON):
        return f"{LAB_PYTHON} missing"
    missing = [b for b in REQUIRED
               if shutil.which(b) is None and not os.path.exists("/usr/sbin/" + b)]
    if missing:
        return "missing binaries: " + ", ".join(missing)
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "python module libvirt missing (Debian python3-libvirt)"
    return None


def retrans_segs():
    """Host TCP RetransSegs from /proc/net/snmp."""
    with open("/proc/net/snmp") as f:
        tcp = [line.split() for line in f if line.startswith("Tcp:")]
    hdr, vals = tcp[0], tcp[1]
    return int(vals[hdr.index("RetransSegs")])


class Lab:
    def __init__(self):
        import libvirt
        libvirt.registerErrorHandler(lambda ctx, err: None, None)
        self.libvirt = libvirt
        self.conn = None
        self.status = None        # `lab status --json` right after `lab up`
        self.down_done = False

    # -- running the command ------------------------------------------------
    def run(self, *args, check=True, timeout=600):
        cmd = [LAB_PYTHON, LAB] + [str(a) for a in args]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=timeout)
        sys.stderr.write(p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed rc={p.returncode}\n"
                                 f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p

    def ensure_vms(self, n):
        """The session's lab with at least ``n`` VMs (two per portal from 4): `lab down` + `lab up --vms n`
        when it has fewer (about 30 s). Tests that need it sort late (test_zy_*) so that the others keep
        the 2-VM lab they assume; test_zz_down tears down whichever is up."""
        if len(self.vm_names) >= n:
            return
        self.close()
        self.run("down")
        t0 = time.monotonic()
        self.run("up", "--vms", n, "--timeout", 300)
        print(f"\nlab re-up with {n} VMs took {time.monotonic() - t0:.1f}s", file=sys.stderr)
        self.status = self.status_json(interval=1.0)

    def status_json(self, interval=1.0):
        return json.loads(self.run("status", "--json", "--interval", interval).stdout)

    # -- measurements --------------------------------------------------------
    def connect(self):
        if self.conn is not None:
            try:
                alive = self.conn.isAlive()
            except self.libvirt.libvirtError:
                alive = False
            if not alive:  # libvirtd restarted (tests/lab/test_libvirt_faults.py does that)
                self.close()
        if self.conn is None:
            self.conn = self.libvirt.open(URI)
        return self.conn

    def close(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None

    @property
    def vm_names(self):
        return [vm["name"] for vm in self.status["vms"]]

    def vm_portal(self, name):
        return next(vm["portal"] for vm in self.status["vms"] if vm["name"] == name)

    def block_stats(self):
        """{vm: {'state': int, dev: {'rd.reqs':..., ...}}} via bulk stats.

        With NOWAIT, libvirt leaves a disk's counters out while another client (an agent, an exporter)
        holds the domain's job: such a sample is taken again (up to 10 times, 0.3 s apart) instead of
        reading the missing counters as 0, which once made a window of 250,000 requests."""
        lv = self.libvirt
        flags = getattr(lv, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0)
        groups = lv.VIR_DOMAIN_STATS_BLOCK | lv.VIR_DOMAIN_STATS_STATE
        for attempt in range(10):
            try:
                res = self.connect().getAllDomainStats(groups, flags)
            except lv.libvirtError:
                # the connection died with a libvirtd restart (isAlive() cannot tell
                # before the first write): open a new one, once
                self.close()
                res = self.connect().getAllDomainStats(groups, flags)
            out, partial = {}, []
            for dom, rec in res:
                if dom.name() not in self.vm_names:
                    continue
                d = {"state": rec.get("state.state")}
                for k in range(int(rec.get("block.count", 0))):
                    name = rec[f"block.{k}.name"]
                    if f"block.{k}.rd.reqs" not in rec and rec.get("state.state") == lv.VIR_DOMAIN_RUNNING:
                        partial.append(f"{dom.name()}/{name}")
                    d[name] = {key: int(rec.get(f"block.{k}.{key}", 0))
                               for key in ("rd.reqs", "rd.times", "wr.reqs", "wr.times")}
                out[dom.name()] = d
            if not partial:
                return out
            time.sleep(0.3)
        raise AssertionError(f"libvirt left out the block counters of {partial} in 10 samples "
                             "(a domain job held by another client?)")

    def window(self, seconds):
        """Per VM and disk over `seconds`: ops, ops/s, avg latency (ms); plus
        the host TCP RetransSegs delta."""
        r0 = retrans_segs()
        t0 = time.monotonic()
        a = self.block_stats()
        time.sleep(seconds)
        b = self.block_stats()
        dt = time.monotonic() - t0
        r1 = retrans_segs()
        res = {"retrans": r1 - r0, "seconds": dt, "vms": {}}
        for name in self.vm_names:
            res["vms"][name] = {}
            for dev in ("vda", "vdb"):
                x, y = a[name][dev], b[name][dev]
                ops = (y["rd.reqs"] + y["wr.reqs"]) - (x["rd.reqs"] + x["wr.reqs"])
                ns = (y["rd.times"] + y["wr.times"]) - (x["rd.times"] + x["wr.times"])
                res["vms"][name][dev] = {
                    "ops": ops, "ops_per_s": ops / dt,
                    "avg_ms": (ns / ops / 1e6) if ops > 0 else None,
                    "rd_ops": y["rd.reqs"] - x["rd.reqs"],
                    "wr_ops": y["wr.reqs"] - x["wr.reqs"]}
        return res


def format_window(label, w):
    lines = [f"{label}: {w['seconds']:.1f}s, host RetransSegs +{w['retrans']}"]
    for name, disks in w["vms"].items():
        for dev, d in disks.items():
            lat = "-" if d["avg_ms"] is None else f"{d['avg_ms']:.3f} ms"
            lines.append(f"  {name} {dev}: {d['ops_per_s']:.1f} ops/s avg {lat}")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def lab():
    reason = _skip_reason()
    if reason:
        print(f"SKIP kvmscope lab tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    # One lab per machine: concurrent pytest sessions (several engineers, or a
    # developer and CI) take turns instead of tearing each other's lab down.
    import fcntl

    lock = open(LOCK_PATH, "w")
    t_wait = time.monotonic()
    fcntl.flock(lock, fcntl.LOCK_EX)
    if time.monotonic() - t_wait > 1:
        print(f"\nwaited {time.monotonic() - t_wait:.0f}s for the lab lock {LOCK_PATH}", file=sys.stderr)
    lab = Lab()
    try:
        lab.run("down")              # clean slate (no-op when nothing is up)
        t0 = time.monotonic()
        lab.run("up", "--vms", 2, "--timeout", 300)
        lab.up_seconds = time.monotonic() - t0
        print(f"\nlab up took {lab.up_seconds:.1f}s", file=sys.stderr)
        lab.status = lab.status_json(interval=1.0)
        yield lab
    finally:
        lab.close()
        p = lab.run("down", check=False)
        lock.close()
        if p.returncode != 0 and not lab.down_done:
            raise AssertionError(f"lab down failed at teardown: {p.stderr}")


@pytest.fixture(scope="module")
def kernel_host(lab, request):
    """The kernel-initiator host kvmslab-kh on the session's lab (tests/lab/kernelhost.py):
    `lab up --vms N --kernel-host` (N: the VMs the lab has) when a module first asks for it, `lab kernel-host stop` when that
    module ends: a TCG guest left running (its O_DIRECT load, its agent, its firmware-only VM) would
    take most of a CPU from every later lab module, whose timing margins (a healthy lab without a
    warning, throttle ratios) assume the lab's own VMs alone. A module's ``KERNEL_HOST_UP_ARGS`` (e.g.
    ``("--kernel-host-probes", "off")``) are added to that `lab up`."""
    from tests.lab.kernelhost import KernelHost

    t0 = time.monotonic()
    # on the session's lab as it is (a late module may have re-upped it with 4 VMs: Lab.ensure_vms)
    vms = len(lab.status_json(interval=0.5).get("vms") or []) or 2
    lab.run("up", "--vms", vms, "--kernel-host", *getattr(request.module, "KERNEL_HOST_UP_ARGS", ()),
            "--timeout", 300)
    up = time.monotonic() - t0
    st = lab.status_json(interval=0.5)
    assert st["kernel_hosts"], st
    kh = KernelHost(st["kernel_hosts"][0])
    kh.up_seconds = up
    kh.status = st
    print(f"\nkernel host {kh.name} up in {up:.1f}s (guest ready after "
          f"{kh.record['ready_after_s']}s; steps {kh.record.get('boot_marks')})", file=sys.stderr)
    try:
        yield kh
    finally:
        lab.run("kernel-host", "stop", check=False)
