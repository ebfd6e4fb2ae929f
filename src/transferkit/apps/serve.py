"""The web app and JSON API (`transferkit serve`): Flask behind gunicorn, the model file loaded once per worker.

    GET  /             a page: pick or drop a photo, see it with its label, probability and top-k bars
    POST /api/predict  multipart field `image` (one or several files) -> {"predictions": [...], "model": {...}};
                       ?explain=1 adds to each prediction "explanation": a PNG data URI of the photo with its
                       heat map (Grad-CAM; the Keras model is loaded at the first such request, not before)
    GET  /api/model    class names, backbone, image size, training metrics
    GET  /healthz      200 once the model is loaded

Uploads stay in memory (never written under a client-chosen name); bodies over the size limit, and requests whose
images add up to more pixels than ``--max-request-pixels`` (read from their headers, before any decoding), get
413; anything that is not a decodable image within the per-image pixel budget gets 400 with a one-line JSON
error, and serving goes on. Under the hostile corpus the server's peak RSS stayed at 1.4 GB (3.9 GB with the
budgets lifted to Pillow's limit; ``benchmarks/hostile_serve.py``).
"""

from __future__ import annotations

import os
import threading
from importlib import resources

import numpy as np
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from transferkit.apps import feedback
from transferkit.apps import metrics as prom
from transferkit.apps.collect import close_all
from transferkit.errors import TransferkitError
from transferkit.log import logger
from transferkit.options import ServeOptions
from transferkit.data.images import OverPixelBudget, check_pixel_budget, load_image

MAX_FILES = 64  # images per request; past MAX_FILES + FORM_SLACK form parts werkzeug stops reading the body
FORM_SLACK = 16  # parts of a request besides its images (none is read today)


def model_info(model) -> dict:
    """What /api/model tells about the loaded model (plain data from its metadata)."""
    meta = model.metadata
    return {
        "class_names": model.class_names,
        "backbone": meta.get("backbone"),
        "image_size": model.image_size,
        "validation": meta.get("validation"),
        "test": meta.get("test"),
        "created": meta.get("created"),
        "transferkit_version": meta.get("transferkit_version"),
        "conformal": isinstance(meta.get("conformal"), dict),  # ?coverage= / ?max_error= are answered
        "class_coverage": isinstance((meta.get("conformal") or {}).get("per_class"), list),  # ?class_coverage=
    }


def create_app(model_path: str, options: ServeOptions | None = None) -> Flask:
    """A Flask app serving ``model_path``; the model is loaded and warmed up here, once: from its cached converted
    engine where an earlier use left one (no TensorFlow import: the server starts in about 2 s), else with Keras,
    imported here in the worker after gunicorn's fork, never in the master."""
    from transferkit.api import load_predictor

    options = options or ServeOptions()
    max_upload_mb, top_k = options.max_upload_mb, options.top_k
    model = load_predictor(model_path, runtime=options.runtime, precision=options.precision)
    lock = threading.Lock()  # one inference at a time per worker: TensorFlow already uses every core for it
    info, explainer = model_info(model), _explainer(model)
    _warm_up(model)
    page = resources.files("transferkit.apps").joinpath("static/index.html").read_text(encoding="utf-8")
    app = _flask_app(max_upload_mb)
    hooks = feedback.install(app, model, options, model_path, info)  # /metrics, /api/feedback, --collect

    def error(status: int, message: str):
        return jsonify({"error": message}), status

    @app.get("/")
    def index():
        return page, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/api/model")
    def api_model():
        return jsonify(info)

    @app.post("/api/predict")
    def api_predict():
        files = request.files.getlist("image")
        if not files:
            return error(400, "no file in multipart field 'image'")
        if len(files) > MAX_FILES:
            return error(413, f"at most {MAX_FILES} files per request ({len(files)} sent)")
        k = request.args.get("top_k", default=top_k, type=int)
        explain = request.args.get("explain", "").strip().lower() in ("1", "true", "yes")
        if explain and explainer is None:
            return error(400, f"explain=1 needs a .keras model file; {os.path.basename(model_path)} has no gradients")
        try:
            rows = _predict_uploads(model, lock, files, k, options.max_request_pixels, explainer if explain else None,
                                    _guarantees(request.args))
        except OverPixelBudget as exc:
            return error(413, f"{exc.path}: {exc.reason}")
        except TransferkitError as exc:  # an unreadable upload (path: reason), a bad coverage / max_error, a
            return error(400, str(exc))  # model without the calibration
        hooks.after_predict(rows, files)
        reply = {"predictions": rows, "model": {"backbone": info["backbone"], "class_names": info["class_names"]}}
        from transferkit.engines.predict import guarantee_note

        note = guarantee_note(model, _guarantees(request.args).get("max_error"))
        return jsonify(reply | ({"note": note} if note else {}))

    return app


