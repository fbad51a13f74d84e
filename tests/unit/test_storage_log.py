"""storage_log: parsing the lines operators grep for, and reading them exactly once from
files a real writer process appends to while real logrotate (copytruncate, as Debian's
libvirtd.qemu) and a virtlogd-style rename rotate them, across agent restarts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from agent.config import Config
from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.sources import SourceContext
from agent.sources.storage_log import StorageLogSource
from agent.sources.storage_log_parse import classify, parse_kmsg, parse_line


@pytest.mark.parametrize(
    "line,kind,extra",
    [
        ("2026-11-25T20:41:26.405123Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...", "nop_timeout", {}),
        ("2026-11-25T20:41:27.000001Z qemu-system-x86_64: iSCSI: failed to sent NOP-Out. Disabling NOP messages.",
         "nop_out_failed", {}),
        ("2026-11-25T20:42:01.5Z qemu-system-x86_64: iSCSI CheckCondition: SENSE KEY:UNIT_ATTENTION(6) ASCQ:BUS_RESET(0x2900)",
         "check_condition", {"sense_key": "UNIT_ATTENTION(6)", "ascq": "BUS_RESET(0x2900)"}),
        ("Nov 25 20:00:01 kvm1 kernel: [ 1234.567890] connection2:0: detected conn error (1020)", "conn_error",
         {"cid": "2:0", "sid": 2, "error_code": 1020, "error_name": "ISCSI_ERR_TCP_CONN_CLOSE"}),
        ("Nov 25 20:00:01 kvm1 kernel: connection10:0: ping timeout of 15 secs expired, recv timeout 5, last rx 4297, "
         "last ping 4298, now 4302", "ping_timeout", {"cid": "10:0", "sid": 10}),
        ("Nov 25 20:00:02 kvm1 iscsid[812]: Kernel reported iSCSI connection 2:0 error (1020 - ISCSI_ERR_TCP_CONN_CLOSE: "
         "TCP connection closed) state (3)", "conn_error", {"cid": "2:0", "error_code": 1020}),
        ("Nov 25 20:00:12 kvm1 iscsid[812]: connection2:0 is operational after recovery (1 attempts)", "recovered",
         {"cid": "2:0"}),
        ("2026-11-25T20:00:13.000000+00:00 kvm1 iscsid[812]: can't bind conn 3:0 to session 3, retcode -107 (115)",
         "bind_failed", {"sid": 3}),
        ("Nov 25 20:03:00 kvm1 kernel: session3: session recovery timed out after 120 secs", "recovery_timeout", {"sid": 3}),
        ("Nov 25 20:03:00 kvm1 kernel: I/O error, dev sdb, sector 2048 op 0x1:(WRITE) flags 0x800 phys_seg 1 prio class 2",
         "io_error", {}),
        ("Nov 25 20:03:00 kvm1 kernel: connection1:0: detected conn error (1011)", "conn_error",
         {"error_name": "ISCSI_ERR_CONN_FAILED"}),
        ("Nov 25 20:03:01 kvm1 kernel: device-mapper: multipath: 253:0: Failing path 8:16.", "mpath_fail_path",
         {"map": "253:0", "device": "8:16"}),
        ("Nov 25 20:03:40 kvm1 kernel: device-mapper: multipath: 253:0: Reinstating path 8:16.",
         "mpath_reinstate_path", {"map": "253:0", "device": "8:16"}),
        ("Nov 25 20:03:01 kvm1 multipathd[301]: checker failed path 8:16 in map mpatha", "mpath_checker_failed",
         {"map": "mpatha", "device": "8:16"}),
        ("Nov 25 20:03:01 kvm1 multipathd[301]: mpatha: remaining active paths: 1", "mpath_remaining_paths",
         {"map": "mpatha", "active_paths": 1}),
        ("2026-11-25T20:03:05.000000+00:00 kvm1 multipathd[301]: mpatha: Entering recovery mode: max_retries=12",
         "mpath_queueing", {"map": "mpatha", "retries": 12}),
        ("Nov 25 20:04:05 kvm1 multipathd[301]: mpatha: Disable queueing", "mpath_queueing_disabled", {"map": "mpatha"}),
        ("Nov 25 20:04:06 kvm1 multipathd[301]: mpatha: Recovered to normal mode", "mpath_recovered", {"map": "mpatha"}),
        ("Nov 25 20:04:06 kvm1 multipathd[301]: 8:16: reinstated", "mpath_reinstated", {"device": "8:16"}),
        ("Nov 25 20:03:30 kvm1 kernel: sd 2:0:0:1: [sdb] tag#12 timing out command, waited 30s", "scsi_timeout",
         {"device": "sdb"}),
    ],
)
def test_classify_real_lines(line, kind, extra):
    ts, msg, _prog = parse_line(line, default_time=0.0, year=2026)
    assert ts > 1.7e9
    c = classify(msg)
    assert c is not None and c["kind"] == kind
    for k, v in extra.items():
        assert c[k] == v


def test_lines_of_no_interest_and_odd_input():
    for line in ("2026-11-25T20:41:26.405123Z char device redirected to /dev/pts/1 (label charserial0)",
                 "2026-11-25 20:41:25.000+0000: starting up libvirt version: 9.0.0", "", "\x00\xff garbage"):
        assert classify(parse_line(line, default_time=1.0)[1]) is None
    assert parse_line("no time here", default_time=5.0) == (5.0, "no time here", None)
    assert parse_kmsg("3,1234,5678901,-;connection2:0: detected conn error (1020)\n SUBSYSTEM=iscsi") == (
        1234, "connection2:0: detected conn error (1020)")
    assert parse_kmsg("garbage") is None


WRITER = textwrap.dedent(r'''
    import sys, time, datetime, os
    path = sys.argv[1]
    f = open(path, "a", buffering=1)
    kinds = ["iSCSI: NOP timeout. Reconnecting...", "iSCSI: failed to sent NOP-Out. Disabling NOP messages.",
             "char device redirected to /dev/pts/3 (label charserial0)",
             "iSCSI CheckCondition: SENSE KEY:UNIT_ATTENTION(6) ASCQ:BUS_RESET(0x2900)"]
    n = 0
    for cmd in sys.stdin:
        cmd = cmd.split()
        if cmd[0] == "write":
            for _ in range(int(cmd[1])):
                ts = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                f.write(f"{ts} qemu-system-x86_64: {kinds[n % 4]}\n")  # QEMU -msg timestamp=on format
                n += 1
                time.sleep(0.0005)
        elif cmd[0] == "partial":
            f.write("2026-11-25T20:41:26.000000Z qemu-system-x86_64: iSCSI: NOP tim")
            f.flush()
        elif cmd[0] == "reopen":  # what virtlogd does after renaming the file away
            f.close()
            f = open(path, "a", buffering=1)
        print("ok", n, flush=True)
''')


class Writer:
    def __init__(self, path):
        self.p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)

    def do(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline().split()[1])

    def close(self):
        self.p.stdin.close()
        self.p.wait(10)


def _source(tmp_path, start_at_end=True, owns_state=True):
    cfg = Config()
    cfg.storage_log.qemu_logs = [str(tmp_path / "qemu" / "*.log")]
    cfg.storage_log.kernel_logs = []
    cfg.storage_log.state_dir = str(tmp_path / "state")
    cfg.storage_log.start_at_end = start_at_end
    cfg.storage_log.kernel_source = "files"  # the file tests never read this host's /dev/kmsg
    return StorageLogSource(SourceContext(cfg, HostPaths(), owns_state=owns_state))  # as `kvmscope run` does


def _storage_lines(tmp_path):
    """Every storage line the writer wrote, by its (unique) timestamp, from all files."""
    out = []
    for p in sorted((tmp_path / "qemu").iterdir()):
        for line in p.read_text().splitlines(keepends=True):
            if not line.endswith("\n"):
                continue  # the writer's unfinished line
            ts, msg, _ = parse_line(line, default_time=0)
            if classify(msg):
                out.append(ts)
    return out


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate not installed (deploy/setup.sh installs it)")
def test_real_writer_rotations_and_restarts_lose_and_repeat_nothing(tmp_path):
    (tmp_path / "qemu").mkdir()
    log = tmp_path / "qemu" / "web01.log"
    w = Writer(log)
    got = []
    try:
        w.do("write 8")  # history before the agent ever ran: skipped (start_at_end)
        src = _source(tmp_path)
        got += src.collect().events
        assert got == []
        w.do("write 40")
        got += src.collect().events
        w.do("write 40")  # not read yet when logrotate copies and truncates
        conf = tmp_path / "lr.conf"
        conf.write_text(f"{tmp_path}/qemu/*.log {{\n size 1\n rotate 4\n compress\n delaycompress\n copytruncate\n missingok\n}}\n")
        subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "lr.state"), str(conf)], check=True)
        assert (tmp_path / "qemu" / "web01.log.1").exists()
        w.do("write 40")
        got += src.collect().events
        # graceful restart
        src.close()
        w.do("write 20")
        src = _source(tmp_path)
        got += src.collect().events
        # virtlogd-style: rename away, the writer keeps writing to the old inode, then reopens
        w.do("write 12")
        (tmp_path / "qemu" / "web01.log").rename(tmp_path / "qemu" / "web01.log.0")
        w.do("write 12")
        w.do("reopen")
        w.do("write 12")
        w.do("partial")  # a line without its newline yet: not consumed
        got += src.collect().events
        src.close()
    finally:
        w.close()
    times = [e.time for e in got]
    assert len(times) == len(set(times)), "a line was read twice"
    written = _storage_lines(tmp_path)
    # the 8 lines from before the first start are the only ones not read (6 of them storage lines)
    assert sorted(times) == sorted(written)[6:]
    assert all(e.vm == "web01" and e.origin == "qemu" for e in got)
    assert {e.kind for e in got} == {"nop_timeout", "nop_out_failed", "check_condition"}
    assert not any("NOP tim" == e.message[-7:] for e in got)


def test_crash_before_positions_are_saved_rereads_with_the_same_ids(tmp_path):
    from agent.shipping.docs_storage_log import log_docs

    (tmp_path / "qemu").mkdir()
    log = tmp_path / "qemu" / "vm2.log"
    w = Writer(log)
    try:
        src = _source(tmp_path, start_at_end=False)
        w.do("write 10")
        first = src.collect().events
        src.collect()  # saves the first cycle's positions
        w.do("write 10")
        second = src.collect().events  # these positions are never saved: kill -9 now
        src2 = _source(tmp_path, start_at_end=False)
        again = src2.collect().events
    finally:
        w.close()
    assert len(first) + len(second) == len(_storage_lines(tmp_path))
    assert [(e.file_id, e.offset) for e in again] == [(e.file_id, e.offset) for e in second]
    ids = lambda evs: [d.subject for d in log_docs(type("D", (), {"events": evs}), None, None, None)]  # noqa: E731
    assert ids(again) == ids(second)  # same document ids: Elasticsearch keeps one copy


def test_truncation_and_inode_reuse_start_a_new_generation(tmp_path):
    (tmp_path / "qemu").mkdir()
    log = tmp_path / "qemu" / "vm3.log"
    log.write_text("2026-11-25T20:41:26.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    src = _source(tmp_path, start_at_end=False)
    a = src.collect().events
    log.write_text("2026-11-25T20:41:27.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")  # same size
    b = src.collect().events
    assert len(a) == len(b) == 1 and a[0].file_id != b[0].file_id and a[0].offset == b[0].offset == 0


def test_no_logs_is_no_data(tmp_path):
    with pytest.raises(NoData):
        _source(tmp_path).collect()


def test_positions_file_is_json_and_survives_garbage(tmp_path):
    (tmp_path / "qemu").mkdir()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "positions.json").write_text("{not json")
    log = tmp_path / "qemu" / "x.log"
    log.write_text("2026-11-25T20:41:26.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    src = _source(tmp_path)
    assert src.collect().events == ()  # unreadable positions: start at the end, no replay of old lines
    src.close()
    saved = json.loads((tmp_path / "state" / "positions.json").read_text())
    st = log.stat()
    pos = saved["files"][str(log)]
    assert (pos["dev"], pos["ino"], pos["offset"]) == (st.st_dev, st.st_ino, st.st_size), pos
    # the rewritten file is used by the next start: only the line appended since is read
    with log.open("a") as f:
        f.write("2026-11-25T20:41:27.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    src = _source(tmp_path)
    (ev,) = src.collect().events
    src.close()
    assert ev.offset == st.st_size and ev.kind == "nop_timeout"


def test_a_log_that_appears_after_the_first_cycle_is_read_from_its_start(tmp_path):
    (tmp_path / "qemu").mkdir()
    src = _source(tmp_path)  # start_at_end: only for files present at the very first cycle
    with pytest.raises(NoData):
        src.collect()
    (tmp_path / "qemu" / "new.log").write_text(
        "2026-11-25T20:41:26.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    assert len(src.collect().events) == 1
    src.close()
    # also after a restart: the state says this is not the first start any more
    (tmp_path / "qemu" / "newer.log").write_text(
        "2026-11-25T20:41:27.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    assert [e.vm for e in _source(tmp_path).collect().events] == ["newer"]


@pytest.mark.skipif(not __import__("os").access("/dev/kmsg", __import__("os").W_OK),
                    reason="/dev/kmsg not writable (needs root)")
def test_kernel_messages_from_dev_kmsg_once_each(tmp_path):
    import uuid

    (tmp_path / "qemu").mkdir()

    def src():
        s = _source(tmp_path)
        s.cfg.kernel_source = "kmsg"
        return s

    s = src()
    assert [e for e in s.collect().events if e.path == "/dev/kmsg"] == []  # history at the first start: skipped
    tag = uuid.uuid4().hex[:8]
    with open("/dev/kmsg", "w") as k:  # a real kernel ring buffer record
        k.write(f"kvmscope-test-{tag}: connection77:0: detected conn error (1020)\n")
    got = [e for e in s.collect().events if tag in e.message]
    assert len(got) == 1 and got[0].kind == "conn_error" and got[0].cid == "77:0" and got[0].origin == "kernel"
    assert not [e for e in s.collect().events if tag in e.message]
    s.close()
    assert not [e for e in src().collect().events if tag in e.message]  # not again after a restart


@pytest.mark.skipif(not __import__("os").access("/dev/kmsg", __import__("os").W_OK),
                    reason="/dev/kmsg not writable (needs root)")
def test_dev_kmsg_stays_open_and_a_cycle_reads_only_newer_records(tmp_path, monkeypatch):
    import os
    import uuid

    from agent.sources import storage_log

    (tmp_path / "qemu").mkdir()
    s = _source(tmp_path)
    s.cfg.kernel_source = "kmsg"
    s.collect()
    fd = s._kmsg_fd
    seen = s._tailer.kmsg["seq"]
    with open("/dev/kmsg", "w") as k:
        k.write(f"kvmscope-test-{uuid.uuid4().hex[:8]}: one more record\n")
    records = []
    real_read = os.read

    def read(f, n):
        b = real_read(f, n)
        if f == fd:
            records.append(b)
        return b

    monkeypatch.setattr(storage_log.os, "read", read)
    s.collect()
    assert s._kmsg_fd == fd
    seqs = [int(r.split(b";", 1)[0].split(b",")[1]) for r in records if r]
    assert seqs and min(seqs) > seen  # not the whole ring again: only what came after the last cycle
    s.close()
    assert s._kmsg_fd is None
    with pytest.raises(OSError):
        os.fstat(fd)


def test_cli_processes_never_move_the_agents_positions(tmp_path):
    (tmp_path / "qemu").mkdir()
    log = tmp_path / "qemu" / "vm9.log"
    agent = _source(tmp_path, start_at_end=False)
    log.write_text("")
    agent.collect()
    agent.close()
    log.write_text("2026-11-25T20:41:26.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    cli = _source(tmp_path, start_at_end=False, owns_state=False)  # e.g. `kvmscope paths` collecting in-process
    assert len(cli.collect().events) == 1
    cli.collect()
    cli.close()
    assert len(_source(tmp_path, start_at_end=False).collect().events) == 1  # the agent still gets the line


@pytest.mark.parametrize("bad", ["[]", '"x"', "null", '{"files": []}', '{"files": {"/x.log": 3}, "kmsg": []}',
                                 '{"files": {"QEMU": {"dev": "a", "ino": 1, "gen": 0, "offset": 0}}}'])
def test_positions_of_the_wrong_shape_start_fresh_and_are_kept_aside(tmp_path, bad, caplog):
    (tmp_path / "qemu").mkdir()
    (tmp_path / "state").mkdir()
    log = tmp_path / "qemu" / "x.log"
    log.write_text("2026-11-25T20:41:26.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    (tmp_path / "state" / "positions.json").write_text(bad.replace("QEMU", str(log)))
    src = _source(tmp_path, start_at_end=False)
    first = src.collect().events  # no exception: this cycle and every later one work
    assert len(first) == 1
    with open(log, "a") as f:
        f.write("2026-11-25T20:41:27.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n")
    assert [e.offset for e in src.collect().events] == [len(log.read_text()) // 2]
    assert "wrong shape" in caplog.text
    kept = list((tmp_path / "state").glob("positions.json.bad-*"))
    whole_file_bad = not bad.startswith('{"files": {')
    assert len(kept) == (1 if whole_file_bad else 0)
    if kept:
        assert kept[0].read_text() == bad


# -- issue 16 #9: over-long lines, local time and the year, a cap per cycle, who may speak for the kernel --------

NOP = "2026-11-25T20:41:{:02d}.000001Z qemu-system-x86_64: iSCSI: NOP timeout. Reconnecting...\n"


def test_a_line_over_1_mib_is_skipped_counted_and_reading_goes_on(tmp_path):
    (tmp_path / "qemu").mkdir()
    log = tmp_path / "qemu" / "big.log"
    with open(log, "w") as f:
        f.write(NOP.format(1) + "x" * (3 << 20) + " iSCSI: NOP timeout\n" + NOP.format(2))
    src = _source(tmp_path, start_at_end=False)
    got = src.collect().events
    assert [e.time % 60 for e in got] == pytest.approx([1.000001, 2.000001])
    assert src.dropped["line_too_long"] == 1
    # an over-long line still being written: skipped as it grows, the line after its newline is read
    with open(log, "a") as f:
        f.write("y" * ((1 << 20) + 10))
    assert src.collect().events == ()
    with open(log, "a") as f:
        f.write("y" * 100)
    assert src.collect().events == ()
    with open(log, "a") as f:
        f.write("iSCSI: NOP timeout, the end of the long line\n" + NOP.format(3))
    assert [e.offset for e in src.collect().events] == [log.stat().st_size - len(NOP.format(3))]
    assert src.dropped["line_too_long"] == 2
    src.close()
    saved = json.loads((tmp_path / "state" / "positions.json").read_text())["files"][str(log)]
    assert saved["offset"] == log.stat().st_size


def _berlin():
    from zoneinfo import ZoneInfo

    return ZoneInfo("Europe/Berlin")


def _ts(y, mo, d, h, mi, s, tz):
    from datetime import datetime

    return datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()


def test_syslog_time_is_local_time_and_the_year_is_never_in_the_future():
    berlin = _berlin()
    now = _ts(2026, 11, 26, 9, 0, 0, berlin)
    ts, _, prog = parse_line("Nov 25 20:00:01 kvm1 kernel: x", default_time=0.0, now=now, tz=berlin)
    assert ts == _ts(2026, 11, 25, 20, 0, 1, berlin) == _ts(2026, 11, 25, 19, 0, 1, __import__("datetime").timezone.utc)
    assert prog == "kernel"
    # summer time: +02:00
    ts, _, _ = parse_line("Jul  5 12:00:00 kvm1 kernel: x", default_time=0.0, now=now, tz=berlin)
    assert ts == _ts(2026, 7, 5, 10, 0, 0, __import__("datetime").timezone.utc)
    # New Year: a Dec 31 line read on Jan 1 belongs to the year before
    jan1 = _ts(2027, 1, 1, 0, 5, 0, berlin)
    assert parse_line("Dec 31 23:59:58 kvm1 kernel: x", default_time=0.0, now=jan1, tz=berlin)[0] == \
        _ts(2026, 12, 31, 23, 59, 58, berlin)
    # ... and a Jan 1 line read a little before midnight (a clock behind) is next year's, not 364 days old
    dec31 = _ts(2026, 12, 31, 23, 59, 0, berlin)
    assert parse_line("Jan  1 00:00:30 kvm1 kernel: x", default_time=0.0, now=dec31, tz=berlin)[0] == \
        _ts(2027, 1, 1, 0, 0, 30, berlin)
    # more than a day ahead of now: last year
    assert parse_line("Nov 28 10:00:00 kvm1 kernel: x", default_time=0.0, now=now, tz=berlin)[0] == \
        _ts(2025, 11, 28, 10, 0, 0, berlin)
    # RFC 3339 (rsyslog's high-precision format) keeps its own offset, whatever the local zone
    ts, msg, prog = parse_line("2026-11-25T20:00:01.250000+05:00 kvm1 kernel: x", default_time=0.0, now=now, tz=berlin)
    assert ts == _ts(2026, 11, 25, 15, 0, 1, __import__("datetime").timezone.utc) + 0.25


def test_syslog_time_follows_the_hosts_zone_tz_europe_berlin():
    code = ("from agent.sources.storage_log_parse import parse_line\n"
            "import datetime\n"
            "now = datetime.datetime(2026, 11, 26, 8, 0, tzinfo=datetime.timezone.utc).timestamp()\n"
            "print(repr(parse_line('Nov 25 20:00:01 kvm1 kernel: x', default_time=0.0, now=now)[0]))\n")
    env = dict(__import__("os").environ, TZ="Europe/Berlin")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert float(out) == _ts(2026, 11, 25, 19, 0, 1, __import__("datetime").timezone.utc)


def test_events_per_cycle_are_capped_counted_and_not_read_again(tmp_path):
    (tmp_path / "qemu").mkdir()
    log = tmp_path / "qemu" / "many.log"
    log.write_text("".join(NOP.format(i) for i in range(20)))
    src = _source(tmp_path, start_at_end=False)
    src.cfg.max_events = 5
    got = src.collect()
    assert len(got.events) == 5 and got.lines_read == 20
    assert src.dropped["event_cap"] == 15
    assert src.collect().events == ()  # the positions moved past the dropped lines
    src.close()
    assert _source(tmp_path, start_at_end=False).collect().events == ()  # also after a restart


SPOOF = "Nov 25 20:00:01 kvm1 kernel: connection2:0: detected conn error (1020)\n"


def _kernel_file_source(tmp_path, kernel_source):
    (tmp_path / "qemu").mkdir(exist_ok=True)
    kern = tmp_path / "kern.log"
    s = _source(tmp_path, start_at_end=False)
    s.cfg.kernel_logs = [str(kern)]
    s.cfg.kernel_source = kernel_source
    return s, kern


@pytest.mark.skipif(not __import__("os").access("/dev/kmsg", __import__("os").R_OK),
                    reason="/dev/kmsg not readable (needs root or CAP_SYSLOG)")
def test_a_logger_t_kernel_line_is_not_a_kernel_event_when_kmsg_is_readable(tmp_path):
    s, kern = _kernel_file_source(tmp_path, "auto")
    # what `logger -t kernel "connection2:0: detected conn error (1020)"` leaves in /var/log/syslog
    kern.write_text(SPOOF + "Nov 25 20:00:02 kvm1 iscsid[812]: connection2:0 is operational after recovery (1 attempts)\n")
    got = s.collect().events
    assert [e for e in got if e.path == str(kern) and e.origin == "kernel"] == []
    assert [e.kind for e in got if e.path == str(kern)] == ["recovered"]  # iscsid still comes from the file
    assert s.kernel_source == "kmsg"


def test_kernel_lines_from_files_only_when_nothing_better_and_the_facility_must_be_kern(tmp_path):
    s, kern = _kernel_file_source(tmp_path, "files")
    kern.write_text(SPOOF + "<13>Nov 25 20:00:03 kvm1 kernel: connection3:0: detected conn error (1020)\n"
                    "<3>Nov 25 20:00:04 kvm1 kernel: connection4:0: detected conn error (1020)\n"
                    "Nov 25 20:00:05 kvm1 myapp[7]: I/O error on my own file\n"
                    "2026-11-25T20:00:06.000000+01:00 kvm1 myapp[7]: I/O error on my own file\n")
    got = s.collect().events
    assert [e.cid for e in got] == ["2:0", "4:0"]  # user.notice (<13>) claiming to be the kernel: refused
    assert s.dropped["untrusted_kernel_line"] == 1


# literal `journalctl -k -o json` entries (systemd 252); the second is what `logger -t kernel` makes of it
JOURNAL = [
    {"__CURSOR": "s=7e1f0c;i=1a2b;b=4f9d;m=2d1c;t=5f2a;x=9", "__REALTIME_TIMESTAMP": "1795636801250000",
     "_TRANSPORT": "kernel", "_BOOT_ID": "4f9d", "SYSLOG_IDENTIFIER": "kernel", "PRIORITY": "3",
     "MESSAGE": "connection2:0: detected conn error (1020)"},
    {"__CURSOR": "s=7e1f0c;i=1a2c;b=4f9d;m=2d1d;t=5f2b;x=9", "__REALTIME_TIMESTAMP": "1795636802000000",
     "_TRANSPORT": "syslog", "_UID": "1000", "SYSLOG_IDENTIFIER": "kernel", "SYSLOG_FACILITY": "1",
     "MESSAGE": "connection3:0: detected conn error (1020)"},
    {"__CURSOR": "s=7e1f0c;i=1a2d;b=4f9d;m=2d1e;t=5f2c;x=9", "__REALTIME_TIMESTAMP": "1795636803000000",
     "_TRANSPORT": "kernel", "MESSAGE": [115, 101, 115, 115, 105, 111, 110, 51, 58, 32, 115, 101, 115, 115, 105, 111,
                                         110, 32, 114, 101, 99, 111, 118, 101, 114, 121, 32, 116, 105, 109, 101, 100,
                                         32, 111, 117, 116, 32, 97, 102, 116, 101, 114, 32, 49, 50, 48, 32, 115, 101,
                                         99, 115, 255]},
]


def test_journal_entries_literal_json():
    from agent.sources.storage_log_parse import parse_journal_entry

    a, b, c = (parse_journal_entry(json.dumps(e)) for e in JOURNAL)
    assert a == {"cursor": JOURNAL[0]["__CURSOR"], "seqnum_id": "7e1f0c", "seqnum": 0x1a2b, "time": 1795636801.25,
                 "message": "connection2:0: detected conn error (1020)", "transport": "kernel", "boot": "4f9d"}
    assert b["transport"] == "syslog"
    assert c["message"].startswith("session3: session recovery timed out after 120 secs")  # bytes, not UTF-8
    for bad in ("", "[]", "{}", '{"__CURSOR": 3, "MESSAGE": "x"}', '{"__CURSOR": "s=1;i=zz", "MESSAGE": "x"}',
                '{"__CURSOR": "s=1;i=2", "MESSAGE": [300]}'):
        assert parse_journal_entry(bad) is None


FAKE_JOURNALCTL = r'''#!/bin/sh
# stands in for journalctl: records its arguments, prints the entries after --after-cursor (or the last one for -n 1)
echo "$*" >> "$JOURNAL_ARGS"
case "$*" in
  *"-n 1"*) tail -n 1 "$JOURNAL_DATA" ;;
  *--after-cursor=*) c=$(echo "$*" | sed 's/.*--after-cursor=\([^ ]*\).*/\1/'); sed -n "/$c/,\$p" "$JOURNAL_DATA" | tail -n +2 ;;
  *) cat "$JOURNAL_DATA" ;;
esac
'''


@pytest.fixture
def fake_journal(tmp_path, monkeypatch):
    """A stand-in `journalctl` first on PATH that serves the returned file (one JSON entry a line) and
    logs its arguments to tmp_path/args."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "journalctl").write_text(FAKE_JOURNALCTL)
    (bindir / "journalctl").chmod(0o755)
    data = tmp_path / "journal.json"
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("JOURNAL_DATA", str(data))
    monkeypatch.setenv("JOURNAL_ARGS", str(tmp_path / "args"))
    return data


