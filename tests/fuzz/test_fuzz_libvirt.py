"""Fuzz the libvirt source's parsers (agent/sources/libvirt_vms.py): domain XML as
a domain's definer may write it (disks built from random attribute values, including
Unicode digits, signs and huge numbers, and real XML mutated byte-wise), and
bulk-stats records with values of any type.

Property: ``parse_domain_disks`` raises nothing but ET.ParseError (not XML at all)
and returns well-typed VmDisk records whose port and LUN are in range;
``parse_block_stats`` never raises and returns well-typed DiskStats."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

from hypothesis import given
from hypothesis import strategies as st

from agent.records.vms import DiskStats, VmDisk
from agent.sources.libvirt_vms import parse_block_stats, parse_domain_disks
from tests.fixtures.etc.hosts import block_disk, domain_xml, iscsi_disk
from tests.fuzz.mutate import JSON, mutated_bytes
from tests.fuzz.typecheck import check

REAL = [domain_xml("web01", iscsi_disk("vda", "iqn.2025-01.io.kvmscope.lab:vm0-vda", 1, "198.18.1.2",
                                       "cache='none' io='native' error_policy='stop'")
                   + block_disk("vdb", "/dev/mapper/mpatha", "cache='none'")),
        domain_xml("db01", "<disk type='file' device='disk'><source file='/var/lib/x.img'/><target dev='vda'/></disk>"
                   "<disk type='volume' device='lun'><source pool='p' volume='v'/><target dev='sdb'/></disk>")]
# the characters that broke or could break number parsing: Unicode digits, signs, spaces, underscores
NUMBERISH = st.one_of(st.integers(-2**70, 2**70).map(str), st.sampled_from(["²", "٣", "1_0", " 1", "+1", "-0", "",
                                                                              "3260 ", "0x10", "99999999999999999999999"]),
                      st.text(max_size=6))
attr = st.one_of(NUMBERISH, st.text(max_size=30))


@st.composite
def disk_xml(draw):
    kind = draw(st.sampled_from(["network", "file", "block", "volume", "dir", ""]))
    name = draw(st.one_of(st.just("iqn.2025-01.io.x:t"), st.text(max_size=20))) + "/" + draw(NUMBERISH)
    hosts = "".join(f"<host name={quoteattr(draw(attr))} port={quoteattr(draw(NUMBERISH))}/>"
                    for _ in range(draw(st.integers(0, 3))))
    src = draw(st.sampled_from([
        f"<source protocol={quoteattr(draw(st.sampled_from(['iscsi', 'nbd', ''])))} name={quoteattr(name)}>{hosts}</source>",
        f"<source file={quoteattr(draw(attr))}/>", f"<source dev={quoteattr(draw(attr))}/>",
        f"<source pool={quoteattr(draw(attr))} volume={quoteattr(draw(attr))}/>", ""]))
    drv = draw(st.sampled_from(["", f"<driver cache={quoteattr(draw(attr))} io={quoteattr(draw(attr))}/>"]))
    target = draw(st.sampled_from(["", "<target/>", f"<target dev={quoteattr(draw(attr))}/>"]))
    device = draw(st.sampled_from(["disk", "lun", "cdrom", ""]))
    return f"<disk type={quoteattr(kind)} device={quoteattr(device)}>{drv}{src}{target}</disk>"


def parse_ok(xml: str):
    problems: list = []
    try:
        disks = parse_domain_disks(xml, problems)
    except ET.ParseError:
        return
    check(disks, list[VmDisk])
    assert all(isinstance(p, str) for p in problems)
    for d in disks:
        assert all(0 <= port <= 65535 for _h, port in d.hosts), d.hosts
        assert d.lun is None or 0 <= d.lun < 2**64, d.lun


@given(st.lists(disk_xml(), max_size=4).map(lambda ds: domain_xml("vm", "".join(ds))))
def test_domain_xml_built_from_odd_values(xml):
    parse_ok(xml)


@given(mutated_bytes([x.encode() for x in REAL]).map(lambda b: b.decode("utf-8", "replace")))
def test_real_domain_xml_mutated(xml):
    parse_ok(xml)


FIELDS = ["name", "rd.reqs", "rd.bytes", "rd.times", "wr.reqs", "wr.bytes", "wr.times", "fl.reqs", "fl.times"]
stat_value = st.one_of(st.integers(-1, 2**65), JSON, st.sampled_from(["vda", "vdb"]))


@given(st.dictionaries(st.one_of(st.just("block.count"),
                                 st.builds(lambda i, f: f"block.{i}.{f}", st.integers(0, 3), st.sampled_from(FIELDS))),
                       stat_value, max_size=20))
def test_block_stats(stats):
    bad: list = []
    got = parse_block_stats(stats, bad)
    check(got, dict[str, DiskStats])


def test_seeds_parse():
    assert [d.target for d in parse_domain_disks(REAL[0])] == ["vda", "vdb"]
