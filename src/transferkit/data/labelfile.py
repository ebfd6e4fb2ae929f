"""Datasets described by a file: a CSV/TSV with a path column and a label column (``labels.csv``), or the Hugging
Face ``imagefolder`` layout (a folder with ``metadata.csv``, or split folders ``train/``, ``validation/``,
``test/`` each with one). They give the same ``ImageFolder`` / ``TrainingData`` as a folder scan, so everything
after the scan (features, heads, reports) is unchanged.

Why a file: labels exported from a labelling tool or a spreadsheet arrive as a table, and copying photos into one
folder per class just to train duplicates them and loses the split the team agreed on. A ``split`` column
(train / valid / test) is honoured instead of the random split; without one, the usual seeded stratified split.

Paths are relative to the label file's folder and must stay inside it: an absolute path, one whose ``..`` leaves
the folder, or one that a symbolic link leads out of, is a bad row (a label file copied from another machine then
fails loudly on every row instead of reading files that happen to exist elsewhere). ``root`` (``--root DIR``)
names another folder: ``data/labels.csv`` listing ``cat/1.jpg`` with ``--root images`` reads ``images/cat/1.jpg``;
the paths are relative to DIR (an absolute one is taken when it is inside DIR) and are refused likewise when,
links resolved, they leave DIR. Bad rows (no such file, empty label, unknown split, a path listed
twice) are refused together, each with its line number; an unreadable image is skipped and reported, as in a
folder scan.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import unicodedata
from dataclasses import dataclass, field, replace

import numpy as np

from transferkit.data.folders import (ImageFolder, TrainingData, iterative_split, label_count, label_text, nfc,
                                     stratified_split)
from transferkit.data.images import UnreadableImage, sniff_format
from transferkit.errors import TransferkitError
from transferkit.files import file_digest
from transferkit.log import logger

TABLE_EXTENSIONS = (".csv", ".tsv")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")  # Hugging Face imagefolder
# split names: the split column's values and Hugging Face's split folder names (its split pattern keywords)
SPLITS = {"train": "train", "training": "train", "valid": "valid", "validation": "valid", "val": "valid",
          "dev": "valid", "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}
PATH_COLUMNS = ("path", "file_name")  # the default path column: the first of these the header has
MAX_LISTED = 10  # bad rows named in an error message (all are counted)
_IGNORED: set[str] = set()  # metadata files without file_name, warned about once


@dataclass(frozen=True)
class LabelFile(os.PathLike):
    """A label file (or Hugging Face imagefolder) and its column names; ``only`` keeps the rows of one split
    (``"test"``). Anywhere a folder is taken, ``LabelFile("labels.csv", label_col="species")`` is too, and a
    plain ``"labels.csv"`` means the default columns."""

    path: str
    path_col: str | None = None  # default: 'path', else 'file_name'
    label_col: str = "label"
    split_col: str = "split"
    only: str | None = None
    multi_label: bool = False  # a label cell lists any number of labels, separated by label_sep ("" = none)
    label_sep: str = "|"
    root: str | None = None  # the folder the paths are relative to (default: the label file's own), never left

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)


@dataclass
class Row:
    line: int
    given: str  # the path as written
    path: str  # resolved below the root
    label: str
    split: str | None

    def labels(self, sep: str) -> list[str]:
        """A multi-label cell's labels, in order, each once (an empty cell: none)."""
        return list(dict.fromkeys(nfc(p.strip()) for p in self.label.split(sep) if p.strip()))


@dataclass
class LabelledImages(ImageFolder):
    """An ``ImageFolder`` read from a label file: also each image's split (None without a split column), the rows
    refused with their reason, and the fingerprint of (file, content, label, split)."""

    splits: list = field(default_factory=list)
    bad_rows: list[dict] = field(default_factory=list)
    fingerprint: str = ""
    digests: dict = field(default_factory=dict)
    has_splits: bool = False


def is_label_source(item) -> bool:
    """A ``LabelFile``, a ``.csv``/``.tsv`` file, or a folder in the Hugging Face imagefolder layout."""
    if isinstance(item, LabelFile):
        return True
    if not isinstance(item, (str, os.PathLike)):
        return False
    item = os.fspath(item)
    if os.path.isfile(item):
        return item.lower().endswith(TABLE_EXTENSIONS)
    return os.path.isdir(item) and bool(_metadata_files(item))


