"""libvirt domain XML and bulk stats are parsed defensively, one domain at a time:
a domain whose XML says LUN "²" (passes str.isdigit(), int() raises) or whose
stats carry a value of the wrong type is reported and degraded, and the other
domains come through. Literal XML, and libvirt's own test driver (a real
libvirt connection, in-process, domains defined by our XML)."""

from __future__ import annotations

import dataclasses

import pytest

from agent.config import Config
from agent.hostpaths import HostPaths
from agent.sources import SourceContext
from agent.sources._vm_common import parse_iscsi_url, split_iscsi_name
from agent.records.vms import DiskStats
from agent.sources.libvirt_vms import LibvirtSource, parse_block_stats, parse_domain_disks


def disk_xml(name="iqn.2025-01.io.kvmscope:t/1", port="3260", dev="vda"):
    return f"""<domain type='kvm'><name>x</name><devices>
      <disk type='network' device='disk'>
        <source protocol='iscsi' name='{name}'><host name='198.18.1.2' port='{port}'/></source>
        <target dev='{dev}' bus='virtio'/>
      </disk>
      <disk type='file' device='disk'><source file='/nonexistent/b.img'/><target dev='vdb'/></disk>
    </devices></domain>"""


@pytest.mark.parametrize("lun", ["²", "٣", "1²", "99999999999999999999999", "-1", " 1"])
def test_odd_lun_is_reported_not_raised(lun):
    problems: list = []
    vda, vdb = parse_domain_disks(disk_xml(name=f"iqn.2025-01.io.kvmscope:t/{lun}"), problems)
    assert vda.iqn == "iqn.2025-01.io.kvmscope:t" and vda.lun is None
    assert vdb.source == "/nonexistent/b.img"
    assert problems and "vda" in problems[0] and "LUN" in problems[0]


@pytest.mark.parametrize("port", ["²", "٣٢٦٠", "70000", "0x10"])
def test_odd_port_is_reported_not_raised(port):
    problems: list = []
    (vda, _) = parse_domain_disks(disk_xml(port=port), problems)
    assert vda.hosts == (("198.18.1.2", 3260),) and vda.lun == 1
    assert problems and "port" in problems[0]


def test_good_xml_has_no_problems():
    problems: list = []
    vda, vdb = parse_domain_disks(disk_xml(port="3261"), problems)
    assert (vda.iqn, vda.lun, vda.hosts) == ("iqn.2025-01.io.kvmscope:t", 1, (("198.18.1.2", 3261),))
    assert problems == []


def test_iscsi_name_helpers_take_ascii_digits_only():
    assert split_iscsi_name("iqn.x:t/²") == ("iqn.x:t", None)
    assert split_iscsi_name("iqn.x:t/7") == ("iqn.x:t", 7)
    assert split_iscsi_name("iqn.x:t") == ("iqn.x:t", 0)
    assert parse_iscsi_url("iscsi://198.18.1.2:3260/iqn.x:t/²")[3] is None
    assert parse_iscsi_url("iscsi://198.18.1.2:99999/iqn.x:t/1") == (None, None, None, None)


def test_block_stats_values_type_checked():
    stats = {"block.count": 3,
             "block.0.name": "vda", "block.0.rd.reqs": 5, "block.0.rd.bytes": 4096,
             "block.1.name": "vdb", "block.1.rd.reqs": "x", "block.1.wr.bytes": 10**400,
             "block.2.name": "vdc", "block.2.fl.reqs": 1, "block.2.fl.times": -1}
    bad: list = []
    out = parse_block_stats(stats, bad)
    assert out["vda"].rd_reqs == 5 and out["vda"].rd_bytes == 4096
    assert out["vda"] == DiskStats(rd_reqs=5, rd_bytes=4096) and out["vda"].histograms is None
    assert list(vars(out["vda"])) == [f.name for f in dataclasses.fields(DiskStats)]
    assert "vdb" not in out and "vdc" not in out
    assert sorted(w for w, _ in bad) == ["vdb rd.reqs", "vdb wr.bytes", "vdc fl.times"]
    bad = []
    assert parse_block_stats({"block.count": "x"}, bad) == {} and bad == [("block.count", "'x'")]
    assert parse_block_stats({"block.count": 10**9, "block.0.name": "vda", "block.0.wr.reqs": 1}, []).keys() == {"vda"}