def _flask_app(max_upload_mb: float) -> Flask:
    """The Flask app with its upload limits, every HTTP error answered as one JSON line ``{"error": ...}``."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    app.config["MAX_FORM_PARTS"] = MAX_FILES + FORM_SLACK  # werkzeug's 413 past it: answered as too many files
    app.config["MAX_FORM_MEMORY_SIZE"] = None  # a text field is bounded by MAX_CONTENT_LENGTH, as files are

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        if isinstance(exc, RequestEntityTooLarge):
            size = request.content_length
            if size is not None and size <= app.config["MAX_CONTENT_LENGTH"]:  # not the body: its parts
                return jsonify({"error": f"at most {MAX_FILES} files per request"}), 413
            return jsonify({"error": f"upload larger than the {max_upload_mb:g} MB limit"}), 413
        return jsonify({"error": exc.description or exc.name}), exc.code or 500

    return app


def _guarantees(args) -> dict:
    """``?coverage=`` / ``?max_error=`` / ``?expected_error=`` / ``?class_coverage=`` as ``PredictOptions``
    checks them (one-line OptionError)."""
    from transferkit.engines.predict import GUARANTEES
    from transferkit.errors import OptionError
    from transferkit.options import PredictOptions

    asked = {}
    for name in GUARANTEES:
        text = args.get(name)
        if text is not None and text.strip():
            try:
                asked[name] = float(text)
            except ValueError:
                raise OptionError(name, "must be a number", text) from None
    PredictOptions(**asked)
    return asked


def _explainer(model):
    """The heat maps' explainer of ``model`` (None for an ONNX export); it imports no TensorFlow: the Keras
    model is loaded at the first ``explain=1`` request."""
    from transferkit.reports.explain import Explainer

    return Explainer.for_predictor(model)


def _warm_up(model) -> None:
    """Trace the compiled step for small batches before the first request, on the validation photos stored in
    the model file: the engine (OpenVINO, bf16) is converted and checked against Keras on them. A model file
    without photos is checked on the first real request instead, never on synthetic images."""
    photos = getattr(model, "check_images_", None)
    if photos is None:
        return
    for n in (1, 2, 4):
        model.predict_images(photos[np.arange(n) % len(photos)])


def _predict_uploads(model, lock: threading.Lock, files, top_k: int, max_pixels: int, explainer=None,
                     asked: dict | None = None) -> list[dict]:
    """Check every upload's header and the request's pixel budget (OverPixelBudget) before decoding any, then
    decode them (in memory; the client's file name is echoed back, never used as a path) and make one batched
    prediction; an unreadable upload raises UnreadableImage naming it. With ``explainer``, each row gets its
    heat map as a PNG data URI (``explanation``)."""
    from transferkit.engines.predict import decide

    uploads = [(os.path.basename(upload.filename or "upload")[:200], upload.read()) for upload in files]
    check_pixel_budget(uploads, model.image_size, max_pixels)
    images = [load_image(data, model.image_size, name=name) for name, data in uploads]
    names = [name for name, _ in uploads]
    with lock:
        probs = model.predict_images(np.stack(images))
    rows = decide(model, names, probs, top_k, **(asked or {}))
    for row in rows:
        row["filename"] = row.pop("path")
    if explainer is not None:
        _add_explanations(rows, images, uploads, explainer)
    return rows


def _add_explanations(rows: list[dict], images: list[np.ndarray], uploads: list, explainer) -> None:
    """Each row's heat map, drawn over its upload (decoded again, at most 480 px) as a PNG data URI."""
    from transferkit.data.images import open_rgb
    from transferkit.reports.explain import data_uri, explained_class, overlay_png

    classes = [explained_class(row, explainer.class_names) for row in rows]
    maps = explainer.heatmaps(np.stack(images), classes)
    for row, (name, data), heat in zip(rows, uploads, maps):
        photo = open_rgb(data, name=name, draft_size=480)
        photo.thumbnail((480, 480))
        row["explanation"] = data_uri(overlay_png(np.asarray(photo), heat))


def _convert_before_fork(model_path: str, options: ServeOptions) -> None:
    """A model file not converted yet is converted here, once, by a child process (``engines.convert``), before
    gunicorn forks: every worker then loads the cached engine without TensorFlow (a worker's peak on a fresh
    model: 2.9 GB when each converted it itself), and the master never imports TensorFlow."""
    from transferkit.engines.convert import in_child
    from transferkit.options import EngineOptions

    if not model_path.lower().endswith(".onnx"):
        in_child(model_path, EngineOptions(runtime=options.runtime, precision=options.precision))


def serve(model_path: str, options: ServeOptions | None = None) -> None:
    """Run the app on gunicorn (a production WSGI server); each worker loads the model after the fork."""
    from gunicorn.app.base import BaseApplication

    options = options or ServeOptions()
    if not os.path.isfile(model_path):
        raise TransferkitError(f"{model_path}: model file not found")
    _convert_before_fork(model_path, options)
    host, port = options.host, options.port

    class Server(BaseApplication):
        def load_config(self):
            settings = {
                "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                "workers": options.workers,
                "threads": options.threads,
                "worker_class": "gthread",
                "timeout": 120,
                "graceful_timeout": 10,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "worker_exit": lambda _arbiter, _worker: close_all(),  # the collect queue written first
                "child_exit": lambda _arbiter, worker: prom.worker_gone(worker.pid),
                "when_ready": lambda arbiter: logger.info(  # bound: the real port, also for --port 0
                    f"serving {model_path} on {', '.join(f'{a}/' for a in arbiter.LISTENERS)} "
                    f"({options.workers} worker(s) x {options.threads} threads)"),
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            return create_app(model_path, options)

    prom.prepare_multiprocess()  # before the fork: the workers' /metrics figures add up
    Server().run()