def as_label_file(item) -> LabelFile:
    return item if isinstance(item, LabelFile) else LabelFile(os.fspath(item))


def _metadata_files(folder: str) -> list[tuple[str, str | None]]:
    """(metadata.csv or .jsonl, the split its folder names) of a Hugging Face imagefolder: at the top and in
    split folders. A metadata file without a ``file_name`` (Hugging Face requires one) is not: a photo folder
    that happens to hold some other metadata.csv stays a class folder, with a warning."""
    try:
        places = [(folder, None)] + [(os.path.join(folder, name), SPLITS[name.lower()])
                                     for name in sorted(os.listdir(folder)) if name.lower() in SPLITS]
    except OSError:
        return []  # the folder scan names the problem
    found = [(os.path.join(place, meta), split) for place, split in places for meta in METADATA_NAMES
             if os.path.isfile(os.path.join(place, meta))]
    named = [(meta, split) for meta, split in found if _names_file_name(meta)]
    for meta, split in found:
        if (meta, split) not in named and meta not in _IGNORED:
            _IGNORED.add(meta)
            logger.warning(f"{meta}: no 'file_name' column: not Hugging Face metadata, ignored")
    return named


def _names_file_name(meta: str) -> bool:
    """Whether a metadata file's first record names a ``file_name`` (read only as far as its first line)."""
    try:
        with open(meta, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline(1 << 16)
    except OSError:
        return False
    if meta.lower().endswith(".jsonl"):
        return '"file_name"' in first
    return "file_name" in [h.strip() for h in next(csv.reader([first], delimiter=_delimiter(meta, first)), [])]


# ----- reading the table -----
def _delimiter(path: str, header: str) -> str:
    """Tab for .tsv, comma for .csv; sniffed (, ; tab |) where the header line has no such character."""
    expected = "\t" if path.lower().endswith(".tsv") else ","
    if expected in header:
        return expected
    try:
        return csv.Sniffer().sniff(header, delimiters=",;\t|").delimiter
    except csv.Error:
        return expected  # a single column: the header check names what is missing


def _read_table(path: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, {column: value})]) of a CSV/TSV with a header row (UTF-8, a BOM allowed)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise TransferkitError(f"{path}: not UTF-8 text (byte {exc.start}); save the label file as UTF-8") from None
    except OSError as exc:
        raise TransferkitError(f"{path}: cannot read ({exc.strerror})") from None
    if path.lower().endswith(".jsonl"):
        return _json_lines(path, text)
    first = text.split("\n", 1)[0]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(path, first))
    try:
        header = [nfc(h.strip()) for h in next(reader)]
        rows = []
        for values in reader:
            if any(v.strip() for v in values):
                rows.append((reader.line_num, dict(zip(header, (v.strip() for v in values)))))
    except StopIteration:
        raise TransferkitError(f"{path}: empty file (a header row naming the columns is required)") from None
    except csv.Error as exc:
        raise TransferkitError(f"{path}: line {reader.line_num}: {exc}") from None
    return header, rows