def test_kernel_events_from_the_journal_only_with_the_trusted_transport(tmp_path, fake_journal):
    data = fake_journal
    data.write_text(json.dumps(JOURNAL[0]) + "\n")
    s, _ = _kernel_file_source(tmp_path, "journal")
    s.cfg.start_at_end = True
    s._tailer = None
    assert s.collect().events == ()  # what the journal held at the first start is not replayed
    data.write_text("".join(json.dumps(e) + "\n" for e in JOURNAL))
    got = s.collect().events
    assert [(e.kind, e.origin, e.path, e.file_id, e.offset) for e in got] == [
        ("recovery_timeout", "kernel", "journal", "journal:7e1f0c", 0x1a2d)]  # the syslog-transport "kernel": no
    assert s.collect().events == ()
    s.close()
    args = (tmp_path / "args").read_text().splitlines()
    assert args[0].startswith("-k -o json") and "-n 1" in args[0]
    assert args[1].endswith(f"--after-cursor={JOURNAL[0]['__CURSOR']}")
    assert args[2].endswith(f"--after-cursor={JOURNAL[2]['__CURSOR']}")
    assert json.loads((tmp_path / "state" / "positions.json").read_text())["kmsg"] == {"cursor": JOURNAL[2]["__CURSOR"]}


def test_only_the_agent_moves_the_positions_no_module_state(tmp_path):
    from agent.engine import build_agent
    from agent.sources import storage_log

    assert not hasattr(storage_log, "persist_positions")
    cfg = Config()
    assert [s.persist_positions for s in build_agent(cfg, ["storage_log"]).sources] == [False]
    assert [s.persist_positions for s in build_agent(cfg, ["storage_log"], owns_state=True).sources] == [True]


