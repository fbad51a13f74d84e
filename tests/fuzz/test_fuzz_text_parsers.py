"""Fuzz the text parsers of files and command outputs: /proc/net/snmp and
/proc/net/netstat (host_tcp), ``iscsiadm -m session -r SID -s`` (iscsi_kernel),
storage log lines and /dev/kmsg records (storage_log), iscsid.conf and
multipath.conf (doctor). None of them may raise: bad input is skipped or
reported as a message with its line, and what comes back is well-typed."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.doctor.parsers import (IscsidConf, MultipathConf, Queueing, int_setting, parse_iscsid_conf,
                                  parse_multipath_conf, queueing)
from agent.sources.host_tcp import parse_proc_net_groups
from agent.sources.iscsi_kernel import parse_iscsiadm_stats
from agent.sources.storage_log import (StorageLogEvent, classify, parse_journal_entry, parse_kmsg, parse_line,
                                       parse_syslog)
from tests.conftest import FIXTURES
from tests.fuzz.mutate import lines_of, mutated_text
from tests.fuzz.typecheck import check
from tests.fixtures.sysfs_iscsi import Sess, stats_text

# -- /proc/net/snmp, /proc/net/netstat -------------------------------------------------
PROC_NET = [Path("/proc/net/snmp").read_text(), Path("/proc/net/netstat").read_text(),
            "Tcp: RtoAlgorithm RtoMin RetransSegs\nTcp: 1 200 -1\n"]


@given(st.one_of(mutated_text(PROC_NET), lines_of([ln for t in PROC_NET for ln in t.splitlines()])))
def test_proc_net_groups(text):
    got = parse_proc_net_groups(text)
    check(got, dict[str, dict[str, int]])


# -- iscsiadm -m session -r SID -s -----------------------------------------------------
ISCSIADM = [stats_text(Sess(sid=3, host=7, target="iqn.2003-01.org.linux-iscsi.stor1:lun-db", portal="198.18.1.2"),
                       digest_err=2),
            "Stats for session [01]\n\ttxdata_octets: 10\n", "iscsiadm: No session found.\n"]


@given(st.one_of(mutated_text(ISCSIADM), lines_of([ln for t in ISCSIADM for ln in t.splitlines()]),
                 st.text()))
def test_iscsiadm_stats(text):
    got = parse_iscsiadm_stats(text)
    check(got, dict[str, int])
    assert all(v >= 0 for v in got.values())


# -- storage log lines and kmsg records --------------------------------------------------
LOG_LINES = [
    "2026-11-25T20:41:26.405123Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...",
    "2026-11-25T20:42:01.5Z qemu-system-x86_64: iSCSI CheckCondition: SENSE KEY:UNIT_ATTENTION(6) ASCQ:BUS_RESET(0x2900)",
    "Nov 25 20:00:01 kvm1 kernel: [ 1234.567890] connection2:0: detected conn error (1020)",
    "Nov 25 20:00:01 kvm1 kernel: connection10:0: ping timeout of 15 secs expired, recv timeout 5, last rx 4297",
    "Nov 25 20:00:02 kvm1 iscsid[812]: Kernel reported iSCSI connection 2:0 error (1020 - ISCSI_ERR_TCP_CONN_CLOSE: "
    "TCP connection closed) state (3)",
    "Nov 25 20:00:12 kvm1 iscsid[812]: connection2:0 is operational after recovery (1 attempts)",
    "2026-11-25T20:00:13.000000+00:00 kvm1 iscsid[812]: can't bind conn 3:0 to session 3, retcode -107 (115)",
    "Nov 25 20:03:00 kvm1 kernel: session3: session recovery timed out after 120 secs",
    "Nov 25 20:03:00 kvm1 kernel: I/O error, dev sdb, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2",
    "2026-11-25 20:41:26.123456789+0100 qemu-system-x86_64: iSCSI Failure: SENSE KEY:ILLEGAL_REQUEST(5)",
]
KMSG = ["6,1234,5678901,-;connection2:0: detected conn error (1020)\n SUBSYSTEM=iscsi",
        "3,99,1,c;sd 2:0:0:1: [sdb] tag#0 FAILED Result: hostbyte=DID_TRANSPORT_DISRUPTED"]
CLASSIFIED = {f.name for f in dataclasses.fields(StorageLogEvent)}


@given(st.one_of(mutated_text(LOG_LINES), st.sampled_from(LOG_LINES), st.text(max_size=300)),
       st.integers(1970, 9999) | st.none())
def test_storage_log_line(line, year):
    ts, msg, prog = parse_line(line, default_time=1.7e9, year=year)
    check((ts, msg, prog), tuple[float, str, str | None])
    c = classify(msg)
    if c is not None:
        assert set(c) <= CLASSIFIED and "kind" in c, c
        # the source builds its event from this dict: it must make a well-typed record
        ev = StorageLogEvent(time=ts, message=msg.strip(), origin="qemu", path="/x", offset=0, file_id="1:2:0", **c)
        check(ev, StorageLogEvent)


SYSLOG_PRI = ["<0>" + LOG_LINES[2], "<13>" + LOG_LINES[4], "<191>" + LOG_LINES[7], "<999>" + LOG_LINES[8]]
ZONES = [None, "UTC", "Europe/Berlin", "Pacific/Kiritimati", "America/St_Johns"]


@given(st.one_of(mutated_text(LOG_LINES + SYSLOG_PRI), st.sampled_from(LOG_LINES + SYSLOG_PRI), st.text(max_size=300)),
       st.floats(-1e11, 1e11, allow_nan=False) | st.none(), st.sampled_from(ZONES))
def test_storage_log_syslog_line(line, now, zone):
    from zoneinfo import ZoneInfo

    tz = ZoneInfo(zone) if zone else None
    got = parse_syslog(line, default_time=1.7e9, now=now, tz=tz)
    check(got, tuple[float, str, str | None, int | None])
    assert got[3] is None or 0 <= got[3] <= 23
    ts, msg, prog = parse_line(line, default_time=1.7e9, now=now, tz=tz)
    check((ts, msg, prog), tuple[float, str, str | None])
    if now is not None and ts != 1.7e9 and line[:1].isalpha():  # a classic syslog time: never a day ahead
        assert ts <= now + 86400


JOURNAL = ['{"__CURSOR": "s=7e1f;i=1a2b;b=4f9d;m=2d1c;t=5f2a;x=9", "__REALTIME_TIMESTAMP": "1795636801250000", '
           '"_TRANSPORT": "kernel", "_BOOT_ID": "4f9d", "MESSAGE": "connection2:0: detected conn error (1020)"}',
           '{"__CURSOR": "s=7e1f;i=1a2c", "_TRANSPORT": "syslog", "MESSAGE": [105, 255, 0]}']


@given(st.one_of(mutated_text(JOURNAL), st.text(max_size=200)))
def test_journal_entry(text):
    got = parse_journal_entry(text)
    check(got, typing.Optional[dict])
    if got is not None:
        check((got["cursor"], got["seqnum_id"], got["seqnum"], got["time"], got["message"], got["transport"],
               got["boot"]), tuple[str, str, int, float | None, str, str | None, str | None])


@given(st.one_of(mutated_text(KMSG), st.text(max_size=200)))
def test_kmsg_record(record):
    got = parse_kmsg(record)
    check(got, typing.Optional[tuple[int, str]])


# -- iscsid.conf, multipath.conf (doctor) ------------------------------------------------
ETC = FIXTURES / "etc"
ISCSID = [p.read_text() for p in ETC.rglob("iscsid.conf")] + [p.read_text() for p in ETC.rglob("default")]
MULTIPATH = [p.read_text() for p in ETC.rglob("*.conf") if "multipath" in str(p)]
ISCSID_KEYS = ["node.session.timeo.replacement_timeout", "node.conn[0].timeo.noop_out_interval",
               "node.conn[0].timeo.noop_out_timeout"]


@given(st.one_of(mutated_text(ISCSID), lines_of([ln for t in ISCSID for ln in t.splitlines()]
                                                + ["name =", "= 5", "a = \"", "k = 'v' w"])))
def test_iscsid_conf(text):
    conf = parse_iscsid_conf(text)
    check(conf, IscsidConf)
    for k in ISCSID_KEYS + list(conf.settings)[:5]:
        check(int_setting(conf, k), tuple[int | None, str])


@given(st.one_of(mutated_text(MULTIPATH), lines_of([ln for t in MULTIPATH for ln in t.splitlines()]
                                                   + ["blacklist { wwid }", "{", "}", "defaults {", "\"q", "! c"])))
def test_multipath_conf(text):
    conf = parse_multipath_conf(text, origin="multipath.conf")
    check(conf, MultipathConf)
    for name in ("defaults", "overrides"):
        sec = conf.section(name)
        if sec is not None:
            check(queueing(sec.values, name), Queueing)
    for dev in conf.devices() + conf.multipaths():
        check(queueing(dev.values, dev.name), Queueing)


def test_seeds_are_real():
    assert ISCSID and MULTIPATH and all(PROC_NET)
