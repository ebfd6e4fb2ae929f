"""``transferkit predict MODEL PATHS... --ray [ADDRESS] --out preds.parquet``: batch prediction of a collection too
large for one machine, on a Ray cluster, resumable.

The pipeline is one Ray Dataset: the paths given (folders are walked inside Ray tasks, so a million file names
never sit in the driver's memory) in blocks of 8 batches -> an actor pool whose actors each load
the model once (``load_predictor``: the same engine choice and checks as local ``predict``) and answer a batch
with the rows local ``predict`` gives (the path made absolute), plus the file's content hash -> Ray's Parquet
or CSV writer, a file per block, into the folder ``--out``. An unreadable file is a row with its reason, never
a failed job.

Resume: the rows already in ``--out`` are read first; an actor skips a file whose path and content hash are
there with an answer. A file the killed run was writing when it died (a Parquet file without its footer, a CSV
without its last line) is removed and its rows predicted again, and a path with rows in several files (a file
changed since, or unreadable before and tried again) keeps the newest: each file has one row. ``--out`` also
records the model and options that wrote it (``_transferkit.json``); another model is refused, not mixed in.
Ray's own fault tolerance does the rest: an actor killed mid-job is restarted and its batch retried
(``max_restarts`` / ``max_task_retries``), a write task retried writes the same file name again.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import time

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.log import logger
from transferkit.options import DEFAULT_ENGINE, EngineOptions
from transferkit.scale.cluster import LOCAL, cluster_cpus, connect

FORMATS = {".parquet": "parquet", ".csv": "csv"}
BLOCK_BATCHES = 8  # batches per block (and rows per output file): the unit that a resumed job never redoes


def output_format(out: str) -> str:
    """``parquet`` or ``csv``, from the suffix of the output folder ``out``."""
    fmt = FORMATS.get(os.path.splitext(str(out).rstrip("/"))[1].lower())
    if fmt is None:
        raise TransferkitError(f"--out {out}: name the output folder .parquet or .csv (e.g. preds.parquet)")
    if os.path.isfile(out):
        raise TransferkitError(f"--out {out}: is a file; --ray writes a folder of {fmt} files there")
    return fmt


def schema(top_k: int, guarantees: dict | None = None):
    """The columns of every output file: those of ``predict --format csv``, plus the content hash (with
    ``guarantees`` {coverage or class_coverage, max_error or expected_error}: ``set``, its labels joined by |, and
    ``abstain``, as that CSV has them)."""
    import pyarrow as pa

    asked = set(guarantees or {})
    tops = [f for i in range(top_k) for f in (pa.field(f"top{i + 1}_label", pa.string()),
                                              pa.field(f"top{i + 1}_probability", pa.float64()))]
    return pa.schema([pa.field("path", pa.string()), pa.field("sha", pa.string()), pa.field("label", pa.string()),
                      pa.field("probability", pa.float64()), pa.field("novelty", pa.float64()),
                      pa.field("unknown", pa.bool_())] + tops + [pa.field("error", pa.string())]
                     + [pa.field("set", pa.string())] * bool({"coverage", "class_coverage"} & asked)
                     + [pa.field("abstain", pa.bool_())] * bool({"max_error", "expected_error"} & asked))


def flat_row(row: dict, sha: str | None, top_k: int) -> dict:
    """A result row of ``engines.predict`` as one flat record of :func:`schema`."""
    flat = {"path": row["path"], "sha": sha, "label": row.get("label"), "probability": row.get("probability"),
            "novelty": row.get("novelty"), "unknown": row.get("unknown"), "error": row.get("error")}
    for i in range(top_k):
        top = row["top_k"][i] if i < len(row.get("top_k") or []) else {}
        flat[f"top{i + 1}_label"], flat[f"top{i + 1}_probability"] = top.get("label"), top.get("probability")
    if "set" in row:
        flat["set"] = "|".join(row["set"])
    if "abstain" in row:
        flat["abstain"] = row["abstain"]
    return flat


def walk(batch: dict, cwd: str, chunk: int):
    """Ray task: the files below each given item (a file, a folder walked lazily, or a glob relative to the
    driver's folder ``cwd``), in batches of ``chunk`` absolute paths. An item this node cannot see is passed on
    as a path: its row says why it cannot be read."""
    from transferkit.data.folders import walk_files

    paths = []
    for item in map(str, batch["item"]):
        full = os.path.normpath(os.path.join(cwd, item))
        if os.path.isdir(full):
            found = walk_files(full, [])
        elif os.path.exists(full):
            found = iter([full])
        else:
            matches = (os.path.normpath(os.path.join(cwd, m)) for m in
                       sorted(glob.iglob(item, root_dir=cwd, recursive=True)))
            found = (m for m in matches if os.path.isfile(m))
            first = next(found, None)
            found = iter([full]) if first is None else itertools.chain([first], found)
        for path in found:
            paths.append(path)
            if len(paths) == chunk:
                yield {"path": np.array(paths, dtype=object)}
                paths = []
    if paths:
        yield {"path": np.array(paths, dtype=object)}


class Predict:
    """Ray actor: one model, loaded once, answering batches of paths with flat rows (skipping the files whose
    path and content hash are already in the output)."""

    def __init__(self, model: str, engine: dict, top_k: int, reject: bool, done: dict, threads: int,
                 batch_size: int, guarantees: dict | None = None):
        os.environ["TRANSFERKIT_THREADS"] = str(threads)  # the CPUs Ray reserved for this actor
        logging.getLogger("transferkit").setLevel(logging.WARNING)
        import ray

        from transferkit.api import load_predictor

        self.predictor = load_predictor(model, **engine)
        self.top_k, self.reject, self.batch_size, self.guarantees = top_k, reject, batch_size, guarantees or {}
        self.done = ray.get(done["rows"])  # {path: content hash} of the rows already written
        self.schema = schema(top_k, self.guarantees)

    def __call__(self, batch: dict):
        import pyarrow as pa

        from transferkit.engines.predict import decide, files_to_probs
        from transferkit.files import file_digest

        todo, shas, rows = [], {}, []
        for path in map(str, batch["path"]):
            try:
                sha = file_digest(path)
            except OSError as exc:
                rows.append(flat_row({"path": path, "top_k": [], "error": f"cannot read: {exc.strerror or exc}"},
                                     None, self.top_k))
                continue
            if self.done.get(path) != sha:
                todo.append(path)
                shas[path] = sha
        outputs, kept, skipped = files_to_probs(self.predictor, todo, self.batch_size)
        answered = decide(self.predictor, [todo[i] for i in kept], outputs, self.top_k, self.reject,
                          **self.guarantees)
        rows += [flat_row(r, shas[r["path"]], self.top_k) for r in answered]
        rows += [flat_row({"path": s["path"], "top_k": [], "error": s["reason"]}, shas[s["path"]], self.top_k)
                 for s in skipped]
        return pa.Table.from_pylist(rows, schema=self.schema)


def predict_on_ray(model: str, items, out: str, *, address: str | None = LOCAL, top_k: int = 3,
                   reject: bool = True, batch_size: int = 32, engine: EngineOptions = DEFAULT_ENGINE,
                   cpus_per_actor: int = 1, coverage: float | None = None, max_error: float | None = None,
                   expected_error: float | None = None, class_coverage: float | None = None) -> dict:
    """Predict every image below ``items`` (files, folders, globs, label files) with the model file ``model`` on
    the Ray cluster at ``address`` (None or "local": a local instance) into the folder ``out`` (``*.parquet``
    or ``*.csv``); files already predicted there (same path, same content, no error) are skipped. ``coverage`` /
    ``class_coverage`` / ``max_error`` / ``expected_error``: the rows' conformal ``set`` / ``abstain``
    (``engines.predict.decide``, as local predict). Returns the summary."""
    from transferkit.api import load_predictor

    fmt = output_format(out)
    items = _listed([items] if isinstance(items, (str, os.PathLike)) else items)
    _check_items(items)
    model = os.path.abspath(model)
    predictor = load_predictor(model, **engine.to_dict())  # a bad model file: its one-line error, here
    guarantees = {k: v for k, v in (("coverage", coverage), ("max_error", max_error),
                                    ("expected_error", expected_error), ("class_coverage", class_coverage))
                  if v is not None}
    if guarantees:  # a model without the calibration: its one line, before a job starts
        from transferkit.engines.predict import decide

        decide(predictor, [], np.zeros((0, len(predictor.class_names)), np.float32), top_k, reject, **guarantees)
    _check_manifest(out, model, predictor, top_k, reject, engine, guarantees)
    ray = connect(address)
    before, done = compact(out, fmt)
    before = set(before)
    started = time.perf_counter()
    # blocks of ``chunk`` paths, however many files a folder holds: the units spread over the actors (each
    # yield of the walk is over the block size, so it is a block; a repartition would do it too, but its task
    # waits for a CPU that the actors hold: a deadlock, seen here)
    chunk = batch_size * BLOCK_BATCHES
    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=-(-len(items) // chunk))
    ds.context.target_max_block_size = chunk * 16  # bytes: a path is longer than 16
    ds = ds.map_batches(walk, batch_size=chunk, fn_kwargs={"cwd": os.getcwd(), "chunk": chunk}, num_cpus=0)
    ds = ds.map_batches(Predict, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
                        compute=ray.data.ActorPoolStrategy(size=max(1, cluster_cpus() // cpus_per_actor)),
                        fn_constructor_kwargs=dict(model=model, engine=engine.to_dict(), top_k=int(top_k),
                                                   reject=bool(reject), done={"rows": ray.put(done)},
                                                   threads=cpus_per_actor, batch_size=batch_size,
                                                   guarantees=guarantees))
    try:  # the actors hold every CPU; writing is I/O and must not wait for one (it did: a deadlock)
        getattr(ds, f"write_{fmt}")(os.path.abspath(out), min_rows_per_file=chunk,
                                    ray_remote_args={"num_cpus": 0})
    except ray.exceptions.RayError as exc:
        raise TransferkitError(f"--ray: the job failed: {_cause(exc)}") from None
    return summarize(out, fmt, before, len(done), time.perf_counter() - started)


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong inside a Ray task (not Ray's wrapping traceback)."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def _listed(items) -> list[str]:
    """The items as strings, a label file (labels.csv, a Hugging Face imagefolder) replaced by the files it
    lists: its rows are read into memory anyway."""
    from transferkit.data import labelfile

    found = []
    for item in items:
        if labelfile.is_label_source(item):
            found.extend(labelfile.listed_files(item)[0])
        else:
            found.append(str(item))
    return found


def _check_items(items: list[str]) -> None:
    """Each item exists or matches something (checked up front, as local ``predict`` does, without listing)."""
    if not items:
        raise TransferkitError("no paths to predict")
    for item in items:
        if not os.path.exists(item) and next(glob.iglob(item, recursive=True), None) is None:
            raise TransferkitError(f"{item}: no such file, folder or matching pattern")


MANIFEST = "_transferkit.json"  # beside the output files (readers skip names starting with _)


def _check_manifest(out: str, model: str, predictor, top_k: int, reject: bool, engine: EngineOptions,
                    guarantees: dict | None = None) -> None:
    """What wrote ``out``: a later run must be the same model and options, or its rows would be mixed with the
    earlier ones (and the files those predicted skipped)."""
    import json

    from transferkit.files import file_digest, write_json_atomic

    wanted = {"model_sha": file_digest(model), "classes": list(predictor.class_names), "top_k": int(top_k),
              "reject": bool(reject), "runtime": engine.runtime, "precision": engine.precision}
    wanted |= guarantees or {}  # absent when not asked: folders written before still match
    path = os.path.join(out, MANIFEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        differs = [k for k in [*wanted, "coverage", "max_error", "expected_error", "class_coverage"]
                   if found.get(k) != wanted.get(k)]
        if differs:
            k = differs[0]
            what = "another model file" if k in ("model_sha", "classes") else f"{k} {found.get(k)!r}"
            raise TransferkitError(f"--out {out}: its rows were written with {what} (this run: "
                                   f"{wanted.get(k)!r}); use another --out, or delete this one to start over")
        return
    os.makedirs(out, exist_ok=True)
    write_json_atomic(path, wanted | {"model": model})


def output_files(out: str, fmt: str) -> list[str]:
    """The output files in ``out``, oldest first."""
    if not os.path.isdir(out):
        return []
    found = [os.path.join(out, f) for f in os.listdir(out) if f.endswith("." + fmt) and not f.startswith(".")]
    return sorted(found, key=lambda f: (os.stat(f).st_mtime_ns, f))


def _read_table(path: str, fmt: str):
    """One output file, or None if it is incomplete (a write cut short)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(path)
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 1))
            if f.read(1) != b"\n":
                return None  # the last row was cut
        types = {c: pa.string() for c in ("path", "sha", "label", "error", "set")}  # "7": a label, not 7
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types,
                                                                         strings_can_be_null=True))
    except pa.ArrowInvalid:
        return None
    except OSError as exc:
        raise TransferkitError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _write_table(table, path: str, fmt: str) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from transferkit.files import atomic_path

    with atomic_path(path) as tmp:
        (pq.write_table if fmt == "parquet" else pacsv.write_csv)(table, str(tmp))