def test_the_journal_is_read_in_bounded_steps_and_always_moves_on(tmp_path, fake_journal):
    data = fake_journal
    entries = [dict(JOURNAL[0], __CURSOR=f"s=7e1f0c;i={i:x};b=4f9d", MESSAGE=f"connection{i}:0: ping timeout")
               for i in range(1, 8)]
    data.write_text("".join(json.dumps(e) + "\n" for e in entries))
    s, _ = _kernel_file_source(tmp_path, "journal")
    s.cfg.max_lines = 3
    steps = [[e.sid for e in s.collect().events] for _ in range(4)]
    assert steps == [[1, 2, 3], [4, 5, 6], [7], []]  # max_lines entries per cycle, none twice, none lost


def test_what_is_dropped_is_on_metrics(tmp_path):
    import urllib.request

    from agent.exporters.server import MetricsServer
    from agent.loop import Agent

    s = _source(tmp_path, start_at_end=False)
    s.cfg.max_events = 2
    (tmp_path / "qemu").mkdir()
    (tmp_path / "qemu" / "a.log").write_text("".join(NOP.format(i) for i in range(5)) + "z" * (1 << 21) + "\n")
    agent = Agent([s], interval=1.0, timeout=4.0, hostname="h")
    server = MetricsServer("127.0.0.1", 0, lambda: agent.latest).start()
    try:
        agent.collect_once()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.stop()
    assert 'kvmscope_collector_dropped_samples_total{collector="storage_log",reason="event_cap"} 3.0' in text
    assert 'kvmscope_collector_dropped_samples_total{collector="storage_log",reason="line_too_long"} 1.0' in text


def test_a_hanging_journalctl_costs_a_bounded_time_and_keeps_what_it_said(tmp_path, monkeypatch):
    import time

    from agent.sources import storage_log

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "journalctl").write_text(f"#!/bin/sh\ncat '{tmp_path}/journal.json'\nexec sleep 60\n")
    (bindir / "journalctl").chmod(0o755)
    (tmp_path / "journal.json").write_text(json.dumps(JOURNAL[0]) + "\n")
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr(storage_log, "_JOURNAL_TIMEOUT", 0.5)
    s, _ = _kernel_file_source(tmp_path, "journal")
    t0 = time.monotonic()
    got = s.collect().events
    assert time.monotonic() - t0 < 5
    assert [e.cid for e in got] == ["2:0"]
    assert s._tailer.kmsg == {"cursor": JOURNAL[0]["__CURSOR"]}
