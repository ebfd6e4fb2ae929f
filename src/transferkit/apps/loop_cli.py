"""The feedback loop's commands (``transferkit review``, ``transferkit monitor``), added to the CLI's parser by
``cli._parser``: what the served model saw, back into labels and into a drift report."""

from __future__ import annotations

import json
import os


def add_commands(command) -> None:
    from transferkit.apps.cli import _ray_flag

    r = command("review", "rank collected photos (serve --collect DB) or an unlabelled FOLDER (--model) for "
                          "labelling: uncertainty, novelty, diversity; queue.csv, review.html, a label file")
    r.epilog = ("Three steps: (1) transferkit review DB writes DIR/queue.csv and DIR/review.html; (2) in "
                "queue.csv, per row: write the right label in 'label' (several joined by '|' for a multi-label "
                "model; 'unknown' for a photo of none of the classes: never a class, train --add uses it as a 'none "
                "of these' example for the unknown score), "
                "or write yes in 'accept' and leave 'label' empty to take the model's answer (a row with a label "
                "counts with or without accept; a row with neither is left out); (3) transferkit review DB "
                "--accept DIR/queue.csv --out LABELS.csv, then transferkit train DATA --add LABELS.csv.")
    r.add_argument("source", help="the store (a SQLite file or a postgresql:// URL), or a folder of photos")
    r.add_argument("--model", help="the model file: its backbone's features for the diversity (needed for a folder)")
    r.add_argument("-n", "--size", type=int, default=50, help="photos in the queue (default: 50)")
    r.add_argument("--dir", default=os.path.join("runs", "review"), help="folder for queue.csv and review.html")
    r.add_argument("--out", metavar="LABELS.csv", help="write a label file for train --add (photos copied beside "
                   "it): the photos corrected on the served page, and the rows of --accept that have a label or "
                   "accept=yes (not the queue: that is DIR/queue.csv)")
    r.add_argument("--accept", metavar="QUEUE.csv", help="the queue.csv you filled (read with --out): a row's "
                   "'label' is taken as given; accept=yes with an empty label takes the model's answer")
    r.add_argument("--collect-files", help="the store's uploads folder (default: DB.files, ./collected-files)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    _ray_flag(r, "a folder's answers and features computed on a Ray cluster (transferkit[ray]; answers kept in "
                 "DIR/ray-<model>.parquet, a rerun predicts only new files)")

    m = command("monitor", "drift: compare the collected window (serve --collect DB) with the model's validation "
                           "reference; one line, and drift.html with the figures")
    m.add_argument("store")
    m.add_argument("--model", help="the reference of this model file (default: the model that served the window)")
    m.add_argument("--last", type=int, help="only the last N predictions")
    m.add_argument("--since", type=float, metavar="HOURS", help="only the predictions of the last HOURS")
    m.add_argument("--out", default=os.path.join("runs", "monitor"), help="folder for drift.html, drift.json")
    m.add_argument("--json", action="store_true", help="print one JSON object")


def review_command(args) -> None:
    from transferkit.errors import TransferkitError
    from transferkit.reports.review import review

    if args.ray not in (None, "local") and os.path.exists(args.ray):  # `review --ray photos/`: taken as address
        raise TransferkitError(f"--ray {args.ray}: that is a path, not a cluster address (write --ray=ADDRESS, "
                               f"or put --ray after the folder)")
    done = review(args.source, model=args.model, n=args.size, out_dir=args.dir, labels=args.out,
                  accept=args.accept, files=args.collect_files, ray=args.ray)
    if args.json:
        print(json.dumps(done, ensure_ascii=False))
        return
    print(f"review queue: {len(done['queue'])} of {done['candidates']} photo(s)")
    for row in done["queue"][:20]:
        print(f"  {row['rank']:>3}  score {row['score']}  {row['answer'] or '-':<20} novelty {row['novelty']}  "
              f"{row['correction'] or ''}\t{row['path']}")
    print("wrote " + ", ".join(done["written"].values()))


def monitor_command(args) -> None:
    from transferkit.reports.drift import monitor

    found = monitor(args.store, model=args.model, out=args.out, last=args.last, since_hours=args.since)
    if args.json:
        print(json.dumps(found, ensure_ascii=False))
        return
    print(found["line"])
    print(f"wrote {found['html']}, {found['json']}")
