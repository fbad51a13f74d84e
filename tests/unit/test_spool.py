"""The durable spool: ordering, acknowledgement across restarts, torn lines, the size cap."""

from __future__ import annotations

import json

from agent.shipping.spool import Spool


def recs(n, start=0, pad=0):
    return [(f"id{i}", "metrics-kvmscope.host-default", {"n": i, "pad": "x" * pad}) for i in range(start, start + n)]


def ids(batch):
    return [r.id for r in batch.records]


def test_append_read_ack_in_order(tmp_path):
    s = Spool(tmp_path, 1 << 20)
    s.append(recs(5))
    b = s.read_batch(3, 1 << 20)
    assert ids(b) == ["id0", "id1", "id2"]
    assert json.loads(b.records[0].line) == {"n": 0, "pad": ""}
    s.ack(b)
    assert s.pending() == 2
    b2 = s.read_batch(10, 1 << 20)
    assert ids(b2) == ["id3", "id4"]
    assert s.read_batch(10, 1 << 20) is None  # nothing new until the next append
    s.ack(b2)
    assert s.pending() == 0


def test_restart_resumes_at_the_acknowledged_position(tmp_path):
    s = Spool(tmp_path, 1 << 20)
    s.append(recs(4))
    b = s.read_batch(2, 1 << 20)
    s.ack(b)
    s.read_batch(2, 1 << 20)  # handed out, never acknowledged: the process "dies" here
    # no close(): like kill -9
    s2 = Spool(tmp_path, 1 << 20)
    assert s2.pending() == 2
    assert ids(s2.read_batch(10, 1 << 20)) == ["id2", "id3"]
    s2.append(recs(1, start=4))  # new records go to a new segment, after the old ones
    assert ids(s2.read_batch(10, 1 << 20)) == ["id4"]


def test_torn_last_line_is_skipped_and_counted(tmp_path):
    s = Spool(tmp_path, 1 << 20)
    s.append(recs(2))
    seg = sorted(tmp_path.glob("seg-*"))[-1]
    with open(seg, "ab") as f:
        f.write(b'{"i":"torn","x":"m","t":1}\t{"n":')  # crash in the middle of a write
    s2 = Spool(tmp_path, 1 << 20)
    b = s2.read_batch(10, 1 << 20)
    assert ids(b) == ["id0", "id1"]
    assert b.corrupt == 1 and s2.stats.corrupt == 1
    s2.ack(b)
    assert Spool(tmp_path, 1 << 20).stats.corrupt == 1  # persisted


def test_cap_drops_oldest_and_counts_exactly(tmp_path):
    cap = 64 * 1024
    s = Spool(tmp_path, cap, segment_bytes=8 * 1024)
    total = 0
    for k in range(40):
        s.append(recs(10, start=total, pad=100))
        total += 10
        assert s.bytes_on_disk() <= cap + 8 * 1024
    assert s.stats.dropped > 0
    # everything still there is readable; what is missing is exactly what was counted
    got = []
    while (b := s.read_batch(1000, 1 << 30)) is not None:
        got += ids(b)
        s.ack(b)
    assert len(got) + s.stats.dropped == total
    # the survivors are the newest, in order
    assert got == [f"id{i}" for i in range(total - len(got), total)]
    assert Spool(tmp_path, cap, segment_bytes=8 * 1024).stats.dropped == s.stats.dropped


def test_cap_does_not_count_records_already_handed_out(tmp_path):
    s = Spool(tmp_path, 32 * 1024, segment_bytes=4 * 1024)
    s.append(recs(10, pad=100))
    held = s.read_batch(5, 1 << 30)  # the shipper holds these in memory during an outage
    for k in range(30):
        s.append(recs(10, start=10 + 10 * k, pad=100))
    rest = []
    while (b := s.read_batch(1000, 1 << 30)) is not None:
        rest += ids(b)
        s.ack(b)
    s.ack(held)
    assert len(held.records) + len(rest) + s.stats.dropped == 310
    assert s.pending() == 0