def test_block_counters_left_out_by_nowait_are_no_stats_not_zeros():
    """NOWAIT while another client holds the domain's job: libvirt names the disks without their counters.
    Zeros there would be a counter reset and, the cycle after, every request since boot as one burst."""
    busy = {"block.count": 2, "block.0.name": "vda", "block.0.backingIndex": 1,
            "block.1.name": "vdb", "block.1.path": "/x.img", "state.state": 1}
    skipped: list = []
    assert parse_block_stats(busy, [], skipped) == {} and skipped == ["vda", "vdb"]
    # one counter present: the others are documented as possibly absent, and are 0
    out = parse_block_stats({"block.count": 1, "block.0.name": "vda", "block.0.fl.reqs": 3}, [], skipped := [])
    assert out["vda"].fl_reqs == 3 and out["vda"].rd_reqs == 0 and skipped == []


def test_domain_answered_without_counters_is_asked_again_then_reported(tmp_path):
    """The source asks a busy domain once more; a second answer without counters leaves that disk's
    stats None (no sample) and says why in the domain's error."""
    libvirt = pytest.importorskip("libvirt", reason="python3-libvirt not installed (make test installs it)")
    node = tmp_path / "node.xml"
    node.write_text(NODE)
    cfg = Config()
    cfg.libvirt.uri = f"test://{node}"
    src = LibvirtSource(SourceContext(cfg, HostPaths()))
    conn = src._connect(libvirt)
    asked_again: list = []
    full_on_retry = {"v": True}

    def rec(dom, stats, counters):
        out = dict(stats, **{"block.count": 1, "block.0.name": "vda"})
        if counters:
            out.update({"block.0.rd.reqs": 9, "block.0.rd.times": 90})
        return out

    class Conn:
        def __getattr__(self, name):
            return getattr(conn, name)

        def isAlive(self):  # noqa: N802 (libvirt's names)
            return True

        def getAllDomainStats(self, groups, flags):  # noqa: N802
            return [(d, rec(d, st, d.name() == "bad")) for d, st in conn.getAllDomainStats(groups, flags)]

        def domainListGetStats(self, doms, groups, flags):  # noqa: N802
            asked_again.extend(d.name() for d in doms)
            return [(d, rec(d, st, full_on_retry["v"])) for d, st in conn.domainListGetStats(doms, groups, flags)]

    src._conn = Conn()
    try:
        vms = {v.name: v for v in src.collect().vms}
        assert asked_again == ["good"]
        assert vms["good"].disks[0].stats.rd_reqs == 9 and vms["good"].error is None
        full_on_retry["v"] = False
        vms = {v.name: v for v in src.collect().vms}
        assert vms["good"].disks[0].stats is None
        assert "no I/O counters this cycle for vda" in vms["good"].error
        assert vms["bad"].disks[0].stats.rd_reqs == 9
    finally:
        src.close()


NODE = """<node>
  <domain type='test'>
    <name>bad</name><uuid>6b0a1e44-2222-4a4a-9c9c-000000000001</uuid><memory>65536</memory><os><type>hvm</type></os>
    <devices><disk type='network' device='disk'>
      <source protocol='iscsi' name='iqn.2025-01.io.kvmscope:t/²'><host name='198.18.1.2' port='3260'/></source>
      <target dev='vda' bus='virtio'/></disk></devices>
  </domain>
  <domain type='test'>
    <name>good</name><uuid>6b0a1e44-2222-4a4a-9c9c-000000000002</uuid><memory>65536</memory><os><type>hvm</type></os>
    <devices><disk type='network' device='disk'>
      <source protocol='iscsi' name='iqn.2025-01.io.kvmscope:t/1'><host name='198.18.1.2' port='3260'/></source>
      <target dev='vda' bus='virtio'/></disk></devices>
  </domain>
</node>"""


