"""``transferkit predict MODEL PATHS... --ray [ADDRESS] --out preds.parquet``: batch prediction of a collection too
large for one machine, on a Ray cluster, resumable.

The pipeline is one Ray Dataset: the paths given (folders are walked inside Ray tasks, so a million file names
never sit in the driver's memory) in blocks of 8 batches -> an actor pool whose actors each load
the model once (``load_predictor``: the same engine choice and checks as local ``predict``) and answer a batch
with the rows local ``predict`` gives, plus the file's content hash -> Ray's Parquet or CSV writer, a file per
block, into the folder ``--out``. An unreadable file is a row with its reason, never a failed job.

Resume: the rows already in ``--out`` are read first (path and content hash); an actor skips a file whose path
and content are already there. A file the killed run was writing when it died (a Parquet file without its
footer, a CSV without its last line) is removed and its rows predicted again, so the rows in ``--out`` are each
file exactly once. Ray's own fault tolerance does the rest: an actor killed mid-job is restarted and its batch
retried (``max_restarts`` / ``max_task_retries``), a write task retried writes the same file name again.
"""

from __future__ import annotations

import glob
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


def schema(top_k: int):
    """The columns of every output file: those of ``predict --format csv``, plus the content hash."""
    import pyarrow as pa

    tops = [f for i in range(top_k) for f in (pa.field(f"top{i + 1}_label", pa.string()),
                                              pa.field(f"top{i + 1}_probability", pa.float64()))]
    return pa.schema([pa.field("path", pa.string()), pa.field("sha", pa.string()), pa.field("label", pa.string()),
                      pa.field("probability", pa.float64()), pa.field("novelty", pa.float64()),
                      pa.field("unknown", pa.bool_())] + tops + [pa.field("error", pa.string())])


def flat_row(row: dict, sha: str | None, top_k: int) -> dict:
    """A result row of ``engines.predict`` as one flat record of :func:`schema`."""
    flat = {"path": row["path"], "sha": sha, "label": row.get("label"), "probability": row.get("probability"),
            "novelty": row.get("novelty"), "unknown": row.get("unknown"), "error": row.get("error")}
    for i in range(top_k):
        top = row["top_k"][i] if i < len(row.get("top_k") or []) else {}
        flat[f"top{i + 1}_label"], flat[f"top{i + 1}_probability"] = top.get("label"), top.get("probability")
    return flat


def walk(batch: dict, cwd: str, chunk: int):
    """Ray task: the files below each given item (a file, a folder walked lazily, or a glob), in batches of
    ``chunk`` paths written as the user wrote them (relative to the driver's folder ``cwd`` stays relative)."""
    from transferkit.data.folders import walk_files

    paths = []
    for item in batch["item"]:
        item = str(item)
        full = os.path.join(cwd, item)
        if os.path.isdir(full):
            found = (item + p[len(full):] for p in walk_files(full, []))
        elif os.path.exists(full):
            found = iter([item])
        else:
            found = (m[len(cwd) + 1:] if not os.path.isabs(item) else m for m in
                     sorted(glob.iglob(full, recursive=True)) if os.path.isfile(m))
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

    def __init__(self, model: str, engine: dict, top_k: int, reject: bool, cwd: str, done: dict, threads: int):
        os.environ["TRANSFERKIT_THREADS"] = str(threads)  # the CPUs Ray reserved for this actor
        logging.getLogger("transferkit").setLevel(logging.WARNING)
        from transferkit.api import load_predictor

        self.predictor = load_predictor(os.path.join(cwd, model), **engine)
        self.top_k, self.reject, self.cwd = top_k, reject, cwd
        self.done = done.get("rows", {})
        self.schema = schema(top_k)

    def __call__(self, batch: dict):
        import pyarrow as pa

        from transferkit.engines.predict import files_to_probs, rows_from_probs
        from transferkit.files import file_digest

        todo, shas, rows = [], {}, []
        for path in map(str, batch["path"]):
            try:
                sha = file_digest(os.path.join(self.cwd, path))
            except OSError as exc:
                sha, reason = None, f"cannot read: {exc.strerror or exc}"
                if path not in self.done:
                    rows.append(flat_row({"path": path, "top_k": [], "error": reason}, None, self.top_k))
                continue
            if self.done.get(path, "") != sha:
                todo.append(path)
                shas[path] = sha
        full = [os.path.join(self.cwd, p) for p in todo]
        outputs, kept, skipped = files_to_probs(self.predictor, full, 32)
        p = self.predictor
        answered = rows_from_probs([todo[i] for i in kept], outputs, p.class_names, self.top_k,
                                   p.metadata.get("novelty"), self.reject)
        rows += [flat_row(r, shas[r["path"]], self.top_k) for r in answered]
        reasons = {s["path"]: s["reason"] for s in skipped}
        rows += [flat_row({"path": todo[i], "top_k": [], "error": reasons[full[i]]}, shas[todo[i]], self.top_k)
                 for i in range(len(todo)) if full[i] in reasons]
        return pa.Table.from_pylist(rows, schema=self.schema)