def test_oldest_pending_time(tmp_path):
    """The append time of the oldest unacknowledged record: it moves to the next
    record when the oldest is acknowledged, and survives a restart (read from the segment)."""
    import time

    s = Spool(tmp_path, 1 << 20)
    assert s.oldest_pending_time() is None
    t0 = time.time()
    s.append(recs(2))
    t1 = time.time()
    time.sleep(0.05)
    t2 = time.time()
    s.append(recs(1, start=2))
    t3 = time.time()
    assert t0 - 0.001 <= s.oldest_pending_time() <= t1 + 0.001
    first = s.read_batch(2, 1 << 20)
    assert ids(first) == ["id0", "id1"]
    s.ack(first)
    assert t2 - 0.001 <= s.oldest_pending_time() <= t3 + 0.001
    s.close()
    s = Spool(tmp_path, 1 << 20)
    assert t2 - 0.001 <= s.oldest_pending_time() <= t3 + 0.001
    s.ack(s.read_batch(10, 1 << 20))
    assert s.oldest_pending_time() is None
    s.close()


def test_secrets_are_masked_and_urls_redacted(tmp_path):
    from agent.config import Config, masked_dict
    from agent.config import redact_url
    from agent.shipping.shipper import make_client

    cfg = Config()
    cfg.elasticsearch.username = "kvmscope"
    cfg.elasticsearch.password = "hunter2"
    cfg.elasticsearch.api_key = "c2VjcmV0"
    shown = masked_dict(cfg)["elasticsearch"]
    assert shown["password"] == shown["api_key"] == "********"
    assert redact_url("https://u:hunter2@es.example:9200/") == "https://u:********@es.example:9200/"
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file\n")
    cfg.elasticsearch.api_key_file = str(keyfile)
    client = make_client(cfg.elasticsearch)  # no I/O until the first request
    assert client._headers["authorization"] == "ApiKey from-file"


def test_unusable_spool_dir_is_a_clear_error(tmp_path):
    import pytest

    from agent.config import Config
    from agent.errors import KvmscopeError
    from agent.shipping.shipper import Shipping

    (tmp_path / "file").write_text("")
    cfg = Config()
    cfg.elasticsearch.enabled = True
    cfg.elasticsearch.spool_dir = str(tmp_path / "file" / "spool")
    with pytest.raises(KvmscopeError, match="elasticsearch.spool_dir"):
        Shipping(cfg)


def test_file_output_rotates_and_keeps_n(tmp_path):
    from agent.shipping.shipper import FileOutput

    fo = FileOutput(tmp_path / "d.ndjson", 2048, 2)
    for i in range(100):
        fo.write([(f"id{i}", "s", {"n": i, "pad": "x" * 50})])
    fo.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["d.ndjson", "d.ndjson.1", "d.ndjson.2"]
    assert all(p.stat().st_size <= 2048 for p in tmp_path.iterdir())
    last = [json.loads(x)["n"] for x in (tmp_path / "d.ndjson").read_text().splitlines()]
    assert last[-1] == 99


def test_restart_after_everything_was_shipped_and_deleted(tmp_path):
    s = Spool(tmp_path, 1 << 20, segment_bytes=16 * 1024)
    for k in range(3):
        s.append(recs(200, start=200 * k, pad=50))
        while (b := s.read_batch(1000, 1 << 30)) is not None:
            s.ack(b)
    s.close()
    for p in tmp_path.glob("seg-*"):  # e.g. removed by hand
        p.unlink()
    s2 = Spool(tmp_path, 1 << 20)
    s2.append(recs(3, start=1000))
    assert ids(s2.read_batch(10, 1 << 20)) == ["id1000", "id1001", "id1002"]
    s3 = Spool(tmp_path, 1 << 20)  # and once more, with the segment present
    assert s3.pending() == 3


