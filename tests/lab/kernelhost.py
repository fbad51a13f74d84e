"""Test-side helper for the lab's kernel-initiator host kvmslab-kh
(`lab up --kernel-host`, deploy/lab/kvmslab/kernelhost.py).

Commands run in the guest through its agent (deploy/lab/kvmslab/guestagent.py:
one JSON request per TCP connection on the host-only link 198.18.10.2:7001),
so a test reads the guest's own iscsiadm, multipathd, dmsetup, sysfs and
kvmscope with no ssh and no serial console:

    kh.run("iscsiadm", "-m", "session")          # -> stdout (AssertionError if rc != 0)
    kh.exec("iscsiadm", "-m", "session", check=False)   # -> {rc, stdout, stderr, seconds}
    kh.sh("cat /sys/class/iscsi_session/*/state")
    kh.read("/sys/block/dm-0/stat")
    kh.kvmscope("sessions", "--json")            # the checkout's kvmscope in the guest, parsed JSON

The `kernel_host` fixture (tests/lab/conftest.py) brings it up on the
session's lab once per module and removes it (`lab kernel-host stop`) after.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "deploy", "lab"))
from kvmslab.guestagent import guest_run  # noqa: E402

GUEST_CONFIG = "/etc/kvmscope/config.yaml"


class KernelHost:
    def __init__(self, record: dict):
        self.record = record
        self.name = record["name"]
        self.addr = record["mgmt_addr"]
        self.port = record["agent_port"]
        self.map = record["map"]
        self.iqn = record["iqn"]
        self.vm = record.get("vm")
        self.up_seconds: float | None = None

    def exec(self, *argv, timeout: float = 60, check: bool = True, sh: str | None = None) -> dict:
        res = guest_run(self.addr, argv=argv if sh is None else None, sh=sh, timeout=timeout, port=self.port)
        if check and res["rc"] != 0:
            what = sh if sh is not None else " ".join(argv)
            raise AssertionError(f"in {self.name}: `{what}` exited {res['rc']}\n"
                                 f"stdout:\n{res['stdout']}\nstderr:\n{res['stderr']}")
        return res

    def run(self, *argv, timeout: float = 60) -> str:
        return self.exec(*argv, timeout=timeout)["stdout"]

    def sh(self, text: str, timeout: float = 60, check: bool = True) -> str:
        return self.exec(sh=text, timeout=timeout, check=check)["stdout"]

    def read(self, path: str) -> str:
        return self.run("cat", path)

    @staticmethod
    def kvmscope_exe() -> str:
        """The checkout's kvmscope (the guest sees the host's / read-only)."""
        return os.path.join(os.environ.get("KVMSCOPE_VENV") or os.path.join(REPO, ".venv"), "bin", "kvmscope")

    def kvmscope(self, *args, timeout: float = 180, standalone: bool = True):
        """The checkout's kvmscope inside the guest (its own config); JSON
        output parsed when it looks like JSON."""
        exe = self.kvmscope_exe()
        argv = [exe, "-c", GUEST_CONFIG] + (["--standalone"] if standalone else []) + list(args)
        out = self.run(*argv, timeout=timeout)
        return json.loads(out) if out.lstrip()[:1] in ("[", "{") else out

    def metrics(self, timeout: float = 20) -> str:
        """The guest agent's /metrics over its host-only link (TLS, client certificate)."""
        tls = self.record["metrics_tls"]
        ctx = ssl.create_default_context(cafile=tls["ca"])
        ctx.load_cert_chain(tls["cert"], tls["key"])
        with urllib.request.urlopen(self.record["metrics_url"], context=ctx, timeout=timeout) as r:
            return r.read().decode()

    def load_counters(self) -> tuple[float, int, int]:
        """(epoch, completed requests, errors) of the guest's O_DIRECT load on the map."""
        t, done, errs = self.read("/run/kvmslab-load.log").split()
        return float(t), int(done), int(errs)

    def stalls(self) -> list[tuple[float, float, float]]:
        """Every load request that took >= 1 s: (start, end, seconds), guest clock."""
        out = self.exec("cat", "/run/kvmslab-load.log.stalls", check=False)["stdout"]
        return [tuple(float(x) for x in line.split()) for line in out.splitlines() if line.strip()]
