"""The collector of ``serve --collect DB``: each answered upload goes to a bounded in-memory queue, and one writer
thread per worker stores them (the file, then the rows of a batch in one transaction). A request only appends to
the queue, so the store never delays or fails an answer: when the queue is full (``QUEUE_ITEMS``, or
``QUEUE_BYTES`` of uploads waiting) the prediction is dropped, and when the database is corrupt, locked past its
busy timeout or unreachable the batch is "not collected"; both are counted in ``/metrics``
(``transferkit_collect_total{outcome}``) and logged once a minute at most. 200 concurrent uploads on 2 workers
were all stored (tests/test_collect.py). The writer's CPU per stored answer is 0.21 ms in batches (a 185 kB
upload: hash, file, row; 1.75 ms committed one by one, hence the ``LINGER``), against about 12 ms to answer;
``benchmarks/serve.py --collect`` measures req/s and p95 with and without.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import uuid

from transferkit.apps.metrics import metrics
from transferkit.data.collected import Store, StoreError
from transferkit.log import logger

QUEUE_ITEMS = 2048
QUEUE_BYTES = 256 * 1024 * 1024
BATCH = 64
# a batch waits this long for more rows: one transaction for several answers (SQLite: 1.75 ms of CPU per row
# committed alone, 0.21 ms in batches of 16, a 185 kB upload each, file included)
LINGER = 0.05
_OPEN: list["Collector"] = []  # this process's collectors, flushed by gunicorn's worker_exit (close_all)


class Collector:
    """Stores predictions of model ``model_hash`` in ``target`` (a SQLite path or a database URL)."""

    def __init__(self, target: str, model_hash: str, files: str | None = None, model: tuple | None = None):
        self.target, self.model_hash, self.files, self.model = target, model_hash, files, model
        self.store: Store | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self.pending_bytes, self.lock = 0, threading.Lock()
        self.last_warning = 0.0
        self._open()
        self.thread = threading.Thread(target=self._run, name="transferkit-collect", daemon=True)
        self.thread.start()
        _OPEN.append(self)

    def _open(self) -> None:
        try:
            self.store = Store(self.target, self.files)
        except StoreError as exc:
            self.store = None
            self._warn(f"{exc}: predictions are not collected (counted in /metrics)")
            return
        if self.model is not None:  # (path, summary): what monitor compares the window with
            try:
                self.store.register_model(self.model_hash, *self.model)
            except Exception as exc:  # noqa: BLE001 - locked at start: the predictions are still collected
                logger.warning(f"{self.target}: the model's reference not stored ({_reason(exc)})")

    @property
    def available(self) -> bool:
        return self.store is not None

    def submit(self, rows: list[dict], uploads: list[bytes], seconds: float) -> None:
        """Queue each answered row with its upload; the row gets ``prediction_id`` (for POST /api/feedback) when
        queued. Never raises, never blocks."""
        counter = metrics()["collect"]
        created, worker = time.time(), os.getpid()
        for row, data in zip(rows, uploads):
            if self.store is None:
                counter.labels(outcome="not_collected").inc()
                continue
            with self.lock:
                fits = self.pending_bytes + len(data) <= QUEUE_BYTES
                if fits:
                    self.pending_bytes += len(data)
            uid = uuid.uuid4().hex
            item = (uid, row_record(row, created, seconds, worker, self.model_hash), data)
            try:
                if not fits:
                    raise queue.Full
                self.queue.put_nowait(item)
            except queue.Full:
                if fits:
                    with self.lock:
                        self.pending_bytes -= len(data)
                counter.labels(outcome="dropped_queue_full").inc()
                continue
            row["prediction_id"] = uid

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            until = time.monotonic() + LINGER
            while len(batch) < BATCH and batch[-1] is not None:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, until - time.monotonic())))
                except queue.Empty:
                    break
            live = [item for item in batch if item is not None]
            if live:
                self._write(live)
            for _ in batch:
                self.queue.task_done()
            if len(live) < len(batch):  # the close sentinel
                return

    def _write(self, batch: list) -> None:
        counter = metrics()["collect"]
        with self.lock:
            self.pending_bytes -= sum(len(data) for _, _, data in batch)
        records = []
        try:
            for uid, record, data in batch:
                digest = hashlib.sha256(data).hexdigest()
                ext = self.store.write_image(digest, data)
                records.append(record | {"uid": uid, "image": digest, "ext": ext})
            self.store.insert_predictions(records)
        except Exception as exc:  # noqa: BLE001 - locked, corrupt, disk full, server gone: counted, never raised
            counter.labels(outcome="not_collected").inc(len(batch))
            self._warn(f"{self.target}: {len(batch)} prediction(s) not collected ({_reason(exc)})")
            return
        counter.labels(outcome="stored").inc(len(batch))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued prediction is written (or ``timeout``); whether the queue is empty."""
        deadline = time.time() + timeout
        while self.queue.unfinished_tasks and time.time() < deadline:
            time.sleep(0.01)
        return not self.queue.unfinished_tasks

    def close(self, timeout: float = 10.0) -> None:
        if self.thread.is_alive():
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self.thread.join(timeout)
        if self.store is not None:
            self.store.close()
        if self in _OPEN:
            _OPEN.remove(self)

    def _warn(self, message: str) -> None:
        now = time.time()
        if now - self.last_warning > 60:
            self.last_warning = now
            logger.warning(message)


def row_record(row: dict, created: float, seconds: float, worker: int, model_hash: str) -> dict:
    """The stored columns of one answered row (its top-k as JSON; a multi-label answer whole, see
    :func:`answer_of`)."""
    return {"created": created, "model": model_hash, "filename": str(row.get("filename") or "")[:200],
            "label": row.get("label"), "probability": row.get("probability"), "novelty": row.get("novelty"),
            "unknown": row.get("unknown"), "latency_ms": round(seconds * 1000, 3), "worker": worker,
            "top_k": json.dumps(row.get("top_k") or [], ensure_ascii=False), "answer": answer_of(row)}


def answer_of(row: dict) -> str | None:
    """A multi-label row's whole answer as JSON: ``labels`` (every label over its threshold, most probable
    first; none for an unknown photo) and ``scores`` (every label's probability), what review's per-label
    margin and monitor's per-label rates read; None for a single-label row (``label`` and ``top_k`` say it)."""
    if "labels" not in row:
        return None
    scores = {str(k): round(float(v), 6) for k, v in (row.get("scores") or {}).items()}
    whole = {"labels": list(row["labels"]), "scores": scores} | ({"set": list(row["set"])} if "set" in row else {})
    return json.dumps(whole, ensure_ascii=False)  # set: the conformal labels, when ?coverage= asked for them


def close_all() -> None:
    """Flush and close this process's collectors (gunicorn's worker_exit; atexit otherwise)."""
    for collector in list(_OPEN):
        collector.close()


def _reason(exc: BaseException) -> str:
    from transferkit.data.collected import _reason as reason

    return reason(exc)
