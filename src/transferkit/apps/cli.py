"""The ``transferkit`` command: a thin layer over the Python API (train, evaluate, predict, inspect, serve, export,
backbones, demo). The flags of ``train`` and ``serve`` and the engine flags are generated from the options
records (transferkit.options): a flag's name, default, choices and help are written once, there."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys

from transferkit._version import __version__
from transferkit.apps import loop_cli
from transferkit.errors import OptionError, TransferkitError
from transferkit.log import configure, logger
from transferkit.options import EngineOptions, Options, PredictOptions, ServeOptions, TrainOptions


def add_options(parser: argparse.ArgumentParser, record: type[Options], only: tuple | None = None) -> None:
    """One flag per field of ``record`` (``batch_size`` -> ``--batch-size``; ``only``: those fields). Flags not
    given are absent from the parsed namespace, so the record's own defaults apply."""
    for f in dataclasses.fields(record):
        if only is not None and f.name not in only:
            continue
        rule = f.metadata
        flag = rule["flag"] or "--" + f.name.replace("_", "-")
        shown = rule.get("shown") or ("the backbone's" if f.default is None else f.default)
        if rule["kind"] is bool:
            action = "store_false" if flag.startswith("--no-") else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=argparse.SUPPRESS, help=rule["help"])
        else:
            parser.add_argument(flag, dest=f.name, type=rule["kind"], choices=rule["choices"],
                                default=argparse.SUPPRESS, help=f"{rule['help']} (default: {shown})")


def record_values(args: argparse.Namespace, record: type[Options]) -> dict:
    return {name: getattr(args, name) for name in record.names() if hasattr(args, name)}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=0,
                        help="warnings and errors only, no progress bars")
    common.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", help="debug messages")
    p = argparse.ArgumentParser(prog="transferkit", description="Image classifiers by transfer learning (Keras 3).")
    p.add_argument("--version", action="version", version=f"transferkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    _data_commands(command)
    _model_commands(command)
    _ecosystem_commands(command)
    loop_cli.add_commands(command)  # review, monitor
    return p


COMPARE_OPTIONS = ("image_size", "seed", "val_split", "batch_size", "class_weight", "runtime", "precision",
                   "feature_precision", "cache")


def _ecosystem_commands(command) -> None:
    c = command("compare", "compare backbones on DATA_DIR (cached features, the same split and head): accuracy, "
                           "macro F1 and images/s, and the pick")
    c.add_argument("data_dir")
    c.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2",
                   help="comma-separated backbone names (default: the offline EfficientNet-Lite0,1,2)")
    c.add_argument("--test-dir", help="a separate labelled folder: its accuracy and macro F1 too (not used to pick)")
    c.add_argument("--out", default=os.path.join("runs", "compare"), help="folder for compare.json, compare.png")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_label_file_flags(c)
    add_options(c, TrainOptions, only=COMPARE_OPTIONS)

    m = command("card", "print (or write) the model card of MODEL, rendered from its metadata")
    m.add_argument("model")
    m.add_argument("--out", help="write the Markdown there (e.g. MODEL_CARD.md) instead of printing it")


def _data_commands(command) -> None:
    t = command("train", "train a classifier on DATA_DIR/<class>/<images> (or a label file: labels.csv)")
    t.add_argument("data_dir")
    t.add_argument("--test-dir", help="a separate labelled folder (or label file), evaluated at the end")
    t.add_argument("--out", help="run folder (default runs/<date-time>)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning in --out")
    t.add_argument("--log-dir", help="write TensorBoard logs of the head and the fine-tuning here "
                                     "(tensorboard --logdir DIR)")
    t.add_argument("--add", action="append", default=[], metavar="LABELS",
                   help="a label file (e.g. from transferkit review --out) whose photos join the training split "
                        "only, never validation (repeatable); rows labelled 'unknown' join no class: they are "
                        "the unknown score's examples of none of the classes")
    add_label_file_flags(t)
    _ray_flag(t, "compute the features missing from the cache on a Ray cluster (transferkit[ray])")
    add_options(t, TrainOptions)

    i = command("inspect", "dataset health: counts, imbalance, unreadable files, duplicates, leakage")
    i.add_argument("data_dir")
    i.add_argument("--test-dir")
    add_label_file_flags(i)
    i.add_argument("--out", default=os.path.join("runs", "inspect"), help="folder for health.json, samples.png")
    i.add_argument("--near-threshold", type=int, default=6, help="perceptual-hash bits for a near duplicate")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    i.add_argument("--labels", action="store_true",
                   help="audit the labels: photos probably in the wrong class folder, and outliers (labels.html, "
                        "label_issues.csv in --out)")
    i.add_argument("--backbone", default="efficientnet_lite0", help="the backbone whose features --labels uses")
    i.add_argument("--image-size", type=int, help="the image size of --labels (default: the backbone's)")
    i.add_argument("--move-to", metavar="QUARANTINE",
                   help="move the files marked 'yes' in the 'move' column of --out's label_issues.csv (or --csv) "
                        "to QUARANTINE/<class>/; nothing is deleted, nothing else is done")
    i.add_argument("--csv", help="the edited label audit CSV for --move-to (default: OUT/label_issues.csv)")

    d = command("demo", "train and evaluate on scikit-learn's bundled digits (offline)")
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--data", default="demo_data")


