"""Shipping: snapshot → documents → spool (+ file output) → Elasticsearch bulk.

:class:`Shipping` is what ``kvmscope run`` wires in. Its :meth:`consume` is
an ``agent.on_snapshot`` callback and only builds documents and appends them
to the local spool and the optional JSON-lines file (milliseconds); the
network side runs in :class:`ElasticShipper`'s own thread, so an outage or a
slow cluster never delays collection.

The shipper, per batch (``batch_max_docs`` / ``batch_max_bytes``):

* installs the templates first (again after every connection loss);
* sends one ``_bulk`` with ``create`` actions and the documents' own ids;
* per item: 201 = shipped; 409 (version conflict: that id is already there,
  i.e. a replay) = shipped; 429 / 5xx = retried with the batch's back-off, at
  most ``item_max_retries`` times, then set aside like a refusal (so one
  document a shard keeps failing cannot hold back every later one); a
  response where *every* document got 429 is the cluster's back pressure and
  is retried without limit, like a whole-request 429; any other refusal
  (mapping conflict, unparsable document...) = written to
  ``dead-letter.ndjson`` with the status and reason and counted as failed;
* whole-request failures (connection refused/reset, timeout, 429, 5xx,
  401/403) retry the same batch with exponential back-off + jitter
  (``retry_initial`` doubling to ``retry_max``); nothing is dropped for them;
* a whole-request 4xx that is none of the above (a body the cluster cannot
  read) splits the batch into single documents so one bad document cannot
  block the others;
* only when every document of the batch is resolved is the spool position
  acknowledged (persisted atomically).

Known limit: ids collapse replays within one backing index; a replay that
crosses a rollover of the data stream (ILM, hours later) would store a second
copy. The spool's replay window is one batch, so this needs a crash exactly
at a rollover.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from agent.config import redact_url
from agent.records.snapshot import Snapshot
from agent.shipping.ecs import documents, finding_doc, incident_doc, load_builders
from agent.shipping.spool import Batch, Record, Spool

log = logging.getLogger(__name__)

RETRYABLE_ITEM = {429, 500, 502, 503, 504}


def make_client(cfg):
    """The official client from the ``elasticsearch`` section. Secrets stay in memory only."""
    from elasticsearch import Elasticsearch

    kw: dict = {
        "request_timeout": cfg.request_timeout,
        "max_retries": 0,  # the shipper does its own retrying, with back-off and per item
        "retry_on_timeout": False,
    }
    api_key = None
    if cfg.api_key_file:
        try:
            api_key = Path(cfg.api_key_file).read_text().strip()
        except OSError as e:
            from agent.errors import ConfigError

            raise ConfigError(f"elasticsearch.api_key_file: cannot read {cfg.api_key_file}: {e.strerror or e}") from None
    elif cfg.api_key is not None:
        api_key = cfg.api_key.get_secret_value()
    if api_key:
        kw["api_key"] = api_key
    elif cfg.username:
        kw["basic_auth"] = (cfg.username, cfg.password.get_secret_value() if cfg.password else "")
    if cfg.ca_certs:
        kw["ca_certs"] = cfg.ca_certs
    if any(h.startswith("https") for h in cfg.hosts):
        kw["verify_certs"] = cfg.verify_certs
    return Elasticsearch(list(cfg.hosts), **kw)


@dataclass
class ShipStats:
    shipped: int = 0  # documents the cluster holds (created, or already there)
    duplicates: int = 0  # of which: already there (409 on a replay)
    retried: int = 0  # document retries (whole batch or single items)
    failed: int = 0  # documents set aside in the dead-letter file
    bulk_requests: int = 0
    bulk_errors: int = 0  # whole requests that failed
    up: bool = False  # last request reached the cluster
    last_success: float = 0.0
    last_error: str = ""


class DeadLetter:
    """Append-only file of refused documents with the reason, rotated once at ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes

    def write(self, rec: Record, status: int, reason: str) -> None:
        line = json.dumps(
            {"time": time.time(), "id": rec.id, "index": rec.index, "status": status, "reason": reason, "doc": rec.doc()},
            ensure_ascii=False,
        ).encode() + b"\n"
        try:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            log.exception("cannot write the dead-letter file %s", self.path)


