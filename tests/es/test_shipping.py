"""The shipper against a real Elasticsearch: data streams, mappings, replays, refusals, 429, the spool cap."""

from __future__ import annotations

import json

from agent.config import Config
from agent.shipping.fields import DATASETS, all_fields
from agent.shipping.shipper import ElasticShipper, Shipping
from agent.shipping.spool import Spool
from tests.es.conftest import wait_for
from tests.unit.test_ecs import LOG_EVENT, snap

TYPES = {"keyword_noindex": "keyword"}


def es_cfg(tmp_path, hosts, namespace, **kw):
    cfg = Config()
    es = cfg.elasticsearch
    es.enabled = True
    es.hosts = list(hosts)
    es.namespace = namespace
    es.spool_dir = str(tmp_path / "spool")
    es.retry_initial = 0.1
    es.retry_max = 0.5
    es.request_timeout = 5
    for k, v in kw.items():
        setattr(es, k, v)
    return cfg


def drained(sh: Shipping):
    return lambda: sh.spool.pending() == 0 and sh.shipper._held is None


def host_docs(n, namespace, start=0):
    out = []
    for i in range(start, start + n):
        doc = {"@timestamp": "2026-11-25T20:00:00.000Z", "event": {"id": f"d{i}", "dataset": "kvmscope.host"},
               "kvmscope": {"host": {"tcp": {"retrans_segs": i}}}}
        out.append((f"d{i}", f"metrics-kvmscope.host-{namespace}", doc))
    return out


def test_snapshots_become_searchable_documents_with_the_template_mappings(es_node, namespace, tmp_path):
    sh = Shipping(es_cfg(tmp_path, [es_node.url], namespace)).start()
    try:
        a = snap(1, 1_790_000_000.0)
        b = snap(2, 1_790_000_005.0, rd=200, rd_ns=150_000_000, retrans=7, sess_state="FAILED", log_events=[LOG_EVENT])
        sh.consume(a)
        sh.consume(b)
        wait_for(drained(sh), 30, "the spool to drain")
    finally:
        sh.stop()
    h = sh.health()
    assert h["failed"] == 0 and h["shipped"] > 0
    ids = es_node.ids(namespace)
    assert len(ids) == h["shipped"] and set(ids.values()) == {1}
    c = es_node.client()
    # searchable by VM, disk, portal and session
    r = c.search(index=f"metrics-kvmscope.vm_disk-{namespace}", query={"bool": {"filter": [
        {"term": {"kvmscope.vm.name": "web01"}}, {"term": {"kvmscope.disk.target": "vda"}},
        {"term": {"kvmscope.portal": "198.18.0.2:3260"}}, {"range": {"kvmscope.disk.read_latency_ms": {"gte": 1}}}]}})
    assert r["hits"]["total"]["value"] == 1
    r = c.search(index=f"metrics-kvmscope.iscsi_session-{namespace}", query={"term": {"kvmscope.iscsi.session.sid": 3}})
    assert r["hits"]["total"]["value"] == 2
    r = c.search(index=f"logs-kvmscope.events-{namespace}",
                 query={"term": {"event.action": "iscsi-session-state-change"}})
    assert r["hits"]["hits"][0]["_source"]["kvmscope"]["change"]["to"] == "FAILED/up"
    r = c.search(index=f"logs-kvmscope.storage_log-{namespace}", query={"match": {"message": "NOP timeout"}})
    assert r["hits"]["total"]["value"] == 1
    # they are data streams, and their mappings are the template's, field by field
    for ds in ("vm_disk", "connection", "iscsi_session", "events", "storage_log", "host"):
        stream = DATASETS[ds].stream(namespace)
        info = c.indices.get(index=stream)
        (backing,) = info.keys()
        assert backing.startswith(f".ds-{stream}-")
        mapping = c.indices.get_field_mapping(index=stream, fields="*")[backing]["mappings"]
        for field, kind in all_fields(DATASETS[ds]).items():
            assert field in mapping, f"{ds}: {field} missing from the mapping"
            got = next(iter(mapping[field]["mapping"].values()))["type"]
            assert got == TYPES.get(kind, kind), (ds, field, got)


def test_a_replay_after_a_crash_collapses_on_the_ids(es_node, namespace, tmp_path):
    cfg = es_cfg(tmp_path, [es_node.url], namespace)
    sh = Shipping(cfg).start()
    sh.submit(host_docs(50, namespace))
    wait_for(drained(sh), 30, "the spool to drain")
    sh.stop()
    # the acknowledgement was "never written" (crash between bulk and ack): everything is sent again
    (tmp_path / "spool" / "state.json").unlink()
    spool = Spool(cfg.elasticsearch.spool_dir, cfg.elasticsearch.spool_max_bytes)
    assert spool.pending() == 50
    shipper = ElasticShipper(cfg.elasticsearch, spool).start()
    wait_for(lambda: spool.pending() == 0, 30, "the replay")
    shipper.stop(1)
    assert shipper.stats.duplicates == 50 and shipper.stats.failed == 0
    ids = es_node.ids(namespace)
    assert len(ids) == 50 and set(ids.values()) == {1}


