"""Fuzz the kernel iSCSI source (agent/sources/iscsi_kernel.py) end to end on a
sysfs tree built like the kernel's (tests/fixtures/sysfs_iscsi.py) whose attribute
files hold random bytes (invalid UTF-8, huge or Unicode numbers, empty), with
``iscsiadm -m session -r SID -s`` answering random text or failing.

Property: ``collect()`` raises nothing but NoData and returns well-typed records."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import Config
from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.records.iscsi import IscsiSessions
from agent.sources import SourceContext
from agent.sources.iscsi_kernel import IscsiKernelSource
from tests.fixtures.sysfs_iscsi import Sess, build, stats_text
from tests.fuzz.conftest import examples
from tests.fuzz.mutate import lines_of
from tests.fuzz.typecheck import check

A = Sess(sid=1, host=7, target="iqn.2003-01.org.linux-iscsi.stor1:lun-db", portal="198.18.1.2", disk="sdb",
         devno="8:16", lun=1)
B = Sess(sid=2, host=8, target="iqn.2003-01.org.linux-iscsi.stor1:lun-db", portal="fd00::2", disk="sdc",
         devno="8:32", lun=1)
SESSION = "class/iscsi_session/session{sid}/"
CONN = "class/iscsi_connection/connection{sid}:0/"
ATTRS = ([SESSION + a for a in ("targetname", "state", "recovery_tmo", "tpgt", "ifacename", "initiatorname")]
         + [CONN + a for a in ("address", "port", "persistent_address", "persistent_port", "local_port", "state",
                               "ping_tmo", "recv_tmo")]
         + ["class/iscsi_host/host{host}/netdev", "class/iscsi_host/host{host}/ipaddress", "block/{disk}/dev"])
VALUE = st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"\n", b"\xff\xfe", "٣".encode(), "²".encode(),
                                                           b"-1", b"9" * 500, b"<NULL>", b"1_0", b" 3260 "]),
                  st.text(max_size=20).map(str.encode))
STATS = [stats_text(A), stats_text(B, digest_err=3)]


class Runner:
    def __init__(self, answers):
        self.answers = answers

    def __call__(self, argv, timeout):
        a = self.answers[int(argv[4]) % len(self.answers)] if self.answers else ""
        if isinstance(a, Exception):
            raise a
        return a


@settings(max_examples=examples(0.5))
@given(st.dictionaries(st.tuples(st.sampled_from(ATTRS), st.sampled_from([0, 1])), VALUE, max_size=8),
       st.lists(st.one_of(lines_of([ln for t in STATS for ln in t.splitlines()]),
                          st.sampled_from([RuntimeError("iscsiadm timed out after 2s"),
                                           FileNotFoundError("iscsiadm not installed")])), max_size=3),
       st.sets(st.sampled_from(["device", "conn", "host"]), max_size=2))
def test_collect_on_a_garbled_sysfs_tree(values, answers, removed):
    with tempfile.TemporaryDirectory(prefix="kvmscope-fuzz-sysfs-") as tmp:
        root = Path(tmp)
        sys_root = build(root / "sys", [A, B], multipath={"dm-0:mpatha": ["sdb", "sdc"]})
        for (attr, i), value in values.items():
            s = (A, B)[i]
            p = sys_root / attr.format(sid=s.sid, host=s.host, disk=s.disk)
            p.write_bytes(value)
        for what in removed:  # half-gone objects, as during a logout
            link = {"device": SESSION.format(sid=1) + "device", "conn": CONN.format(sid=2).rstrip("/"),
                    "host": "class/iscsi_host/host7"}[what]
            (sys_root / link).unlink()
        src = IscsiKernelSource(SourceContext(Config(), HostPaths(procfs=root / "proc", sysfs=sys_root)),
                                runner=Runner(answers))
        try:
            got = src.collect()
        except NoData:
            return
        check(got, IscsiSessions)
        assert [s.sid for s in got.sessions] + list(got.vanished) != []