def compact(out: str, fmt: str) -> tuple[dict, dict[str, str]]:
    """Make ``out`` hold one row per file: incomplete files (a killed run was writing them) are removed, and a
    path with rows in several files keeps the newest file's (a file changed since, or one that could not be
    read before and is tried again). Returns (``{output file: its table}`` as left, ``{path: content hash}``
    of the rows that answered: the files a run skips)."""
    import pyarrow.compute as pc

    tables = {}
    for path in output_files(out, fmt):
        table = _read_table(path, fmt)
        if table is None:
            logger.warning(f"{path}: incomplete (a killed run was writing it); removed, its rows are predicted "
                           f"again")
            os.unlink(path)
        else:
            tables[path] = table
    newest = {}
    for path, table in tables.items():  # oldest file first: a later file's row of a path wins
        newest.update(dict.fromkeys(table.column("path").to_pylist(), path))
    kept, done = {}, {}
    for path, table in tables.items():
        keep = [newest[p] == path for p in table.column("path").to_pylist()]
        if not all(keep):
            table = table.filter(keep)
            _write_table(table, path, fmt) if table.num_rows else os.unlink(path)
        if table.num_rows:
            kept[path] = table
        answered = table.filter(pc.is_null(table.column("error")))
        done.update(zip(answered.column("path").to_pylist(), answered.column("sha").to_pylist()))
    return kept, done


def summarize(out: str, fmt: str, before: set[str], skipped: int, seconds: float) -> dict:
    """What the job did: images predicted now (the rows of the files it wrote), their rate, unreadable ones
    among them, and the rows in ``out`` (one per file, after :func:`compact`)."""
    import pyarrow.compute as pc

    tables, _ = compact(out, fmt)  # the files as left, read once
    fresh = [t for f, t in tables.items() if f not in before]
    new = sum(t.num_rows for t in fresh)
    errors = sum(int(pc.sum(pc.is_valid(t.column("error"))).as_py() or 0) for t in fresh)
    if skipped:
        logger.info(f"{out}: {skipped} file(s) already predicted, skipped")
    return {"out": str(out), "format": fmt, "rows": sum(t.num_rows for t in tables.values()), "new": new,
            "skipped_done": skipped, "errors": errors, "seconds": round(seconds, 2),
            "images_per_second": round(new / seconds, 1) if seconds > 0 else None}