def _model_commands(command) -> None:
    e = command("evaluate", "evaluate MODEL on TEST_DIR/<class>/<images>")
    e.add_argument("model")
    e.add_argument("test_dir")
    add_label_file_flags(e)
    e.add_argument("--out", help="folder for metrics.json, report.html and the confusion matrices")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    e.add_argument("--unknown-dir", help="photos of none of the classes: how many the model rejects as unknown")
    e.add_argument("--no-explain", dest="explain", action="store_false",
                   help="no heat maps in report.html (they load the model's Keras model: TensorFlow)")
    add_options(e, EngineOptions)
    add_options(e, PredictOptions, only=("max_error",))

    r = command("predict", "predict image files, folders or globs")
    r.add_argument("model")
    r.add_argument("paths", nargs="+")
    add_label_file_flags(r)
    r.add_argument("--format", choices=["table", "csv", "json"], default="table")
    r.add_argument("--show", metavar="OUT.png",
                   help="also draw the image(s) with label, probability, heat map and top-k bars")
    r.add_argument("--explain", metavar="OUT_DIR",
                   help="write OUT_DIR/<photo>.png per image: the photo with the heat map (Grad-CAM) of its class")
    add_options(r, PredictOptions)
    _ray_flag(r, "predict on a Ray cluster (transferkit[ray]) into --out, resumable")
    r.add_argument("--out", help="with --ray: the output folder, OUT.parquet or OUT.csv (Ray writes one file per "
                                 "block); files already predicted there are skipped")
    add_options(r, EngineOptions)

    s = command("serve", "web page + JSON API for MODEL on a production WSGI server (gunicorn)")
    s.add_argument("model")
    add_options(s, ServeOptions)

    x = command("export", "export MODEL to ONNX, TFLite or a SavedModel (class names carried along)")
    x.add_argument("model")
    x.add_argument("--format", required=True, choices=["onnx", "tflite", "saved_model"])
    x.add_argument("--quantize", default="none", choices=["none", "int8", "float16"])
    x.add_argument("--calibration", help="photos for int8 calibration (default: the training folder)")
    x.add_argument("--out", required=True, help="file (.onnx, .tflite) or folder (saved_model)")

    b = command("backbones", "list the backbones of the registry")
    b.add_argument("pattern", nargs="?", help="only names matching this pattern (e.g. 'efficientnet*')")
    b.add_argument("--offline", action="store_true", default=None, help="only those whose weights need no network")
    b.add_argument("--json", action="store_true", help="print one JSON list")


def _ray_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help=f"{help}: ADDRESS of a running cluster (HEAD:6379, or ray://HEAD:10001), or none for "
                             f"a local Ray instance with this machine's cores")


def add_label_file_flags(parser: argparse.ArgumentParser) -> None:
    """The columns of a label file given instead of a folder (labels.csv, a Hugging Face imagefolder)."""
    g = parser.add_argument_group("label files", "DATA may be a CSV/TSV of image paths (relative to the file) and "
                                  "labels, or a folder with a Hugging Face metadata.csv")
    g.add_argument("--path-col", help="the column of image paths (default: 'path', else 'file_name')")
    g.add_argument("--label-col", help="the column of labels (default: label)")
    g.add_argument("--split-col", help="the column of train / valid / test, honoured instead of the random split "
                                       "where present (default: split)")
    g.add_argument("--root", metavar="DIR", help="the folder the label file's paths are relative to (default: the "
                                                 "label file's own); a path that leaves it is refused")