def test_a_refused_document_is_set_aside_and_the_rest_ships(es_node, namespace, tmp_path):
    sh = Shipping(es_cfg(tmp_path, [es_node.url], namespace)).start()
    try:
        docs = host_docs(10, namespace)
        bad = host_docs(1, namespace, start=100)[0]
        bad[2]["kvmscope"]["host"]["tcp"]["retrans_segs"] = "lots"  # long field: mapping conflict
        sh.submit(docs[:5] + [bad] + docs[5:])
        sh.submit(host_docs(5, namespace, start=10))  # later documents
        wait_for(drained(sh), 30, "the spool to drain")
    finally:
        sh.stop()
    assert sh.health()["failed"] == 1
    ids = es_node.ids(namespace)
    assert len(ids) == 15 and "d100" not in ids
    (line,) = (tmp_path / "spool" / "dead-letter.ndjson").read_text().splitlines()
    dead = json.loads(line)
    assert dead["id"] == "d100" and dead["status"] == 400
    assert "retrans_segs" in dead["reason"] and "exception" in dead["reason"]
    assert dead["doc"]["kvmscope"]["host"]["tcp"]["retrans_segs"] == "lots"


def test_429_answers_are_retried_and_nothing_is_lost(es_node, proxy, namespace, tmp_path):
    sh = Shipping(es_cfg(tmp_path, [proxy.url], namespace, batch_max_docs=20)).start()
    try:
        proxy.mode = "429"
        sh.submit(host_docs(100, namespace))
        wait_for(lambda: proxy.rejected >= 3, 30, "three 429 answers")
        assert sh.spool.pending() == 100
        proxy.mode = "forward"
        wait_for(drained(sh), 30, "the spool to drain")
    finally:
        sh.stop()
    h = sh.health()
    assert h["retried"] >= 20 and h["failed"] == 0 and h["dropped"] == 0
    ids = es_node.ids(namespace)
    assert len(ids) == 100 and set(ids.values()) == {1}


def test_a_full_spool_drops_the_oldest_and_counts_them_exactly(es_node, proxy, namespace, tmp_path):
    proxy.down()  # the cluster is unreachable: connection refused
    sh = Shipping(es_cfg(tmp_path, [proxy.url], namespace, spool_max_bytes=64 * 1024, batch_max_docs=50)).start()
    try:
        total = 0
        for _ in range(40):
            sh.submit(host_docs(25, namespace, start=total))
            total += 25
        h = sh.health()
        assert h["dropped"] > 0 and h["spool_bytes"] <= 64 * 1024 + 16 * 1024
        proxy.up()
        wait_for(drained(sh), 60, "the spool to drain")
    finally:
        sh.stop()
    h = sh.health()
    ids = es_node.ids(namespace)
    assert len(ids) + h["dropped"] == total
    assert set(ids.values()) == {1}
    # the newest survived
    assert f"d{total - 1}" in ids


def test_a_document_always_answered_503_is_set_aside_and_the_later_ones_flow(es_node, proxy, namespace, tmp_path):
    """Head-of-line blocking: one document a shard keeps refusing with 503 among 20 later ones."""
    sh = Shipping(es_cfg(tmp_path, [proxy.url], namespace, batch_max_docs=10, item_max_retries=3)).start()
    proxy.fail_items["d5"] = (503, None)  # always
    proxy.fail_items["d7"] = (503, 2)  # twice, then accepted
    try:
        sh.submit(host_docs(10, namespace))
        sh.submit(host_docs(20, namespace, start=10))  # the later documents
        wait_for(drained(sh), 30, "the spool to drain past the failing document")
    finally:
        sh.stop()
    ids = es_node.ids(namespace)
    assert set(ids) == {f"d{i}" for i in range(30)} - {"d5"} and set(ids.values()) == {1}
    assert proxy.sent["d5"] == 1 + 3  # the first send and item_max_retries retries, not one more
    assert proxy.sent["d7"] == 3  # a document that recovers within the limit is shipped, not set aside
    assert all(proxy.sent[f"d{i}"] == 1 for i in range(10, 30))
    (line,) = (tmp_path / "spool" / "dead-letter.ndjson").read_text().splitlines()
    dead = json.loads(line)
    assert dead["id"] == "d5" and dead["status"] == 503 and "after 4 attempts" in dead["reason"]
    h = sh.health()
    assert h["failed"] == 1 and h["shipped"] == 29 and h["retried"] >= 5


def test_per_item_429_on_every_document_is_back_pressure_and_retried_past_the_limit(es_node, proxy, namespace,
                                                                                   tmp_path):
    sh = Shipping(es_cfg(tmp_path, [proxy.url], namespace, batch_max_docs=10, item_max_retries=1)).start()
    for i in range(10):
        proxy.fail_items[f"d{i}"] = (429, 4)  # every document of the request, four times: the cluster is busy
    try:
        sh.submit(host_docs(10, namespace))
        wait_for(drained(sh), 30, "the spool to drain")
    finally:
        sh.stop()
    assert all(proxy.sent[f"d{i}"] == 5 for i in range(10))
    ids = es_node.ids(namespace)
    assert len(ids) == 10 and set(ids.values()) == {1} and sh.health()["failed"] == 0
