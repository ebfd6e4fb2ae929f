"""``GET /metrics`` of ``transferkit serve``: Prometheus text format (``prometheus_client``).

With several gunicorn workers each is a process of its own, so the figures are kept in prometheus_client's
multiprocess mode: ``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before the workers fork, each
worker writes its counters there (memory-mapped files), ``/metrics`` adds them up whichever worker answers, and a
dead worker's live figures are marked gone (``child_exit``). Only counters and histograms: they add up across
workers. The unknown rate is ``transferkit_unknown_total / transferkit_images_total``.
"""

from __future__ import annotations

import os

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NOVELTY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
_METRICS: dict | None = None


def metrics() -> dict:
    """This process's metric objects (made once: prometheus_client refuses a second registration)."""
    global _METRICS
    if _METRICS is None:
        from prometheus_client import Counter, Histogram

        _METRICS = {
            "requests": Counter("transferkit_requests", "HTTP requests", ["endpoint", "status"]),
            "latency": Histogram("transferkit_request_seconds", "time to answer POST /api/predict",
                                 buckets=LATENCY_BUCKETS),
            "images": Counter("transferkit_images", "images answered"),
            "answers": Counter("transferkit_answers", "answers per class ('unknown': unlike every class; 'none': "
                                                      "a multi-label answer of no label)", ["label"]),
            "unknown": Counter("transferkit_unknown", "images answered unknown (novelty above the threshold)"),
            "novelty": Histogram("transferkit_novelty", "novelty of the answered images (above 1 = unknown)",
                                 buckets=NOVELTY_BUCKETS),
            "errors": Counter("transferkit_errors", "requests refused or failed, by kind", ["kind"]),
            "collect": Counter("transferkit_collect", "predictions offered to the store (serve --collect), by "
                                                      "outcome: stored, dropped_queue_full, not_collected", ["outcome"]),
            "feedback": Counter("transferkit_feedback", "corrections recorded (POST /api/feedback)", ["kind"]),
        }
    return _METRICS


def observe_answers(rows: list[dict], seconds: float) -> None:
    m = metrics()
    m["latency"].observe(seconds)
    for row in rows:
        m["images"].inc()
        unknown = bool(row.get("unknown"))
        names = row["labels"] if "labels" in row else [row.get("label")]  # multi-label rows: each label given
        for name in ["unknown"] if unknown else [n for n in names if n is not None] or ["none"]:
            m["answers"].labels(label=name).inc()
        if unknown:
            m["unknown"].inc()
        if row.get("novelty") is not None:
            m["novelty"].observe(float(row["novelty"]))


ERROR_KINDS = {400: "bad_request", 401: "unauthorised", 403: "forbidden", 404: "not_found", 405: "method",
               411: "length_required", 413: "too_large", 415: "media_type", 500: "internal", 503: "unavailable"}


def observe_request(endpoint: str, status: int) -> None:
    m = metrics()
    m["requests"].labels(endpoint=endpoint, status=str(status)).inc()
    if status >= 400:
        m["errors"].labels(kind=ERROR_KINDS.get(status, f"http_{status}")).inc()


def exposition() -> tuple[bytes, str]:
    """(the text of every metric, summed over the workers in multiprocess mode; its content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    metrics()
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def prepare_multiprocess() -> str:
    """In gunicorn's master, before the fork: a fresh folder for the workers' figures (unless one is set)."""
    import tempfile

    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        import atexit
        import shutil

        folder = tempfile.mkdtemp(prefix="transferkit-metrics-")
        os.environ[MULTIPROC_ENV] = folder
        master = os.getpid()  # the workers inherit this handler: only the master removes the folder
        atexit.register(lambda: os.getpid() == master and shutil.rmtree(folder, ignore_errors=True))
    return folder


def worker_gone(pid: int) -> None:
    """gunicorn's child_exit: a dead worker's live figures are dropped (its counters stay counted)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