def label_source(args, item, strict: bool = True):
    """``item`` as a LabelFile with the command's columns where it is a label file (else unchanged; ``strict``:
    a column flag given for a class folder is an error)."""
    from transferkit.data.labelfile import LabelFile, is_label_source

    if item is None or not is_label_source(item):
        given = [f for f in ("path_col", "label_col", "split_col", "root") if getattr(args, f) is not None]
        if item is not None and strict and given:
            raise TransferkitError(f"{item}: --{given[0].replace('_', '-')} is for a label file (.csv, .tsv, or a "
                                   f"folder with metadata.csv), not a class folder")
        return item
    return LabelFile(str(item), path_col=args.path_col, label_col=args.label_col or "label",
                     split_col=args.split_col or "split", root=args.root)


def _print_rows(rows: list[dict], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, ensure_ascii=False, indent=2))
    elif fmt == "csv":
        sys.stdout.write(_csv_rows(rows))
    else:
        for r in rows:
            if r.get("error"):
                print(f"{r['path']}\tERROR: {r['error']}")
            elif r.get("abstain"):  # not answered: the top-k as a hint, never as the label
                nearest = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
                print(f"{r['path']}\t(top: {nearest})" + (f"\tgiven {r['given']}" if "given" in r else "")
                      + _guarantee_text(r))
            elif "labels" in r and not r.get("unknown"):  # multi-label: every label over its threshold
                shown = ", ".join(f"{name} {r['scores'][name]:.3f}" for name in r["labels"]) or "none of the labels"
                print(f"{r['path']}\t{shown}" + (f"\tgiven {r['given']}" if "given" in r else "") + _guarantee_text(r))
            elif r["label"] is None:  # unknown: none of the classes; the nearest ones in brackets
                nearest = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"])
                print(f"{r['path']}\tunknown\tnovelty {r['novelty']:.2f}\t(nearest: {nearest})" + _guarantee_text(r))
            else:
                others = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"][1:])
                print(f"{r['path']}\t{r['label']}\t{r['probability']:.3f}" + (f"\t({others})" if others else "")
                      + (f"\tgiven {r['given']}" if "given" in r else "") + _guarantee_text(r))


def _guarantee_text(row: dict) -> str:
    """A row's conformal set (``--coverage``) and 'not sure' (``--max-error``), for the table."""
    text = f"\tset {{{', '.join(row['set'])}}}" if "set" in row else ""
    return text + ("\tnot sure" if row.get("abstain") else "")