class DiskFault:
    """Makes opening (``open`` and ``os.open``) a spool segment for writing fail with ``errno`` while on."""

    def __init__(self, monkeypatch, errno_=30):
        import builtins
        import os

        self.on = False
        real_open, real_os_open = builtins.open, os.open

        def fail(path):
            if self.on and "seg-" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else False:
                raise OSError(errno_, os.strerror(errno_), os.fspath(path))

        def fake_open(path, mode="r", *a, **kw):
            if set(mode) & set("wax+"):
                fail(path)
            return real_open(path, mode, *a, **kw)

        def fake_os_open(path, flags, *a, **kw):
            if flags & (os.O_WRONLY | os.O_RDWR):
                fail(path)
            return real_os_open(path, flags, *a, **kw)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)


def test_a_failed_segment_roll_does_not_wedge_the_spool(tmp_path, monkeypatch):
    import pytest

    fault = DiskFault(monkeypatch)
    s = Spool(tmp_path, 1 << 20, segment_bytes=1024)
    s.append(recs(5, pad=100))  # fills the first segment
    fault.on = True  # read-only file system, no inodes, EACCES...
    for k in range(3):
        with pytest.raises(OSError):  # an OSError the caller counts, not "write to closed file"
            s.append(recs(5, start=100 + 5 * k, pad=100))
    fault.on = False
    s.append(recs(5, start=5, pad=100))  # works again as soon as the fault clears
    got = []
    while (b := s.read_batch(1000, 1 << 30)) is not None:
        assert b.corrupt == 0
        got += ids(b)
        s.ack(b)
    assert got == [f"id{i}" for i in range(10)]
    assert s.stats.write_errors == 3 and s.pending() == 0
    s.close()  # and closing never raises
    assert ids(Spool(tmp_path, 1 << 20).read_batch(10, 1 << 20) or type("B", (), {"records": []})) == []


def test_a_partial_write_is_taken_back_so_no_record_is_torn(tmp_path, monkeypatch):
    import errno
    import os

    import pytest

    s = Spool(tmp_path, 1 << 20)
    s.append(recs(3))
    real_write = os.write
    full = {"on": True}

    def short_write(fd, data):  # the disk fills in the middle of the batch
        if full["on"] and str(tmp_path) in os.readlink(f"/proc/self/fd/{fd}"):
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError):
        s.append(recs(3, start=3))
    full["on"] = False
    s.append(recs(3, start=6))
    b = s.read_batch(100, 1 << 30)
    assert ids(b) == ["id0", "id1", "id2", "id6", "id7", "id8"] and b.corrupt == 0
    s.ack(b)
    s2 = Spool(tmp_path, 1 << 20)  # and after a restart: nothing torn on disk either
    assert s2.read_batch(100, 1 << 30) is None and s2.stats.corrupt == 0


def test_ack_survives_a_read_only_disk_and_saves_later(tmp_path, monkeypatch):
    import errno

    import agent.shipping.spool as spool_mod

    s = Spool(tmp_path, 1 << 20)
    s.append(recs(4))
    real = spool_mod.write_atomic
    ro = {"on": True}

    def fake(path, data):
        if ro["on"]:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, data)

    monkeypatch.setattr(spool_mod, "write_atomic", fake)
    b = s.read_batch(2, 1 << 20)
    s.ack(b)  # no exception: the shipper must not send the batch again
    assert s.pending() == 2 and s.stats.state_errors == 1 and not s.last_write_ok
    ro["on"] = False
    s.close()  # saves the position it could not save before
    assert ids(Spool(tmp_path, 1 << 20).read_batch(10, 1 << 20)) == ["id2", "id3"]


def test_file_output_survives_a_failed_rotation(tmp_path, monkeypatch):
    import builtins

    import pytest

    from agent.shipping.shipper import FileOutput

    fo = FileOutput(tmp_path / "d.ndjson", 1024, 2)
    real_open = builtins.open
    fault = {"on": False}

    def fake_open(path, *a, **kw):
        if fault["on"] and str(path).endswith("d.ndjson"):
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(builtins, "open", fake_open)
    fo.write([("id0", "s", {"n": 0, "pad": "x" * 1000})])
    fault["on"] = True  # the disk fills: the next rotation's open fails
    for k in range(3):
        with pytest.raises(OSError):
            fo.write([(f"idX{k}", "s", {"n": -1, "pad": "x" * 100})])
    fault["on"] = False
    n = 1
    fo.write([(f"id{n}", "s", {"n": n})])  # works again
    fo.close()
    last = [json.loads(x)["n"] for x in (tmp_path / "d.ndjson").read_text().splitlines()]
    assert last[-1] == n