def predict_on_ray(model: str, items, out: str, *, address: str | None = LOCAL, top_k: int = 3,
                   reject: bool = True, batch_size: int = 32, engine: EngineOptions = DEFAULT_ENGINE,
                   cpus_per_actor: int = 1) -> dict:
    """Predict every image below ``items`` (files, folders, globs) with the model file ``model`` on the Ray
    cluster at ``address`` (None or "local": a local instance) into the folder ``out`` (``*.parquet`` or
    ``*.csv``); files already predicted there (same path, same content) are skipped. Returns the summary."""
    fmt = output_format(out)
    items = _listed([items] if isinstance(items, (str, os.PathLike)) else items)
    _check_items(items)
    if not os.path.isfile(model):
        raise TransferkitError(f"{model}: model file not found")
    ray = connect(address)
    cwd = os.getcwd()
    done = read_done(out, fmt)
    started = time.perf_counter()
    actors = max(1, cluster_cpus() // cpus_per_actor)
    # blocks of ``chunk`` paths, however many files a folder holds: the units spread over the actors (each
    # yield of the walk is over the block size, so it is a block; a repartition would do it too, but its task
    # waits for a CPU that the actors hold: a deadlock, seen here)
    chunk = batch_size * BLOCK_BATCHES
    ds = ray.data.from_items([{"item": i} for i in items], override_num_blocks=-(-len(items) // chunk))
    ds.context.target_max_block_size = chunk * 16  # bytes: a path is longer than 16
    ds = ds.map_batches(walk, batch_size=chunk, fn_kwargs={"cwd": cwd, "chunk": chunk}, num_cpus=0)  # I/O
    ds = ds.map_batches(Predict, batch_size=batch_size, batch_format="numpy", num_cpus=cpus_per_actor,
                        compute=ray.data.ActorPoolStrategy(size=actors),
                        fn_constructor_kwargs=dict(model=str(model), engine=engine.to_dict(), top_k=int(top_k),
                                                   reject=bool(reject), cwd=cwd, done={"rows": done},
                                                   threads=cpus_per_actor))
    # the actors hold every CPU; writing is I/O and must not wait for one (it did: a deadlock)
    getattr(ds, f"write_{fmt}")(os.path.abspath(out), min_rows_per_file=chunk,
                                ray_remote_args={"num_cpus": 0})
    return summarize(out, fmt, len(done), time.perf_counter() - started)


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


def output_files(out: str, fmt: str) -> list[str]:
    if not os.path.isdir(out):
        return []
    return sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith("." + fmt))


def _read_table(path: str, fmt: str, columns: list[str]):
    """The ``columns`` of one output file, or None if it is incomplete (a write cut short)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(path, columns=columns)
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 1))
            if f.read(1) != b"\n":
                return None  # the last row was cut
        types = {c: pa.string() for c in ("path", "sha", "label", "error")}
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                                         column_types=types))
    except (pa.ArrowInvalid, OSError):
        return None


def read_done(out: str, fmt: str) -> dict[str, str | None]:
    """``{path: content hash}`` of the rows already in ``out``; incomplete files are removed (their rows are
    predicted again); two rows of one path (a file that changed between runs) keep the newer content."""
    done: dict[str, str | None] = {}
    for path in output_files(out, fmt):
        table = _read_table(path, fmt, ["path", "sha"])
        if table is None:
            logger.warning(f"{path}: incomplete (a killed run was writing it); removed, its rows are predicted "
                           f"again")
            os.unlink(path)
            continue
        done.update(zip(table.column("path").to_pylist(), table.column("sha").to_pylist()))
    if done:
        logger.info(f"{out}: {len(done)} file(s) already predicted, skipped")
    return done


def summarize(out: str, fmt: str, before: int, seconds: float) -> dict:
    """What the job did: images predicted now, their rate, unreadable ones, and the rows in ``out``."""
    import pyarrow.compute as pc

    tables = [t for t in (_read_table(p, fmt, ["path", "error"]) for p in output_files(out, fmt)) if t is not None]
    total = sum(t.num_rows for t in tables)
    errors = sum(int(pc.sum(pc.is_valid(t.column("error"))).as_py() or 0) for t in tables)
    new = total - before
    return {"out": str(out), "format": fmt, "rows": total, "new": new, "skipped_done": before,
            "errors": errors, "seconds": round(seconds, 2), "images_per_second": round(new / seconds, 1)
            if seconds > 0 else None}