def _csv_rows(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    k = max((len(r["top_k"]) for r in rows), default=0)
    tops_header = [f"top{i + 1}_{c}" for i in range(k) for c in ("label", "probability")]
    given = any("given" in r for r in rows)  # predicting a label file: its labels, to compare
    multi = any("labels" in r for r in rows)  # a multi-label model: the labels over their thresholds, joined by |
    sets, abstains = any("set" in r for r in rows), any("abstain" in r for r in rows)
    writer.writerow(["path", "label", "probability", "novelty"] + ["labels"] * multi + tops_header + ["error"]
                    + ["given"] * given + ["set"] * sets + ["abstain"] * abstains)
    for r in rows:
        tops = [x for t in r["top_k"] for x in (t["label"], f"{t['probability']:.6f}")]
        tops += [""] * (2 * k - len(tops))
        prob = "" if r["probability"] is None else f"{r['probability']:.6f}"
        label = "unknown" if r.get("unknown") and r["label"] is None else r["label"] or ""
        novelty = "" if r.get("novelty") is None else f"{r['novelty']:.4f}"
        writer.writerow([r["path"], label, prob, novelty] + ["|".join(r.get("labels") or [])] * multi + tops
                        + [r.get("error", "")] + [r.get("given", "")] * given + ["|".join(r.get("set", []))] * sets
                        + [str(r.get("abstain", "")).lower()] * abstains)
    return buf.getvalue()


def _train(args) -> None:
    from transferkit.api import train

    train(label_source(args, args.data_dir), test_dir=label_source(args, args.test_dir, strict=False), out=args.out,
          resume=args.resume, log_dir=args.log_dir, ray=args.ray, add=args.add, **record_values(args, TrainOptions))


def _evaluate(args) -> None:
    from transferkit.api import evaluate
    from transferkit.tasks import get_task

    metrics = evaluate(args.model, label_source(args, args.test_dir), out=args.out, unknown_dir=args.unknown_dir,
                       explain=args.explain, max_error=getattr(args, "max_error", None),
                       **record_values(args, EngineOptions))
    task = get_task(metrics.get("task") or "single_label")
    if args.json:  # the headline figures first
        keys = [k for k in ("accuracy", "micro_f1", "macro_f1", "mAP", "subset_accuracy", "class_names",
                            "per_class", "per_label", "confusion_matrix", "n_images", "skipped") if k in metrics]
        print(json.dumps({k: metrics[k] for k in keys} | {k: v for k, v in metrics.items() if k not in keys},
                         ensure_ascii=False))
    else:
        print(task.text_report(metrics))


def _predict(args) -> None:
    from transferkit.api import load_predictor, predict

    options = PredictOptions(**record_values(args, PredictOptions))  # checked before the model is read
    if args.ray is not None or args.out:
        return _predict_on_ray(args, options)
    model = load_predictor(args.model, **record_values(args, EngineOptions))
    items = [label_source(args, p, strict=False) for p in args.paths]  # a label file: its files, given labels
    rows = predict(model, items, **options.to_dict())
    explainer = None
    if args.explain or args.show:
        from transferkit.reports.explain import Explainer, write_explanations

        explainer = Explainer.for_predictor(model)
        if args.explain and explainer is None:
            raise TransferkitError(f"{args.model}: --explain needs the .keras model file (an export has no "
                                   f"gradients to explain with)")
        if args.explain:
            written = write_explanations(rows, explainer, args.explain)
            logger.info(f"wrote {len(written)} heat map(s) to {args.explain}")
    _print_rows(rows, args.format)
    if args.show:
        from transferkit.reports.plots import show_predictions

        for path in show_predictions(rows, args.show, explainer):
            logger.info(f"wrote {path}")


def _predict_on_ray(args, options: PredictOptions) -> None:
    from transferkit.api import predict_on_ray

    if args.ray is None or not args.out:
        raise TransferkitError("--ray and --out go together: predict --ray [ADDRESS] --out preds.parquet")
    if args.show or args.explain:
        raise TransferkitError("--show and --explain draw pictures on this machine: not with --ray")
    if args.ray != "local" and os.path.exists(args.ray):  # `predict M a b --ray c`: c taken as the address
        raise TransferkitError(f"--ray {args.ray}: that is a path, not a cluster address (write --ray=ADDRESS, "
                               f"or --ray local before more paths)")
    items = [label_source(args, p, strict=False) for p in args.paths]
    done = predict_on_ray(args.model, items, args.out, address=args.ray, **options.to_dict(),
                          **record_values(args, EngineOptions))
    rate = f", {done['images_per_second']:.1f} img/s" if done["images_per_second"] else ""
    print(f"transferkit: predicted {done['new']} image(s) in {done['seconds']:.1f} s{rate}; "
          f"{done['skipped_done']} already in {done['out']} skipped; {done['errors']} unreadable; "
          f"{done['rows']} rows in {done['out']}")


def _inspect(args) -> None:
    from transferkit.data.health import inspect_dataset, text_summary, write_inspection

    if args.move_to:
        return _move_marked(args)
    report = inspect_dataset(label_source(args, args.data_dir), label_source(args, args.test_dir, strict=False),
                             near_threshold=args.near_threshold,
                             progress=not args.json and args.verbosity >= 0)
    written = write_inspection(report, args.out)
    if args.labels:
        from transferkit.reports.html import write_label_report
        from transferkit.training import audit

        found = audit.audit_folder(label_source(args, args.data_dir), args.backbone, args.image_size)
        report |= found.to_json()
        written["csv"] = audit.write_csv(found, os.path.join(args.out, audit.CSV_NAME))
        written["labels"] = write_label_report(found, os.path.join(args.out, "labels.html"), written["csv"])
        write_inspection(report, args.out)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return
    print(text_summary(report))
    if args.labels:
        from transferkit.data.labelfile import is_label_source

        print(_audit_table(report, label_file=is_label_source(args.data_dir)))
    print("\nwrote " + ", ".join(written.values()))


def _audit_table(report: dict, limit: int = 20, label_file: bool = False) -> str:
    issues, outliers = report["label_issues"], report["outliers"]
    lines = [f"\nlabel audit: {len(issues)} photo(s) probably in the wrong folder, {len(outliers)} outlier(s)"]
    lines += [f"  {r['score']:.3f}  {r['given']} -> {r['suggested']}\t{r['path']}" for r in issues[:limit]]
    lines += [f"  outlier {r['score']:.3f}  {r['given']}\t{r['path']}" for r in outliers[:limit]]
    if (issues or outliers) and label_file:
        lines.append("  correct these rows' labels in the label file (label_issues.csv lists them)")
    elif issues or outliers:
        lines.append("  mark 'yes' in the 'move' column of the CSV, then: transferkit inspect DATA --move-to DIR")
    return "\n".join(lines)


def _move_marked(args) -> None:
    from transferkit.data.labelfile import is_label_source
    from transferkit.training.audit import CSV_NAME, move_marked

    if is_label_source(args.data_dir):
        raise TransferkitError(f"{args.data_dir}: --move-to moves photos between class folders; with a label file, "
                               f"correct the label column instead")
    moved = move_marked(args.csv or os.path.join(args.out, CSV_NAME), args.data_dir, args.move_to)
    if args.json:
        print(json.dumps({"moved": moved}, ensure_ascii=False))
        return
    for m in moved:
        print(f"moved {m['path']} -> {m['to']}")
    print(f"moved {len(moved)} file(s) to {args.move_to} (nothing deleted)")


def _serve(args) -> None:
    from transferkit.apps.serve import serve

    serve(args.model, ServeOptions(**record_values(args, ServeOptions)))


def _export(args) -> None:
    from transferkit.export import export_model

    done = export_model(args.model, args.format, args.out, quantize=args.quantize, calibration=args.calibration)
    print(f"transferkit: exported {args.model} to {done['path']} ({done['format']}, quantize {done['quantize']})")


def _backbones(args) -> None:
    from transferkit.models.backbones import list_backbones

    found = list_backbones(args.pattern, offline=args.offline)
    if args.json:
        print(json.dumps(found, ensure_ascii=False, indent=2))
        return
    for b in found:
        print(f"{b['name']:<20} {b['default_size']:>4}px  {b['feature_dim']:>5} features  {b['n_blocks']:>3} blocks  "
              f"{'offline' if b['offline'] else 'download'}  {b['weights']}")


def _demo(args) -> None:
    from transferkit.apps.demo import run_demo

    run_demo(args.data, args.out)


def _compare(args) -> None:
    from transferkit.api import compare
    from transferkit.training.compare import text_table

    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    found = compare(label_source(args, args.data_dir), backbones=names,
                    test_dir=label_source(args, args.test_dir, strict=False), out=args.out,
                    **record_values(args, TrainOptions))
    if args.json:
        print(json.dumps(found, ensure_ascii=False))
        return
    print(text_table(found))
    print(f"\nwrote {found['json']}, {found['plot']}")


def _card(args) -> None:
    from transferkit.api import model_card

    text = model_card(args.model, out=args.out)
    if args.out:
        print(f"transferkit: wrote {args.out}")
    else:
        sys.stdout.write(text)


COMMANDS = {"compare": _compare, "card": _card, "train": _train, "evaluate": _evaluate, "predict": _predict, "inspect": _inspect, "serve": _serve,
            "export": _export, "backbones": _backbones, "demo": _demo, "review": loop_cli.review_command,
            "monitor": loop_cli.monitor_command}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, never a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    configure(args.verbosity)
    try:
        COMMANDS[args.command](args)
    except OptionError as exc:
        print(f"transferkit: error: {exc.flag_message}", file=sys.stderr)
        return 2
    except TransferkitError as exc:
        print(f"transferkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transferkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
