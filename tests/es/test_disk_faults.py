"""`kvmscope run` with its spool on a small file system that fills up, goes read-only and comes back.

The spool lives on a 4 MiB tmpfs the test mounts. With the cluster
unreachable (a loopback proxy that is down) the spool holds documents; then
the test fills the file system (ENOSPC), remounts it read-only, lets the
cluster back in while the disk is still read-only, and finally frees the disk.
Through all of it the agent must keep collecting and serving /metrics, say on
/metrics that local writes fail, and ship every document it kept, once.

Truth: the agent's JSON-lines file output (on the ordinary disk). The shipper
writes a cycle's documents there only after the spool took them, so the file
holds exactly the documents the spool kept.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
import yaml

from tests.conftest import scrape
from tests.es.conftest import wait_for
from tests.es.test_agent_outage import Agent, QemuLogWriter

pytestmark = pytest.mark.slow


class MountError(Exception):
    pass


def mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise MountError(f"mount {' '.join(args)}: {r.stderr.strip()}")


def remount_ro(path, timeout: float = 10) -> int:
    """Remount read-only; the kernel refuses (EBUSY) while a file is open for writing there. Returns tries."""
    deadline, tries = time.monotonic() + timeout, 0
    while True:
        tries += 1
        try:
            mount("-o", "remount,ro", str(path))
            return tries
        except MountError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def fill(path, filler) -> int:
    """Write to ``filler`` until the file system says ENOSPC. Returns the bytes added."""
    added = 0
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            added += os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return added


def test_spool_disk_full_then_read_only_then_back(es_node, proxy, namespace, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m,mode=0755", "kvmscope-test-spool", str(disk))
    filler = disk / "filler"
    a = Agent(tmp_path, proxy.url, namespace)
    cfg = yaml.safe_load(a.cfg.read_text())
    cfg["elasticsearch"].update(spool_dir=str(disk / "spool"), spool_max_bytes=2 * 1024 * 1024)
    a.cfg.write_text(yaml.safe_dump(cfg))
    writer = QemuLogWriter(tmp_path / "qemu" / "web03.log", every=0.1)
    log = {}
    try:
        a.start()
        writer.start()
        wait_for(lambda: (a.metrics() or {}).get("shipped_documents_total", 0) > 0, 30, "first documents shipped")

        # 1. the cluster goes away: the spool keeps what the agent collects
        proxy.down()
        wait_for(lambda: (a.metrics() or {}).get("queued_documents", 0) > 50, 30, "documents queued in the spool")

        # 2. the disk fills up
        t0 = time.monotonic()
        log["filled"] = fill(disk, filler)
        e0 = a.metrics()["local_errors_total"]
        wait_for(lambda: a.metrics()["local_errors_total"] >= e0 + 5, 20, "local write errors on /metrics")
        queued_full = a.metrics()["queued_documents"]
        ts0 = scrape(a.port)["kvmscope_snapshot_timestamp_seconds"]
        time.sleep(10)
        m = scrape(a.port)
        assert m["kvmscope_snapshot_timestamp_seconds"] > ts0, "collection stopped while the disk was full"
        assert m['kvmscope_collector_success{collector="storage_log"}'] == 1
        assert m["kvmscope_shipping_up"] == 0 and m["kvmscope_shipping_queued_documents"] == queued_full
        log["enospc_s"] = time.monotonic() - t0

        # 3. read-only (the spool holds no file open for writing, so the kernel lets the remount through)
        t1 = time.monotonic()
        log["remount_tries"] = remount_ro(disk)
        with pytest.raises(OSError) as ro:
            (disk / "probe").write_text("x")
        assert ro.value.errno == errno.EROFS
        e1 = a.metrics()["local_errors_total"]
        wait_for(lambda: a.metrics()["local_errors_total"] >= e1 + 5, 20, "errors while read-only")
        time.sleep(5)
        # the cluster is back while the disk is still read-only: what the spool kept ships (reads work)
        proxy.up()
        wait_for(lambda: a.metrics()["queued_documents"] == 0, 60, "the kept documents to ship from a read-only disk")
        m = scrape(a.port)
        assert m["kvmscope_shipping_up"] == 0, "local writes still fail: not healthy"
        assert m["kvmscope_snapshot_timestamp_seconds"] > ts0 + 3
        log["readonly_s"] = time.monotonic() - t1

        # 4. the disk is back
        mount("-o", "remount,rw", str(disk))
        filler.unlink()
        t2 = time.monotonic()
        wait_for(lambda: a.metrics().get("up") == 1, 20, "shipping healthy again")
        log["recovered_s"] = time.monotonic() - t2
        e2 = a.metrics()["local_errors_total"]
        s2 = a.metrics()["shipped_documents_total"]
        wait_for(lambda: a.metrics()["shipped_documents_total"] > s2 + 20, 30, "new documents shipped")
        assert a.metrics()["local_errors_total"] == e2
        writer.stop.set()
        writer.join()
        time.sleep(1.5)
        wait_for(a.drained, 30, "the last documents")
        assert a.terminate() < 10
    finally:
        writer.stop.set()
        if a.proc and a.proc.poll() is None:
            a.proc.kill()
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)

    kept = a.file_ids()
    in_es = es_node.ids(namespace)
    assert len(kept) == len(set(kept))
    assert set(kept) <= set(in_es), f"{len(set(kept) - set(in_es))} kept documents lost"
    assert set(in_es.values()) == {1}, "a document arrived twice"
    console = (tmp_path / "console.log").read_text()
    assert "Traceback" not in console and "write to closed file" not in console
    print(f"\nfilled {log['filled'] // 1024} KiB; ENOSPC {log['enospc_s']:.1f}s, read-only {log['readonly_s']:.1f}s "
          f"(remount after {log['remount_tries']} tries), healthy {log['recovered_s']:.1f}s after the disk came back; "
          f"{len(kept)} documents kept, {len(in_es)} in Elasticsearch each once, "
          f"{int(e2)} local writes failed (counted); {writer.written} QEMU lines written")