def test_one_bad_domain_does_not_fail_the_source(tmp_path):
    pytest.importorskip("libvirt", reason="python3-libvirt not installed (make test installs it)")
    node = tmp_path / "node.xml"
    node.write_text(NODE)
    cfg = Config()
    cfg.libvirt.uri = f"test://{node}"
    src = LibvirtSource(SourceContext(cfg, HostPaths()))
    try:
        data = src.collect()
    finally:
        src.close()
    vms = {v.name: v for v in data.vms}
    assert set(vms) == {"bad", "good"}
    assert vms["good"].error is None and vms["good"].disks[0].lun == 1
    bad = vms["bad"]
    assert bad.disks[0].iqn == "iqn.2025-01.io.kvmscope:t" and bad.disks[0].lun is None
    assert "LUN" in bad.error and "²" in bad.error
    assert src.dropped["invalid_value"] == 1


def test_ipv6_portal_host_is_canonical():
    xml = disk_xml().replace("198.18.1.2", "FD00:6B76:0:0::2")
    (vda, _) = parse_domain_disks(xml)
    assert vda.hosts == (("fd00:6b76::2", 3260),)
    assert parse_iscsi_url("iscsi://[FD00:6b76::0002]:3261/iqn.x:t/1") == ("fd00:6b76::2", 3261, "iqn.x:t", 1)


def test_domain_xml_is_read_once_and_again_when_the_disks_change(tmp_path):
    """The disks parsed from a domain's XML are kept; each cycle they get that cycle's counters, the same
    records as a fresh parse would give; a disk set that changes in the stats (hot-plug) re-reads the XML."""
    pytest.importorskip("libvirt", reason="python3-libvirt not installed (make test installs it)")
    node = tmp_path / "node.xml"
    node.write_text(NODE)
    cfg = Config()
    cfg.libvirt.uri = f"test://{node}"
    src = LibvirtSource(SourceContext(cfg, HostPaths()))
    conn = src._connect(__import__("libvirt"))
    reads, extra = [], {"n": 1, "disks": ["vda"]}

    class Conn:
        def __getattr__(self, name):
            return getattr(conn, name)

        def isAlive(self):  # noqa: N802 (libvirt's names)
            return True

        def getAllDomainStats(self, groups, flags):  # noqa: N802
            out = []
            for dom, stats in conn.getAllDomainStats(groups, flags):
                stats = dict(stats, **{"block.count": len(extra["disks"])})
                for i, t in enumerate(extra["disks"]):
                    stats.update({f"block.{i}.name": t, f"block.{i}.rd.reqs": extra["n"], f"block.{i}.rd.times": 7})
                out.append((Dom(dom), stats))
            return out

    class Dom:
        def __init__(self, dom):
            self._dom = dom

        def __getattr__(self, name):
            return getattr(self._dom, name)

        def XMLDesc(self, flags):  # noqa: N802
            reads.append(self._dom.name())
            return self._dom.XMLDesc(flags)

    src._conn = Conn()
    try:
        first = {v.name: v for v in src.collect().vms}
        assert sorted(reads) == ["bad", "good"]
        extra["n"] = 5
        second = {v.name: v for v in src.collect().vms}
        assert sorted(reads) == ["bad", "good"]  # from the cache
        for name in ("good", "bad"):
            a, b = first[name].disks[0], second[name].disks[0]
            assert b.stats.rd_reqs == 5 and a.stats.rd_reqs == 1
            assert b == dataclasses.replace(a, stats=b.stats)  # every other field as parsed
            for rec in (a, b, a.stats, b.stats):  # made without __init__ (the cache, parse_block_stats): as if with
                names = [f.name for f in dataclasses.fields(rec)]
                assert list(vars(rec)) == names and rec == type(rec)(**{n: getattr(rec, n) for n in names})
            assert hash(b.stats) == hash(dataclasses.replace(b.stats))
        assert second["bad"].error == first["bad"].error and "LUN" in second["bad"].error
        extra["disks"] = ["vda", "vdz"]  # a disk appeared: the XML is read again
        src.collect()
        assert sorted(reads) == ["bad", "bad", "good", "good"]
    finally:
        src.close()
