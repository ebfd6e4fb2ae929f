"""The ``transferkit`` command: a thin layer over the Python API (train, evaluate, predict, backbones, demo)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys

from transferkit._version import __version__
from transferkit.errors import TransferkitError


def _runtime_args(parser, default: str) -> None:
    parser.add_argument("--runtime", default=default, choices=["auto", "keras", "onnxruntime", "openvino"],
                        help="inference engine (default %(default)s; auto = fastest installed)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="bf16 needs openvino and a CPU with native bf16; checked against fp32 (default auto)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="transferkit", description="Image classifiers by transfer learning (Keras 3).")
    p.add_argument("--version", action="version", version=f"transferkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a classifier on DATA_DIR/<class>/<images>")
    t.add_argument("data_dir")
    t.add_argument("--test-dir", help="a separate labelled folder, evaluated at the end")
    t.add_argument("--backbone", default="efficientnet_lite0", help="see `transferkit backbones` (default: %(default)s)")
    t.add_argument("--weights", default="imagenet", help="'imagenet' (default) or PATH to a local weights file")
    t.add_argument("--image-size", type=int, help="square input size (default: the backbone's)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--val-split", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--augment-views", type=int, default=4, help="augmented views per training image (default 4)")
    t.add_argument("--class-weight", choices=["balanced", "none"], default="balanced")
    t.add_argument("--head", choices=["gap", "flatten-256-128"], default="gap")
    t.add_argument("--learning-rate", type=float, default=1e-3)
    t.add_argument("--patience", type=int, default=8, help="epochs without val_accuracy gain before stopping")
    t.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    t.add_argument("--fine-tune-epochs", type=int, default=0, help="second stage: epochs of end-to-end training")
    t.add_argument("--unfreeze-top", type=int, default=2, help="backbone blocks to unfreeze, from the top")
    t.add_argument("--fine-tune-lr", type=float, default=1e-5)
    t.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning in --out")
    _runtime_args(t, "auto")
    t.add_argument("--out", help="run folder (default runs/<date-time>)")
    t.add_argument("--quiet", action="store_true")

    e = sub.add_parser("evaluate", help="evaluate MODEL on TEST_DIR/<class>/<images>")
    e.add_argument("model")
    e.add_argument("test_dir")
    e.add_argument("--out", help="folder for metrics.json and confusion_matrix.png")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    _runtime_args(e, "auto")

    r = sub.add_parser("predict", help="predict image files, folders or globs")
    r.add_argument("model")
    r.add_argument("paths", nargs="+")
    r.add_argument("--top-k", type=int, default=3)
    r.add_argument("--format", choices=["table", "csv", "json"], default="table")

    r.add_argument("--show", metavar="OUT.png", help="also draw the image(s) with label, probability and top-k bars")
    _runtime_args(r, "auto")

    i = sub.add_parser("inspect", help="dataset health: counts, imbalance, unreadable files, duplicates, leakage")
    i.add_argument("data_dir")
    i.add_argument("--test-dir")
    i.add_argument("--out", default=os.path.join("runs", "inspect"), help="folder for health.json, samples.png")
    i.add_argument("--near-threshold", type=int, default=6, help="perceptual-hash bits for a near duplicate")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    s = sub.add_parser("serve", help="web page + JSON API for MODEL on a production WSGI server (gunicorn)")
    s.add_argument("model")
    s.add_argument("--host", default="127.0.0.1", help="default %(default)s (this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    s.add_argument("--threads", type=int, default=4, help="request threads per worker")
    s.add_argument("--max-upload-mb", type=float, default=20.0)
    s.add_argument("--top-k", type=int, default=3)
    _runtime_args(s, "auto")

    x = sub.add_parser("export", help="export MODEL to ONNX, TFLite or a SavedModel (class names carried along)")
    x.add_argument("model")
    x.add_argument("--format", required=True, choices=["onnx", "tflite", "saved_model"])
    x.add_argument("--quantize", default="none", choices=["none", "int8", "float16"])
    x.add_argument("--calibration", help="photos for int8 calibration (default: the training folder)")
    x.add_argument("--out", required=True, help="file (.onnx, .tflite) or folder (saved_model)")

    sub.add_parser("backbones", help="list the backbones")

    d = sub.add_parser("demo", help="train and evaluate on scikit-learn's bundled digits (offline)")
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--data", default="demo_data")
    return p


def _print_rows(rows: list[dict], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        k = max((len(r["top_k"]) for r in rows), default=0)
        writer.writerow(["path", "label", "probability"] + [f"top{i + 1}_{c}" for i in range(k) for c in ("label", "probability")] + ["error"])
        for r in rows:
            tops = [x for t in r["top_k"] for x in (t["label"], f"{t['probability']:.6f}")]
            tops += [""] * (2 * k - len(tops))
            prob = "" if r["probability"] is None else f"{r['probability']:.6f}"
            writer.writerow([r["path"], r["label"] or "", prob] + tops + [r.get("error", "")])
        sys.stdout.write(buf.getvalue())
        return
    for r in rows:
        if r.get("error"):
            print(f"{r['path']}\tERROR: {r['error']}")
        else:
            others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"][1:])
            print(f"{r['path']}\t{r['label']}\t{r['probability']:.3f}" + (f"\t({others})" if others else ""))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except TransferkitError as exc:
        print(f"transferkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transferkit: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "train":
        from transferkit.training import train

        train(args.data_dir, test_dir=args.test_dir, backbone=args.backbone, image_size=args.image_size,
              epochs=args.epochs, val_split=args.val_split, seed=args.seed, batch_size=args.batch_size,
              augment_views=args.augment_views, class_weight=args.class_weight, head=args.head, out=args.out,
              weights=args.weights, learning_rate=args.learning_rate, patience=args.patience,
              cache=not args.no_cache, fine_tune_epochs=args.fine_tune_epochs, unfreeze_top=args.unfreeze_top,
              fine_tune_lr=args.fine_tune_lr, resume=args.resume, runtime=args.runtime, precision=args.precision,
              verbose=not args.quiet)
    elif args.command == "evaluate":
        from transferkit.evaluation import evaluate
        from transferkit.metrics import text_report

        metrics = evaluate(args.model, args.test_dir, out=args.out, runtime=args.runtime, precision=args.precision)
        if args.json:
            keys = ("accuracy", "class_names", "per_class", "confusion_matrix", "n_images", "skipped")
            print(json.dumps({k: metrics[k] for k in keys} | {k: v for k, v in metrics.items() if k not in keys},
                             ensure_ascii=False))
        else:
            print(text_report(metrics))
    elif args.command == "predict":
        from transferkit.prediction import predict

        rows = predict(args.model, args.paths, top_k=args.top_k, runtime=args.runtime, precision=args.precision)
        _print_rows(rows, args.format)
        if args.show:
            from transferkit.prediction import show_predictions

            for path in show_predictions(rows, args.show):
                print(f"transferkit: wrote {path}", file=sys.stderr)
    elif args.command == "inspect":
        from transferkit.health import inspect_dataset, text_summary, write_inspection

        report = inspect_dataset(args.data_dir, args.test_dir, near_threshold=args.near_threshold,
                                 progress=not args.json)
        written = write_inspection(report, args.out)
        if args.json:
            print(json.dumps(report, ensure_ascii=False))
        else:
            print(text_summary(report))
            print(f"\nwrote {written['json']} and {written['samples']}")
    elif args.command == "serve":
        from transferkit.serve import serve

        serve(args.model, host=args.host, port=args.port, workers=args.workers, threads=args.threads,
              max_upload_mb=args.max_upload_mb, top_k=args.top_k, runtime=args.runtime, precision=args.precision)
    elif args.command == "export":
        from transferkit.export import export_model

        done = export_model(args.model, args.format, args.out, quantize=args.quantize, calibration=args.calibration)
        print(f"transferkit: exported {args.model} to {done['path']} ({done['format']}, quantize {done['quantize']})")
    elif args.command == "backbones":
        from transferkit.backbones import describe

        for b in describe():
            print(f"{b['name']:<20} {b['default_size']:>4}px  {b['feature_dim']:>5} features  "
                  f"{'offline' if b['offline'] else 'download'}  {b['weights']}")
    elif args.command == "demo":
        from transferkit.demo import run_demo

        run_demo(args.data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