def test_shipping_stop_never_raises_and_local_errors_show_on_metrics(tmp_path, monkeypatch):
    from agent.config import Config
    from agent.exporters.render_shipping import render_health
    from agent.shipping.shipper import Shipping

    fault = DiskFault(monkeypatch, errno_=28)
    cfg = Config()
    cfg.elasticsearch.enabled = True
    cfg.elasticsearch.spool_dir = str(tmp_path / "spool")
    sh = Shipping(cfg, client=object())  # never started: no requests
    sh.shipper.stats.up = True
    sh.submit(recs(2))
    fault.on = True
    sh.submit(recs(2, start=2))
    sh.submit(recs(2, start=4))

    def metrics():
        return {f.name: f.samples[0].value for f in render_health(sh.health())}

    m = metrics()
    assert m["kvmscope_shipping_local_errors"] == 2  # the client library drops "_total" from the family name
    assert m["kvmscope_shipping_up"] == 0  # ENOSPC makes shipping unhealthy even though Elasticsearch answers
    fault.on = False
    sh.submit(recs(2, start=6))
    assert metrics()["kvmscope_shipping_up"] == 1
    sh.stop(0.1)


def test_state_of_the_wrong_shape_starts_from_the_oldest_segment_and_is_kept_aside(tmp_path, caplog):
    import pytest

    for bad in ("[]", '{"segment": "3", "offset": 0}', '{"segment": 1, "offset": -5}', "7", "{broken"):
        d = tmp_path / str(abs(hash(bad)))
        s = Spool(d, 1 << 20)
        s.append(recs(3))
        s.close()
        (d / "state.json").write_text(bad)
        s2 = Spool(d, 1 << 20)  # starts, no exception
        assert ids(s2.read_batch(10, 1 << 20)) == ["id0", "id1", "id2"], bad  # from the oldest: nothing lost
        kept = list(d.glob("state.json.bad-*"))
        assert len(kept) == 1 and kept[0].read_text() == bad and not (d / "state.json").exists()
    assert caplog.text.count("wrong shape") == 4
    with pytest.raises(AssertionError):  # the check above is real: a good state does not start over
        s3 = Spool(tmp_path / "good", 1 << 20)
        s3.append(recs(2))
        s3.ack(s3.read_batch(10, 1 << 20))
        assert Spool(tmp_path / "good", 1 << 20).read_batch(10, 1 << 20) is not None


def test_lines_are_what_json_dumps_writes(tmp_path, monkeypatch):
    """The spool writes its head and body from parts (one C encoder, no per-record dict for the head): each
    line is still exactly json.dumps of the head, a tab, json.dumps of the document."""
    import time as _time

    from agent.shipping import spool as spool_mod

    monkeypatch.setattr(_time, "time", lambda: 1_790_000_000.1234)
    docs = [("ab12", "metrics-kvmscope.vm_disk-default",
             {"@timestamp": "2026-09-21T14:13:20.000Z", "kvmscope": {"vm": {"name": "wéb\"01\n\u2028"},
                                                                      "disk": {"latency_ms": 1.25e-05, "big": 2**70}},
              "event": {"category": ["host"], "severity": -3, "ok": True, "nothing": None, "inf": float("inf")},
              "path": tmp_path}),
            (7, "logs-kvmscope.events-ns\u00e9", {"n": 0})]  # not str ids and streams: the general path
    s = Spool(tmp_path / "spool", 1 << 20)
    s.append(docs)
    seg = sorted((tmp_path / "spool").glob("seg-*.ndjson"))[-1].read_bytes()
    want = b"".join((json.dumps({"i": i, "x": x, "t": 1_790_000_000.123}, separators=(",", ":")) + "\t"
                     + json.dumps(d, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()
                    for i, x, d in docs)
    assert seg == want
    assert spool_mod._encode_body is not spool_mod._BODY.encode  # the fast encoder is the one in use here
