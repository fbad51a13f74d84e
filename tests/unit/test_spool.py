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
    s = Spool(tmp_path, 1 << 20)
    assert s.oldest_pending_time() is None
    s.append(recs(1))
    assert s.oldest_pending_time() is not None
    s.ack(s.read_batch(10, 1 << 20))
    assert s.oldest_pending_time() is None


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