class ElasticShipper:
    """Ships the spool to Elasticsearch from its own thread."""

    def __init__(self, cfg, spool: Spool, client=None, on_notice=None):
        self.cfg = cfg
        self.spool = spool
        self.client = client if client is not None else make_client(cfg)
        self.stats = ShipStats()
        self.dead = DeadLetter(Path(spool.dir) / "dead-letter.ndjson", max(1024 * 1024, cfg.spool_max_bytes // 4))
        self._stop = threading.Event()
        self._deadline: float | None = None
        self._thread = threading.Thread(target=self._run, name="es-shipper", daemon=True)
        self._templates_ok = False
        self._backoff = 0.0
        self._notice = on_notice or (lambda text: log.warning("%s", text))
        self._held: Batch | None = None  # a batch handed out and not yet resolved
        self._item_tries: dict[int, int] = {}  # per document of the held batch (by position): item-level retries

    # -- life cycle ------------------------------------------------------
    def start(self) -> "ElasticShipper":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Keep shipping for at most ``timeout`` seconds, then stop. What is left stays in the spool."""
        timeout = self.cfg.stop_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._thread.join(timeout + self.cfg.request_timeout + 1)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    # -- the loop --------------------------------------------------------
    def _sleep(self, seconds: float) -> None:
        if self._stop.is_set():
            left = (self._deadline or 0) - time.monotonic()
            seconds = min(seconds, max(0.0, left))
        self._stop.wait(seconds) if not self._stop.is_set() else time.sleep(seconds)

    def _next_backoff(self) -> float:
        b = self.cfg.retry_initial if self._backoff <= 0 else min(self.cfg.retry_max, self._backoff * 2)
        self._backoff = b
        return b * random.uniform(0.5, 1.0)

    def _past_deadline(self) -> bool:
        return self._stop.is_set() and time.monotonic() >= (self._deadline or 0)

    def _run(self) -> None:
        while not self._past_deadline():
            try:
                if self._held is None:
                    if not self.spool.wait(0.5 if not self._stop.is_set() else 0.05):
                        if self._stop.is_set():
                            break  # drained
                        continue
                    self._held = self.spool.read_batch(self.cfg.batch_max_docs, self.cfg.batch_max_bytes)
                    if self._held is None:
                        continue
                if not self._templates_ok:
                    self._install_templates()
                self._ship_held()
            except Exception as e:  # never let the thread die: back off and try again
                self._fail(e)
                if self._held is not None:
                    self.stats.retried += len(self._held.records)
                self._sleep(self._next_backoff())

    def _install_templates(self) -> None:
        from agent.shipping import templates

        for notice in templates.ensure(self.client):
            self._notice(notice)
        self._templates_ok = True

    def _fail(self, e: Exception) -> None:
        from elasticsearch import ApiError

        self.stats.bulk_errors += 1
        self.stats.up = False
        if isinstance(e, ApiError):
            text = f"HTTP {e.meta.status} {e.message}"
        else:
            text = f"{type(e).__name__}: {e}"[:300]
        if text != self.stats.last_error:
            log.warning("elasticsearch %s: %s (will retry; documents stay in the spool)",
                        ", ".join(redact_url(h) for h in self.cfg.hosts), text)
        self.stats.last_error = text
        self._templates_ok = self._templates_ok and isinstance(e, ApiError)

    def _ship_held(self) -> None:
        batch = self._held
        pending = list(batch.records)
        while pending:
            if self._past_deadline():
                return  # leave it held: it stays in the spool for the next start
            pending = self._bulk(pending)
            if pending:
                self.stats.retried += len(pending)
                self._sleep(self._next_backoff())
        self.spool.ack(batch)
        self._held = None
        self._item_tries.clear()
        self._backoff = 0.0

    def _bulk(self, records: list[Record]) -> list[Record]:
        """One bulk request. Returns the records to retry; raises on whole-request trouble
        that retries the same records (the caller backs off)."""
        from elasticsearch import ApiError

        ops: list[bytes] = []
        for r in records:
            ops.append(b'{"create":{"_index":' + json.dumps(r.index).encode() + b',"_id":' + json.dumps(r.id).encode() + b"}}")
            ops.append(r.line)
        timeout = self.cfg.request_timeout
        if self._stop.is_set():
            timeout = max(0.5, min(timeout, (self._deadline or 0) - time.monotonic()))
        self.stats.bulk_requests += 1
        try:
            resp = self.client.options(request_timeout=timeout).bulk(operations=ops)
        except ApiError as e:
            st = e.meta.status
            if st in RETRYABLE_ITEM or st in (401, 403, 408) or len(records) == 1 and st >= 500:
                raise
            if len(records) > 1:
                # the cluster could not read the request: find the bad one by going single
                log.warning("bulk request refused whole (HTTP %s): retrying its %d documents one by one", st, len(records))
                out = []
                for r in records:
                    out.extend(self._bulk([r]))
                return out
            self._dead(records[0], st, f"request refused: {e.message}")
            return []
        self.stats.up = True
        self.stats.last_success = time.time()
        body = resp.body if hasattr(resp, "body") else resp
        retry: list[Record] = []
        items = body.get("items", [])
        if len(items) != len(records):
            raise RuntimeError(f"bulk answered {len(items)} items for {len(records)} documents")
        statuses = [next(iter(i.values())).get("status", 0) for i in items]
        back_pressure = all(st == 429 for st in statuses)  # the whole cluster says "slower": not this document's fault
        for r, item in zip(records, items):
            res = next(iter(item.values()))
            st = res.get("status", 0)
            if st in RETRYABLE_ITEM and not back_pressure:
                tries = self._item_tries[id(r)] = self._item_tries.get(id(r), 0) + 1
                if tries > self.cfg.item_max_retries:
                    err = res.get("error") or {}
                    self._dead(r, st, f"{err.get('type', 'error')}: {err.get('reason', '')} "
                                      f"(still failing after {tries} attempts)")
                    continue
            if 200 <= st < 300:
                self.stats.shipped += 1
            elif st == 409:
                self.stats.shipped += 1
                self.stats.duplicates += 1
            elif st in RETRYABLE_ITEM:
                retry.append(r)
            else:
                err = res.get("error") or {}
                reason = f"{err.get('type', 'error')}: {err.get('reason', '')}"
                cause = err.get("caused_by")
                if cause:
                    reason += f" (caused by {cause.get('type')}: {cause.get('reason')})"
                self._dead(r, st, reason)
        if retry:
            self.stats.last_error = f"{len(retry)} documents answered {sorted({next(iter(i.values())).get('status') for i in items if next(iter(i.values())).get('status') in RETRYABLE_ITEM})}"
        return retry

    def _dead(self, rec: Record, status: int, reason: str) -> None:
        self.stats.failed += 1
        log.warning("document %s refused by %s (HTTP %s): %s; set aside in %s", rec.id, rec.index, status, reason, self.dead.path)
        self.dead.write(rec, status, reason)


class FileOutput:
    """The same documents as JSON lines, rotated by size: PATH, PATH.1 ... PATH.keep."""

    def __init__(self, path: str | os.PathLike, max_bytes: int, keep: int):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")
        self.written = 0
        self.rotations = 0

    def _rotate(self) -> None:
        fh, self._fh = self._fh, None  # reopened by the next write: a failed open cannot wedge the output
        try:
            fh.close()
        except OSError as e:
            log.warning("file output: closing %s: %s", self.path, e.strerror or e)
        if self.keep <= 0:
            self.path.unlink(missing_ok=True)
        else:
            self.path.with_name(f"{self.path.name}.{self.keep}").unlink(missing_ok=True)
            for n in range(self.keep - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{n}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.rotations += 1

    def write(self, docs: list[tuple[str, str, dict]]) -> None:
        try:
            for _id, _stream, doc in docs:
                line = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode() + b"\n"
                if self._fh is not None and self._fh.tell() > 0 and self._fh.tell() + len(line) > self.max_bytes:
                    self._rotate()
                if self._fh is None:
                    self._fh = open(self.path, "ab")
                self._fh.write(line)
                self.written += 1
            self._fh.flush()
        except OSError:
            # drop the handle (and whatever its buffer holds): the next write starts on a fresh one
            fh, self._fh = self._fh, None
            if fh is not None:
                try:
                    fh.close()
                except OSError:
                    pass
            raise

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            fh.close()


class Shipping:
    """Everything ``kvmscope run`` needs: consume snapshots, ship, report health."""

    def __init__(self, cfg, *, client=None, on_notice=None):
        self.cfg = cfg
        es = cfg.elasticsearch
        self.namespace = es.namespace
        self.builders = load_builders()
        self.spool: Spool | None = None
        self.shipper: ElasticShipper | None = None
        self.file: FileOutput | None = None
        self.errors = 0  # consume() failures (disk full...)
        self.local_ok = True  # the last local write worked
        from agent.errors import KvmscopeError

        if es.enabled:
            try:
                self.spool = Spool(es.spool_dir, es.spool_max_bytes, es.spool_fsync)
            except OSError as e:
                raise KvmscopeError(f"elasticsearch.spool_dir {es.spool_dir}: {e.strerror or e}") from None
            self.shipper = ElasticShipper(es, self.spool, client=client, on_notice=on_notice)
        if cfg.file_output.enabled:
            fo = cfg.file_output
            try:
                self.file = FileOutput(fo.path, fo.max_bytes, fo.keep)
            except OSError as e:
                raise KvmscopeError(f"file_output.path {fo.path}: {e.strerror or e}") from None
        self._prev: Snapshot | None = None
        self._lock = threading.Lock()
        et = logging.getLogger("elastic_transport")
        if et.level == logging.NOTSET:
            et.setLevel(logging.WARNING)  # one INFO line per request otherwise

    @property
    def active(self) -> bool:
        return self.spool is not None or self.file is not None

    def start(self) -> "Shipping":
        if self.shipper:
            self.shipper.start()
        return self

    def submit(self, docs: list[tuple[str, str, dict]]) -> None:
        with self._lock:
            try:
                if self.spool is not None:
                    self.spool.append(docs)
                if self.file is not None:
                    self.file.write(docs)
                self.local_ok = True
            except Exception as e:  # never let a local fault stop the collection cycle
                self.errors += 1
                if self.local_ok:
                    log.error("shipping: cannot write %d documents locally: %s (counted in "
                              "kvmscope_shipping_local_errors_total until it works again)", len(docs), e)
                self.local_ok = False

    def consume(self, snap: Snapshot) -> None:
        """``agent.on_snapshot`` callback: build the cycle's documents and append them locally."""
        docs = documents(snap, self._prev, self.namespace, self.builders)
        self._prev = snap
        self.submit(docs)

    def submit_finding(self, finding: dict, host: str, ts: float | None = None) -> None:
        self.submit([finding_doc(finding, host, self.namespace, ts or time.time())])

    def submit_incident(self, incident: dict, event: str) -> None:
        """An incident opened or resolved (agent.diagnose.incidents): one ``logs-kvmscope.incidents`` document."""
        self.submit([incident_doc(incident, event, self.namespace)])

    def stop(self, timeout: float | None = None) -> None:
        """Stop shipping and close the local files. Never raises: the caller still has to stop its server."""
        for what, fn in (("shipper", self.shipper and self.shipper.stop), ("spool", self.spool and self.spool.close),
                         ("file output", self.file and self.file.close)):
            if not fn:
                continue
            try:
                fn(timeout) if what == "shipper" else fn()
            except Exception as e:
                log.error("shipping: stopping the %s: %s", what, e)

    def health(self) -> dict:
        """Numbers for /metrics and the console."""
        local_errors = self.errors + (self.spool.stats.state_errors if self.spool is not None else 0)
        local_ok = self.local_ok and (self.spool is None or self.spool.last_write_ok)
        out: dict = {"file_written": self.file.written if self.file else None, "local_errors": local_errors,
                     "local_ok": local_ok}
        if self.spool is not None:
            oldest = self.spool.oldest_pending_time()
            out.update(
                queued=self.spool.pending(),
                spool_bytes=self.spool.bytes_on_disk(),
                dropped=self.spool.stats.dropped,
                corrupt=self.spool.stats.corrupt,
                oldest_age=max(0.0, time.time() - oldest) if oldest else 0.0,
            )
        if self.shipper is not None:
            s = self.shipper.stats
            out.update(
                shipped=s.shipped,
                duplicates=s.duplicates,
                retried=s.retried,
                failed=s.failed,
                bulk_requests=s.bulk_requests,
                bulk_errors=s.bulk_errors,
                up=s.up and local_ok,  # healthy only if documents both reach the disk and leave it
                es_up=s.up,
                last_error=s.last_error,
            )
        return out
