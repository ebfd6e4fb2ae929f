"""The server's loop back (``serve --collect DB``): the collector hooked after each answer, ``POST /api/feedback``
for a person's correction, and ``GET /metrics``.

``POST /api/feedback`` takes ``{"prediction_id": ..., "kind": "wrong" | "none" | "right", "label": X}``. It is
CSRF-safe without cookies or sessions: only ``application/json`` is accepted (a cross-site form cannot send it
without a CORS preflight, which this server never grants), a browser's ``Origin`` / ``Sec-Fetch-Site`` must be
this server, and the body is at most ``MAX_BODY`` bytes (411 without a length). With ``--feedback-token`` the
header ``X-Feedback-Token`` must carry it (compared in constant time).
"""

from __future__ import annotations

import hmac
import json
import os
import time
from urllib.parse import urlsplit

from flask import Flask, g, jsonify, request

from transferkit.apps import metrics as prom
from transferkit.log import logger

MAX_BODY = 4096
MAX_LABEL = 200
WAIT_STORED = 3.0


class Hooks:
    """What ``serve.create_app`` calls: ``after_predict`` with each answer."""

    def __init__(self, collector):
        self.collector = collector

    def after_predict(self, rows: list[dict], files) -> None:
        seconds = time.perf_counter() - g.get("transferkit_start", time.perf_counter())
        prom.observe_answers(rows, seconds)
        if self.collector is None:
            return
        uploads = []
        for upload in files:  # already read once by the prediction: read again from the start (in memory)
            upload.stream.seek(0)
            uploads.append(upload.stream.read())
        self.collector.submit(rows, uploads, seconds)


def install(app: Flask, model, options, model_path: str, info: dict) -> Hooks:
    """Add /metrics and /api/feedback to ``app``, time every request, and start the collector (``--collect``)."""
    collector = None
    if options.collect:
        from transferkit.apps.collect import Collector
        from transferkit.files import known_digest

        summary = {"class_names": model.class_names} | {  # task_params: a multi-label model's thresholds
            k: model.metadata.get(k) for k in ("reference", "task", "task_params")} | {
            k: info.get(k) for k in ("backbone", "image_size", "validation")}
        collector = Collector(options.collect, known_digest(model_path)[:16], options.collect_files,
                              (os.path.abspath(model_path), summary))
        logger.info(f"collecting predictions in {options.collect}")
    info["feedback"] = {"enabled": collector is not None and collector.available, "token": bool(options.feedback_token)}
    prom.metrics()

    @app.before_request
    def start_clock():
        g.transferkit_start = time.perf_counter()

    @app.after_request
    def count(response):
        prom.observe_request(request.endpoint or "other", response.status_code)
        return response

    @app.get("/metrics")
    def metrics_text():
        body, content_type = prom.exposition()
        return body, 200, {"Content-Type": content_type}

    @app.post("/api/feedback")
    def api_feedback():
        refused = _refused(options.feedback_token, collector)
        if refused:
            return jsonify({"error": refused[1]}), refused[0]
        try:
            body = json.loads(request.get_data(cache=False).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return jsonify({"error": "the body is not JSON"}), 400
        parsed = parse_feedback(body)
        if isinstance(parsed, str):
            return jsonify({"error": parsed}), 400
        return _record(collector, *parsed)

    return Hooks(collector)


def _refused(token: str | None, collector) -> tuple[int, str] | None:
    """(status, reason) when the request may not record a correction."""
    if collector is None or not collector.available:
        return 404, "feedback needs serve --collect DB (and a store that opens)"
    if request.mimetype != "application/json":
        return 415, "send the correction as application/json"
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site not in (None, "same-origin", "none") or (origin and urlsplit(origin).netloc != request.host):
        return 403, "cross-site request refused"
    if request.content_length is None:
        return 411, "a Content-Length is needed"
    if request.content_length > MAX_BODY:
        return 413, f"a correction is at most {MAX_BODY} bytes"
    if token and not hmac.compare_digest(request.headers.get("X-Feedback-Token", "").encode(), token.encode()):
        return 401, "wrong or missing X-Feedback-Token"
    return None


def parse_feedback(body) -> tuple[str, str, str | None] | str:
    """(prediction id, kind, label) of a correction, or the reason it is refused."""
    from transferkit.data.collected import KINDS

    if not isinstance(body, dict):
        return "expected a JSON object"
    uid, kind, label = body.get("prediction_id"), body.get("kind"), body.get("label")
    if not isinstance(uid, str) or len(uid) != 32 or not all(c in "0123456789abcdef" for c in uid):
        return "prediction_id: expected the 32 hex digits the prediction answered with"
    if kind not in KINDS:
        return f"kind: one of {', '.join(KINDS)}"
    if kind == "wrong":
        if not isinstance(label, str) or not label.strip() or len(label) > MAX_LABEL or any(
                ch in label for ch in "\r\n\t"):
            return f"label: the right class, a name of 1 to {MAX_LABEL} characters on one line"
        return uid, kind, label.strip()
    return uid, kind, None


def _record(collector, uid: str, kind: str, label: str | None):
    """Store the correction once its prediction is stored: it may still be in this worker's queue (flushed
    first) or in another worker's (waited for, up to ``WAIT_STORED`` seconds)."""
    try:
        found = collector.store.add_feedback(uid, kind, label)
        deadline = time.monotonic() + WAIT_STORED
        if not found:
            collector.flush(timeout=WAIT_STORED)
        while not found and time.monotonic() < deadline:
            found = collector.store.add_feedback(uid, kind, label)
            if not found:
                time.sleep(0.1)
    except Exception as exc:  # noqa: BLE001 - the store is down: the correction is refused, the server goes on
        prom.metrics()["errors"].labels(kind="feedback_store").inc()
        logger.warning(f"{collector.target}: correction not recorded ({exc.__class__.__name__})")
        return jsonify({"error": "the store is unavailable; the correction was not recorded"}), 503
    if not found:
        return jsonify({"error": f"no stored prediction {uid}"}), 404
    prom.metrics()["feedback"].labels(kind=kind).inc()
    return jsonify({"recorded": True, "prediction_id": uid, "kind": kind, "label": label})