def _json_lines(path: str, text: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Hugging Face's metadata.jsonl: one JSON object per line; the columns are their keys."""
    header, rows = [], []
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as exc:
            raise TransferkitError(f"{path}: line {line}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise TransferkitError(f"{path}: line {line}: not a JSON object")
        record = {nfc(str(k)): "" if v is None else str(v).strip() for k, v in record.items()}
        header += [k for k in record if k not in header]
        rows.append((line, record))
    return header, rows


def _column(path: str, header: list[str], wanted: str | None, role: str, flag: str, defaults=()) -> str:
    names = [wanted] if wanted else list(defaults)
    for name in names:
        if name in header:
            return name
    raise TransferkitError(f"{path}: line 1: no {role} column {' or '.join(map(repr, names))} (columns: "
                           f"{', '.join(map(repr, header))}); choose it with {flag}")


def _resolve(root: str, base: str, given: str, named: bool = False) -> tuple[str | None, str | None]:
    """(path, None) for a path inside ``root``, links resolved, else (None, the reason); ``named``: ``root`` is
    the ``--root`` folder (an absolute path inside it is taken)."""
    where = f"--root {root}" if named else "the label file's folder"
    if not given:
        return None, "empty path"
    absolute = os.path.isabs(given) or (len(given) > 2 and given[0].isalpha() and given[1] == ":"
                                        and given[2] in "/\\")
    if absolute and not named:
        return None, "absolute path (paths are relative to the label file's folder; --root DIR takes another)"
    if absolute and not os.path.isabs(given):  # C:/... read on a POSIX system
        return None, f"absolute path outside {where}"
    if os.sep == "/" and "\\" in given and not os.path.exists(os.path.join(base, given)):
        given = given.replace("\\", "/")  # written on Windows: images\cat\1.jpg
    path = os.path.normpath(os.path.join(base, given))
    if not _inside(path, root):
        return None, f"absolute path outside {where}" if absolute else f"'..' leads out of {where}"
    if not os.path.isfile(path):  # typed on one system, written by another: the accents' other Unicode form
        path = next((p for p in (nfc(path), unicodedata.normalize("NFD", path)) if os.path.isfile(p)), None)
    if path is None:
        return None, "no such file"
    if not _inside(os.path.realpath(path), os.path.realpath(root)):
        return None, f"a symbolic link leads out of {where}"
    return path, None


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (both absolute, or both as typed)."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return rel != ".." and not rel.startswith(".." + os.sep)


def _split_of(value: str | None, has_column: bool) -> tuple[str | None, str | None]:
    if not has_column:
        return None, None
    split = SPLITS.get((value or "").lower())
    if split is None:
        return None, f"unknown split {value!r} (train, valid or test)"
    return split, None


def _rows_of_table(path: str, root: str, base: str, source: LabelFile, folder_split: str | None,
                   need_labels: bool) -> tuple[list[Row], list[dict]]:
    """The good rows of one table and the bad ones ({line, file, path, reason})."""
    header, records = _read_table(path)
    path_col = _column(path, header, source.path_col, "path", "--path-col", PATH_COLUMNS)
    hf = os.path.basename(path) in METADATA_NAMES and not os.path.isfile(str(source.path))
    label_col = source.label_col if source.label_col in header else None
    if label_col is None and need_labels and not hf:  # a Hugging Face folder: labels from its class folders
        _column(path, header, source.label_col, "label", "--label-col")
    has_split = source.split_col in header
    good, bad = [], []
    for line, rec in records:
        given = rec.get(path_col, "")
        resolved, reason = _resolve(root, base, given, named=source.root is not None)
        label = nfc(rec.get(label_col, "") if label_col else _parent_label(resolved, base) if hf else "")
        split, split_reason = _split_of(rec.get(source.split_col), has_split)
        split = split or folder_split or (_path_split(given) if hf else None)
        reason = reason or (None if label or not need_labels or source.multi_label else "empty label") or split_reason
        if reason:
            bad.append({"line": line, "file": path, "path": given, "reason": reason})
        else:
            good.append(Row(line, given, resolved, label, split))
    return good, bad


def _parent_label(path: str | None, base: str) -> str:
    """Hugging Face's label for a metadata file without a label column: the class folder the image is in."""
    if path is None:
        return ""
    parent = os.path.relpath(os.path.dirname(path), base)
    name = os.path.basename(parent) if parent != "." else ""
    return "" if name.lower() in SPLITS else name


def _path_split(given: str) -> str | None:
    first = given.replace("\\", "/").split("/")[0].lower()
    return SPLITS.get(first)


def read_rows(source: LabelFile, need_labels: bool = True) -> tuple[str, list[Row], list[dict]]:
    """(root, good rows, bad rows) of a label file or a Hugging Face imagefolder; a path listed twice is bad."""
    target = str(source.path)
    root, tables = _tables(source)
    good, bad = [], []
    for table, folder_split in tables:
        base = root if source.root is not None else os.path.dirname(table) or "."
        rows, wrong = _rows_of_table(table, root, base, source, folder_split, need_labels)
        good += rows
        bad += wrong
    first: dict[str, Row] = {}
    kept = []
    for row in good:
        earlier = first.setdefault(row.path, row)
        if earlier is row:
            kept.append(row)
        else:
            bad.append({"line": row.line, "file": target, "path": row.given,
                        "reason": f"listed again (first on line {earlier.line})"})
    if all(r.split for r in kept) or not any(r.split for r in kept):
        return root, kept, bad
    logger.warning(f"{target}: only some images have a split (train/valid/test): the split is ignored")
    return root, [replace(r, split=None) for r in kept], bad


def _tables(source: LabelFile) -> tuple[str, list[tuple[str, str | None]]]:
    """(the folder the paths stay in, [(table, the split its folder names)]) of a label source."""
    target = str(source.path)
    if os.path.isfile(target):
        if source.root is not None:
            if not os.path.isdir(source.root):
                raise TransferkitError(f"{target}: --root {source.root}: no such folder")
            return str(source.root), [(target, None)]
        return os.path.dirname(target) or ".", [(target, None)]  # paths as a folder scan gives them
    if os.path.isdir(target) and _metadata_files(target):
        if source.root is not None:
            raise TransferkitError(f"{target}: --root is for a CSV/TSV label file; a Hugging Face imagefolder's "
                                   f"paths are relative to its metadata files")
        return target, _metadata_files(target)
    raise TransferkitError(f"{target}: not a label file (.csv, .tsv) nor a folder with metadata.csv")


def bad_rows_message(source, bad: list[dict]) -> str:
    """One line naming the bad rows by line number (the first MAX_LISTED of them)."""
    def where(b: dict) -> str:  # a Hugging Face folder's rows come from several metadata files
        table = "" if b["file"] == str(source.path) else os.path.relpath(b["file"], str(source.path)) + " "
        return f"{table}line {b['line']}" + (f" ({b['path']!r})" if b["path"] else "")

    listed = "; ".join(f"{where(b)}: {b['reason']}" for b in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return f"{source}: {len(bad)} bad row(s): {listed}{more}"


def scan_label_file(source, class_names: list[str] | None = None, min_classes: int = 2,
                    strict: bool = True) -> LabelledImages:
    """The usable images a label source lists (``only``: one split's rows), as a folder scan gives them; class
    names are the sorted labels, or ``class_names`` (a label it does not know is an error naming the line).
    ``strict``: bad rows are an error (else returned in ``bad_rows``, for the health report)."""
    source = as_label_file(source)
    root, rows, bad = read_rows(source)
    if bad and (strict or not rows):  # every row bad: that is the answer, not "no rows"
        raise TransferkitError(bad_rows_message(source, bad))
    has_splits = bool(rows) and all(r.split for r in rows)
    if source.only:
        rows = [r for r in rows if r.split == source.only]
    names = _class_names(source, rows, class_names, 1 if source.multi_label else min_classes)
    index = {name: i for i, name in enumerate(names)}
    paths, labels, splits, skipped = [], [], [], []
    for row in rows:
        try:
            sniff_format(row.path)
        except UnreadableImage as exc:
            skipped.append({"path": row.path, "reason": exc.reason, "line": row.line})
            continue
        paths.append(row.path)
        labels.append(_label_of(row, index, source))
        splits.append(row.split)
    if not paths:
        raise TransferkitError(f"{source}: no readable images listed ({len(skipped)} files skipped)")
    digests = {p: file_digest(p) for p in paths}
    y = np.asarray(labels, dtype=np.int64).reshape(len(paths), len(names)) if source.multi_label else \
        np.asarray(labels, dtype=np.int64)
    found = LabelledImages(root, names, paths, y, skipped, splits, bad, has_splits=has_splits)
    found.digests, found.fingerprint = digests, labelled_fingerprint(found, digests)
    return found


def _label_of(row: Row, index: dict, source: LabelFile):
    """A row's class index, or (multi-label) its indicator row over the labels."""
    if not source.multi_label:
        return index[row.label]
    cells = np.zeros(len(index), np.int64)
    cells[[index[name] for name in row.labels(source.label_sep)]] = 1
    return cells


def _row_labels(row: Row, source: LabelFile) -> list[str]:
    return row.labels(source.label_sep) if source.multi_label else [row.label]


def _class_names(source, rows: list[Row], class_names, min_classes: int) -> list[str]:
    if class_names is not None:
        for row in rows:
            unknown = [name for name in _row_labels(row, source) if name not in class_names]
            if unknown:
                raise TransferkitError(f"{source}: line {row.line}: label {unknown[0]!r} is not one of the model's "
                                       f"classes {list(class_names)}")
        return list(class_names)
    names = sorted({name for r in rows for name in _row_labels(r, source)})
    if not names:
        raise TransferkitError(f"{source}: no labels in any row" if rows else f"{source}: no rows in split "
                               f"{source.only!r}" if source.only else f"{source}: no rows below its header")
    if len(names) < min_classes:
        raise TransferkitError(f"{source}: only one label ('{names[0]}'); a classifier needs at least 2")
    return names


def labelled_fingerprint(data: LabelledImages, digests: dict[str, str]) -> str:
    """BLAKE2b over the sorted (path below the root, content hash, label, split): a changed label or split in the
    file changes it (a folder's fingerprint has the label in the path)."""
    h = hashlib.blake2b(digest_size=16)
    items = sorted((nfc(os.path.relpath(p, data.root)), digests[p], label_text(data.class_names, y), s or "")
                   for p, y, s in zip(data.paths, data.labels, data.splits))
    for rel, digest, label, split in items:
        h.update(f"{rel}\0{digest}\0{label}\0{split}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def split_label_file(source, val_split: float, seed: int) -> TrainingData:
    """The training split of a label source: its train / valid rows where it has a split column (validation
    drawn from the train rows, seeded and stratified, when none is marked valid), else the usual seeded
    stratified split. Test rows are left for ``test_source``: evaluated at the end like ``--test-dir``."""
    source = as_label_file(source)
    data = scan_label_file(source)
    splits = np.asarray([s or "" for s in data.splits])
    pool = np.flatnonzero(splits != "test")
    if data.has_splits and (splits == "valid").any():
        train_idx, val_idx = np.flatnonzero(splits == "train"), np.flatnonzero(splits == "valid")
    else:
        if data.has_splits:
            logger.info(f"{source}: no 'valid' rows: validation drawn from the train rows ({val_split:.0%})")
        split = iterative_split if source.multi_label else stratified_split
        inner_train, inner_val = split(data.labels[pool], val_split, seed)
        train_idx, val_idx = pool[inner_train], pool[inner_val]
    for k, name in enumerate(data.class_names):
        if label_count(data.labels[train_idx], k) == 0:
            raise TransferkitError(f"{source}: label '{name}' has no readable training image")
    test = replace(source, only="test") if data.has_splits and (splits == "test").any() else None
    return TrainingData(data.root, data.class_names, [data.paths[i] for i in train_idx],
                        [data.paths[i] for i in val_idx], data.labels[train_idx], data.labels[val_idx],
                        data.skipped, data.fingerprint, data.digests, test_source=test)


def for_task(source, options) -> LabelFile:
    """``source`` read as a model trained with ``options`` reads labels (multi-label: its separator)."""
    source = as_label_file(source)
    if getattr(options, "multi_label", False):
        return replace(source, multi_label=True, label_sep=options.label_sep)
    return source


def for_evaluation(source) -> LabelFile:
    """What ``evaluate`` reads of a label source: with a split column, its test rows; else every row."""
    source = as_label_file(source)
    if source.only:
        return source
    _, rows, _ = read_rows(source)
    if rows and all(r.split for r in rows):
        if not any(r.split == "test" for r in rows):
            raise TransferkitError(f"{source}: no 'test' rows to evaluate (its split column marks only "
                                   f"{', '.join(sorted({r.split for r in rows}))})")
        logger.info(f"{source}: evaluating its test rows")
        return replace(source, only="test")
    return source


def listed_files(source) -> tuple[list[str], dict[str, str]]:
    """For ``predict``: every listed file (an unreadable one gets its error row later) and its given label, if
    the file has labels; bad paths are an error, empty labels are allowed."""
    source = as_label_file(source)
    _, rows, bad = read_rows(source, need_labels=False)
    if bad:
        raise TransferkitError(bad_rows_message(source, bad))
    return [r.path for r in rows], {r.path: r.label for r in rows if r.label}


def health_splits(source) -> tuple[list[tuple[str, ImageFolder]], list[dict]]:
    """For ``inspect``: [(split name, images)] (train, valid, test where the file says; else one 'train') and the
    bad rows, listed in the report instead of refused."""
    data = scan_label_file(source, min_classes=1, strict=False)
    if not data.has_splits:
        return [("train", data)], data.bad_rows
    splits = np.asarray(data.splits)
    found = []
    for name in ("train", "valid", "test"):
        index = np.flatnonzero(splits == name)
        if len(index) or name == "train":  # the report's first split is 'train'
            found.append((name, data.subset(index)))
    found[0][1].skipped = data.skipped
    return found, data.bad_rows
