"""The review queue (``transferkit review DB | FOLDER --model M``): which collected photos to label first.

Each photo (once per content hash, however often it was sent) gets an uncertainty score: the mean of its
percentile ranks in margin (top-1 minus top-2 probability, small = unsure), entropy of the answer, and novelty
(far from every class). The queue is then picked by a k-center greedy on the backbone's features (the training
feature cache: a photo seen in training costs nothing) whose distance is truncated at the scale of near-copies:
the next photo is the one of the highest score times its (capped) distance to those already picked, so 50
near-copies of one photo give it one place in the queue, not 50, while distinct photos compete by uncertainty.
(An untruncated k-center, score-weighted, was tried first: it spread the queue over the feature space and its
top 50 held 15 photos of the held-out class, no more than a random 50.)

A multi-label answer is a yes / no per label, so its margin is the distance of the score nearest its own
threshold (min over labels of |p - t|: the label the answer would flip first) and its entropy the mean binary
entropy of the labels' scores; the labels and scores are the stored answer (``answer``), the thresholds the
model's (the store's model record, or ``--model``). ``--ray [ADDRESS]`` on a folder (the archive case) computes
the answers with ``predict --ray`` (into DIR/ray-<model>.parquet, resumable) and the features with ``train
--ray``'s cache filling, then ranks as here: the same rows as the local path (tests/test_scale.py).

Outputs: ``queue.csv`` (rank, path, the model's answer, the scores, the correction already given, and the columns
``accept`` and ``label`` to fill in), ``review.html`` (the queue with thumbnails and corrections, headed by how to
fill queue.csv), and with ``--accept queue.csv --out labels.csv`` a label file (the files copied beside it, so its
paths are relative) for ``transferkit train DATA --add labels.csv``: the photos corrected on the served page and
the filled queue rows. A row's ``label`` is taken as given, with or without ``accept``; ``accept=yes`` with an
empty ``label`` takes the model's answer (its top label, a multi-label row's label set); ``unknown`` means none of
the classes, never a class: ``train --add`` uses such photos as the unknown score's "none of these" examples
(data/added.py says why). Nothing to write is an error naming the rows read and why each group was left out,
raised before any feature is computed.
"""

from __future__ import annotations

import csv
import html
import os
import shutil

import numpy as np

from transferkit.data import added
from transferkit.errors import TransferkitError
from transferkit.files import atomic_path, write_text_atomic
from transferkit.log import logger

QUEUE_COLUMNS = ("rank", "path", "image", "answer", "probability", "novelty", "margin", "entropy", "score",
                 "seen", "correction", "accept", "label")


def store_candidates(target: str, files: str | None = None) -> list[dict]:
    """One candidate per distinct photo of a store (its latest prediction; ``seen``: how many times it was
    sent), with the latest correction given on any of its predictions."""
    from transferkit.data.collected import Store

    store = Store(target, files, create=False)
    try:
        rows, fixes = store.read()
        infos = store.model_infos()
    finally:
        store.close()
    by_image: dict[str, dict] = {}
    for row in rows:  # oldest first: a later prediction of the same photo replaces the earlier one
        seen = by_image.get(row["image"], {}).get("seen", 0) + 1
        fix = fixes.get(row["uid"]) or by_image.get(row["image"], {}).get("correction")
        path = store.image_path(row["image"], row["ext"] or "img")
        info = infos.get(row["model"]) or {}
        by_image[row["image"]] = {"path": path, "image": row["image"], "label": row["label"],
                                  "probability": row["probability"], "novelty": row["novelty"],
                                  "unknown": row["unknown"], "top_k": row["top_k"], "seen": seen,
                                  "correction": fix, "answer": row.get("answer"),
                                  "multi_label": row.get("answer") is not None or info.get("task") == "multi_label",
                                  "thresholds": ((info.get("task_params") or {}).get("thresholds"))}
    found = [c for c in by_image.values() if os.path.isfile(c["path"])]
    if len(found) < len(by_image):
        logger.warning(f"{target}: {len(by_image) - len(found)} stored photo(s) missing from {store.files}")
    return found


def folder_candidates(folder: str, predictor) -> list[dict]:
    """Candidates of an unlabelled folder: each readable photo with the model's answer."""
    from transferkit.engines.predict import predict_rows
    from transferkit.options import PredictOptions

    rows = predict_rows(predictor, [folder], PredictOptions(top_k=len(predictor.class_names)))
    return [candidate(r, "labels" in r) for r in rows if not r.get("error")]


def candidate(row: dict, multi_label: bool) -> dict:
    """A review candidate of a predict row (a multi-label row's labels and scores kept as its ``answer``)."""
    answer = {"labels": row["labels"], "scores": row["scores"]} if multi_label else None
    return {"path": row["path"], "image": "", "label": row["label"], "probability": row["probability"],
            "novelty": row.get("novelty"), "unknown": row.get("unknown"), "top_k": row["top_k"], "seen": 1,
            "correction": None, "answer": answer, "multi_label": multi_label, "thresholds": None}


def ray_folder_candidates(folder: str, model: str, predictor, address: str, out_dir: str) -> list[dict]:
    """The candidates of ``folder`` answered on a Ray cluster (``scale.predict``, every label in the top-k),
    as :func:`folder_candidates` gives them: the rows read back from DIR/ray-<model hash>.parquet (a rerun
    predicts only the files added or changed since)."""
    import pyarrow.parquet as pq

    from transferkit.files import file_digest
    from transferkit.scale.cluster import preflight
    from transferkit.scale.predict import output_files, predict_on_ray

    preflight(address)  # Ray installed and the cluster reachable: one line, before any photo is read
    names = list(predictor.class_names)
    out = os.path.join(out_dir, f"ray-{file_digest(model)[:16]}.parquet")
    predict_on_ray(model, [folder], out, address=address, top_k=len(names))
    wanted = {os.path.abspath(p): p for p in _folder_files(folder)}  # the folder's files: none from elsewhere
    found = {}
    for part in output_files(out, "parquet"):  # oldest first; one row per path after compact
        for r in pq.read_table(part).to_pylist():
            if r["path"] in wanted and not r["error"]:
                found[r["path"]] = r
    from transferkit.tasks import task_of
    from transferkit.tasks.multi_label import DEFAULT_THRESHOLD

    multi, given = task_of(predictor.metadata).multi_label, model_thresholds(predictor.metadata)
    thresholds = {name: given.get(name, DEFAULT_THRESHOLD) for name in names}
    order = {p: i for i, p in enumerate(wanted)}  # the local path's order: expand_paths of the folder
    rows = []
    for path in sorted(found, key=order.__getitem__):
        r = found[path]
        top = [{"label": r[f"top{i}_label"], "probability": r[f"top{i}_probability"]}
               for i in range(1, len(names) + 1) if r.get(f"top{i}_label") is not None]
        row = {"path": wanted[path], "label": r["label"], "probability": r["probability"],
               "novelty": r["novelty"], "unknown": r["unknown"], "top_k": top}
        if multi:  # the answer decide gave: the labels over their thresholds, none for a rejected unknown photo
            row["scores"] = {t["label"]: t["probability"] for t in top}
            row["labels"] = [] if r["label"] is None else [t["label"] for t in top
                                                           if t["probability"] >= thresholds[t["label"]]]
        rows.append(candidate(row, multi))
    return rows


def _folder_files(folder: str) -> list[str]:
    from transferkit.data.folders import expand_paths

    return expand_paths([folder])


def uncertainty(candidates: list[dict], n_classes: int, thresholds: dict | None = None) -> dict[str, np.ndarray]:
    """margin, entropy (normalised to 0-1; what the top-k leaves is spread over the other classes), novelty, and
    the combined score in 0-1 (the mean percentile rank: high = label this first). A multi-label candidate:
    :func:`label_margin` (``thresholds``: the model's, where a candidate brings none)."""
    margin, entropy = [], []
    for c in candidates:
        if c.get("multi_label"):
            m, e = label_margin(c, c.get("thresholds") or thresholds or {})
            margin.append(m)
            entropy.append(e)
            continue
        p = np.array([t["probability"] for t in c["top_k"]], dtype=float)
        rest = max(0.0, 1.0 - p.sum())
        others = max(0, n_classes - len(p))
        full = np.concatenate([p, np.full(others, rest / others) if others else []])
        full = full[full > 0]
        margin.append(p[0] - (p[1] if len(p) > 1 else rest))
        entropy.append(float(-(full * np.log(full)).sum() / np.log(max(n_classes, 2))))
    novelty = np.array([c["novelty"] if c.get("novelty") is not None else 0.0 for c in candidates], dtype=float)
    margin, entropy = np.asarray(margin, dtype=float), np.asarray(entropy, dtype=float)
    parts = [_ranks(-margin), _ranks(entropy)] + ([_ranks(novelty)] if novelty.any() else [])
    return {"margin": margin, "entropy": entropy, "novelty": novelty, "score": np.mean(parts, axis=0)}


def label_scores(c: dict) -> dict[str, float]:
    """Every label's score of a multi-label candidate: its stored answer's, else (a row of the first schema)
    what its top-k lists."""
    scores = (c.get("answer") or {}).get("scores")
    return {k: float(v) for k, v in (scores or {t["label"]: t["probability"] for t in c["top_k"]}).items()}


def label_margin(c: dict, thresholds: dict) -> tuple[float, float]:
    """(min over labels of |score - threshold|, mean binary entropy of the scores / log 2) of a multi-label
    candidate; a label without a recorded threshold has the default 0.5."""
    from transferkit.tasks.multi_label import DEFAULT_THRESHOLD

    scores = label_scores(c)
    if not scores:
        return 0.0, 1.0
    p = np.clip(np.array(list(scores.values()), dtype=float), 1e-12, 1 - 1e-12)
    t = np.array([float(thresholds.get(k, DEFAULT_THRESHOLD)) for k in scores], dtype=float)
    binary = -(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)
    return float(np.abs(p - t).min()), float(binary.mean())


def answer_labels(c: dict, thresholds: dict) -> list[str]:
    """A multi-label candidate's labels: its stored answer's, else (the first schema stored the first label
    only) those of its scores over their thresholds; none for an unknown photo."""
    if c.get("answer") is not None:
        return list(c["answer"]["labels"])
    if c.get("unknown") and c.get("label") is None:
        return []
    from transferkit.tasks.multi_label import DEFAULT_THRESHOLD

    scores = label_scores(c)
    found = [k for k in sorted(scores, key=lambda k: -scores[k]) if scores[k] >= thresholds.get(k, DEFAULT_THRESHOLD)]
    return found or ([c["label"]] if c.get("label") else [])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Percentile ranks in 0-1 (ties share the mean rank)."""
    from scipy.stats import rankdata

    if len(values) < 2:
        return np.ones(len(values))
    return (rankdata(values) - 1) / (len(values) - 1)


def kcenter_greedy(features: np.ndarray, score: np.ndarray, n: int, near: float | None = None) -> list[int]:
    """``n`` indices, greedily: each time the photo of the highest ``score`` x ``min(1, d / near)^2``, where ``d``
    is its cosine distance to the nearest photo already picked (k-center greedy, its distance truncated at
    ``near``). Farther than ``near`` from every pick, a photo competes by its score alone; a near-copy of a pick
    (d << near) drops to the end. ``near``: a quarter of the median nearest-neighbour distance of the candidates
    (0.018 on the test pool, where re-encoded copies of a photo were 0.001-0.005 apart and distinct crops 0.07)."""
    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    n = min(n, len(x))
    if n == 0:
        return []
    if near is None:
        near = 0.25 * _median_nearest(x)
    near = max(float(near), 1e-6)
    first = int(np.argmax(score))
    picked, nearest = [first], np.maximum(1.0 - x @ x[first], 0.0)
    for _ in range(n - 1):
        gain = score * np.minimum(nearest / near, 1.0) ** 2
        gain[picked] = -1.0
        best = int(np.argmax(gain))
        picked.append(best)
        nearest = np.minimum(nearest, np.maximum(1.0 - x @ x[best], 0.0))
    return picked


def _median_nearest(x: np.ndarray, limit: int = 2000) -> float:
    """The median cosine distance of a candidate to its nearest other one (on at most ``limit`` of them)."""
    sample = x[np.linspace(0, len(x) - 1, min(len(x), limit)).astype(int)]
    if len(sample) < 2:
        return 1.0
    d = 1.0 - sample @ sample.T
    np.fill_diagonal(d, np.inf)
    return float(np.median(np.maximum(d.min(axis=1), 0.0)))


def features_of(paths: list[str], metadata: dict, ray_address: str | None = None) -> tuple[np.ndarray, list[int]]:
    """Pooled backbone features of ``paths`` (the model's backbone and size, ImageNet weights unless it was
    trained from a local weights file that still exists), through the feature cache; with ``ray_address`` the
    missing ones computed on that Ray cluster first (``scale.features.prefill``), then read from the cache."""
    from transferkit.training.features import FeatureExtractor

    weights = (metadata.get("training") or {}).get("weights")
    weights = weights if isinstance(weights, str) and os.path.isfile(weights) else "imagenet"
    extractor = FeatureExtractor(metadata.get("backbone") or "efficientnet_lite0", metadata.get("image_size"),
                                 weights=weights)
    if ray_address is not None:
        from transferkit.files import file_digest
        from transferkit.scale.features import prefill

        prefill(extractor, paths, 0, {p: file_digest(p) for p in paths}, ray_address)
    found = extractor.extract(paths, desc="review features")
    feats, kept, _ = found
    return feats[:, 0].reshape(len(kept), -1), kept


def model_thresholds(metadata: dict) -> dict[str, float]:
    """{label: threshold} of a multi-label model's metadata ({} otherwise)."""
    params = metadata.get("task_params") or {}
    found = params.get("thresholds") if isinstance(params, dict) else None
    return {str(k): float(v) for k, v in found.items()} if isinstance(found, dict) else {}


def rank(candidates: list[dict], metadata: dict, n: int, ray: str | None = None) -> tuple[list[int], dict]:
    """(the queue: indices of ``candidates``, the scores of every candidate); ``ray``: the cluster address
    whose workers compute the missing features."""
    n_classes = len(metadata.get("class_names") or []) or max(len(c["top_k"]) for c in candidates)
    scores = uncertainty(candidates, n_classes, model_thresholds(metadata))
    feats, kept = features_of([c["path"] for c in candidates], metadata, ray)
    order = kcenter_greedy(feats, scores["score"][kept], n)
    return [kept[i] for i in order], scores


LABEL_SEP = "|"  # a multi-label answer's labels, joined as a label file's cell (LabelSource.label_sep)
UNKNOWN = added.UNKNOWN  # a label meaning "none of the classes" (train --add keeps such photos out of the classes)
YES = ("yes", "y", "1", "true")
HOW_TO_FILL = (f"in queue.csv, per row: write the right label in 'label' (several joined by '{LABEL_SEP}' for a "
               f"multi-label model; '{UNKNOWN}' for none of the classes), or write yes in 'accept' and leave "
               f"'label' empty to take the model's answer; rows with neither are left out")




def queue_rows(candidates: list[dict], order: list[int], scores: dict, thresholds: dict | None = None) -> list[dict]:
    rows = []
    for r, i in enumerate(order, 1):
        c, fix = candidates[i], candidates[i]["correction"] or {}
        answer = "unknown" if c.get("unknown") and c["label"] is None else c["label"] or ""
        if c.get("multi_label") and answer != "unknown":  # every label, as a label file's cell lists them
            answer = LABEL_SEP.join(answer_labels(c, c.get("thresholds") or thresholds or {})) or "none"
        correction = {"wrong": f"wrong: {fix.get('label')}", "none": "none of these", "right": "right"}.get(
            fix.get("kind"), "")
        rows.append({"rank": r, "path": c["path"], "image": c["image"], "answer": answer,
                     "probability": "" if c["probability"] is None else f"{c['probability']:.4f}",
                     "novelty": f"{scores['novelty'][i]:.3f}", "margin": f"{scores['margin'][i]:.3f}",
                     "entropy": f"{scores['entropy'][i]:.3f}", "score": f"{scores['score'][i]:.3f}",
                     "seen": c["seen"], "correction": correction, "accept": "",
                     "label": fix.get("label") or {"right": answer, "none": UNKNOWN}.get(fix.get("kind"), "")})
    return rows


def write_csv(rows: list[dict], path: str, columns=QUEUE_COLUMNS) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_html(rows: list[dict], path: str, title: str, source: str = "SOURCE", queue: str = "queue.csv") -> str:
    """The queue as a page of thumbnails (the model's answer, the scores, the correction or label already given),
    headed by how to fill ``queue`` and the commands that turn it into a label file."""
    from transferkit.reports.html import _thumbnail_uri

    cards = []
    for r in rows:
        uri = _thumbnail_uri(r["path"]) or ""
        fix = f"<b>{html.escape(r['correction'])}</b>" if r["correction"] else "no correction yet"
        given = f" · label <b>{html.escape(r['label'])}</b>" if r["label"] else ""
        cards.append(f'<figure><img src="{uri}" alt=""><figcaption>#{r["rank"]} {html.escape(r["answer"])} '
                     f'{r["probability"]}<br>score {r["score"]} · margin {r["margin"]} · novelty {r["novelty"]}'
                     f'<br>{fix}{given} · seen {r["seen"]}×</figcaption></figure>')
    q, src = html.escape(queue), html.escape(source)
    how = (f"<p>Label these first. In <code>{q}</code> (one row per photo below, by rank), for each photo you "
           f"review:</p><ul><li>the answer is wrong: write the right label in <code>label</code> (several joined by "
           f"<code>{LABEL_SEP}</code> for a multi-label model);</li><li>the photo is of none of the classes: write "
           f"<code>{UNKNOWN}</code> in <code>label</code> (<code>train --add</code> keeps it out of the classes);"
           f"</li><li>the answer is right: write <code>yes</code> in <code>accept</code> and leave <code>label"
           f"</code> empty (the model's answer is taken: its top label, or a multi-label row's label set).</li></ul>"
           f"<p>A row with a <code>label</code> counts as given with or without <code>accept</code>; a row with "
           f"neither is left out. Then:<br><code>transferkit review {src} --accept {q} --out labels.csv</code><br>"
           f"<code>transferkit train DATA --add labels.csv</code></p>")
    page = (f"<!doctype html><html lang=en><meta charset=utf-8><title>{html.escape(title)}</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2rem}figure{display:inline-block;width:200px;margin:.4rem;"
            "vertical-align:top;font-size:.8rem}img{width:180px;height:180px;object-fit:cover;border-radius:6px}"
            f"</style><h1>{html.escape(title)}</h1>{how}{''.join(cards)}</html>")
    write_text_atomic(path, page)
    return path


def accepted_rows(candidates: list[dict], accept_csv: str | None,
                  class_names: list[str] | None = None) -> tuple[list[tuple[str, str]], dict]:
    """((path, label) to write, what was read). Taken: the corrected photos of the store ("wrong: it is X", "none
    of these" as ``unknown``, "right": the answer), then ``accept_csv``'s rows (the queue.csv a person filled),
    which win over a correction of the same photo: a filled ``label`` is the label given (with or without
    ``accept``); ``accept=yes`` with an empty ``label`` takes the model's answer (its top label, a multi-label row's
    label set, ``unknown`` where it answered unknown). ``class_names``: the model's, to check the labels given
    against. The second value: {"rows": rows read, "taken": {how: n}, "left": {why: n}} for the log line and the
    error of :func:`write_labels`."""
    chosen, how_of, left = {}, {}, {}
    for c in candidates:
        fix = c["correction"] or {}
        label = {"wrong": fix.get("label"), "none": UNKNOWN, "right": _answer_label(c)}.get(fix.get("kind"))
        if label:
            chosen[c["path"]], how_of[c["path"]] = label, "corrected on the page"
    rows = _read_queue(accept_csv) if accept_csv else []
    by_path = {c["path"]: c for c in candidates}
    for row in rows:
        label, how = _queue_label(row, by_path.get(row.get("path") or ""), class_names)
        if label is None:
            left[how] = left.get(how, 0) + 1
        else:
            chosen[row["path"]], how_of[row["path"]] = label, how
    taken = {}
    for how in how_of.values():
        taken[how] = taken.get(how, 0) + 1
    return sorted(chosen.items()), {"rows": len(rows), "taken": taken, "left": left}


def _read_queue(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise TransferkitError(f"--accept {path}: no such file (the queue.csv a review run wrote, filled in)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []) or not {"label", "accept"} & set(reader.fieldnames or []):
            raise TransferkitError(f"--accept {path}: not a review queue (it needs the columns path, accept, label)")
        return [{k: (v or "").strip() for k, v in r.items() if k} for r in reader]


def _queue_label(row: dict, c: dict | None, class_names: list[str] | None) -> tuple[str | None, str]:
    """(the label of one filled queue.csv row, how it was given) or (None, why it was left out)."""
    accept, label = row.get("accept", "").lower(), row.get("label", "")
    if not label and accept not in YES:
        return None, f"have accept={row['accept']!r} and no label" if accept else \
            "have neither a label nor accept=yes"
    if not label:  # accept=yes, label empty: the model's answer
        label = _answer_label(c) if c is not None else row.get("answer", "")
        if not label or label == "none":
            return None, "have accept=yes on an answer with no label (write the labels in 'label')"
    if not row.get("path") or not os.path.isfile(row["path"]):
        return None, "name a photo that is not there any more"
    names = [n.strip() for n in label.split(LABEL_SEP)] if LABEL_SEP in label else [label]
    if [n.lower() for n in names] == [UNKNOWN]:
        return UNKNOWN, "labelled unknown"
    if class_names and any(n not in class_names for n in names):
        return None, f"have a label that is not a class of the model ({', '.join(class_names)}) nor {UNKNOWN!r}"
    how = "given a label" if row.get("label") else "accepted the model's answer"
    return LABEL_SEP.join(names), how


def _answer_label(c: dict) -> str:
    """The model's answer of a candidate as a label: its top label (``unknown`` where it answered unknown), or a
    multi-label candidate's label set joined by ``LABEL_SEP`` ("" for none)."""
    if c.get("unknown") and c.get("label") is None:
        return UNKNOWN
    if c.get("multi_label"):
        return LABEL_SEP.join(answer_labels(c, c.get("thresholds") or {}))
    return c.get("label") or ""


def _counted(groups: dict) -> str:
    return ", ".join(f"{n} {why.replace('have ', 'has ', 1).replace('name ', 'names ', 1) if n == 1 else why}"
                     for why, n in sorted(groups.items(), key=lambda kv: -kv[1]))


def nothing_to_write(path: str, found: dict, accept: str | None, queue: str) -> TransferkitError:
    """The one-line error of an empty label file: the rows read, and why each group was left out."""
    if accept is None:
        return TransferkitError(f"{path}: no photo to write: no --accept QUEUE.csv given and the store holds no "
                                f"correction; fill {queue} ({HOW_TO_FILL}), then pass it with --accept {queue}")
    return TransferkitError(f"{path}: no photo to write: {found['rows']} row(s) read from {accept}: "
                            f"{_counted(found['left']) or 'none'}; {HOW_TO_FILL}")


def write_labels(chosen: list[tuple[str, str]], path: str, found: dict | None = None) -> str:
    """A label file (path, label) at ``path`` whose photos are copied into ``<stem>_images/`` beside it, and one
    log line of how they were given (``found``: what :func:`accepted_rows` read). ``chosen`` is not empty: the
    caller raised :func:`nothing_to_write` before any feature was computed."""
    found = found or {"rows": 0, "taken": {}, "left": {}}
    base = os.path.dirname(os.path.abspath(path))
    folder = os.path.splitext(os.path.basename(path))[0] + "_images"
    rows = []
    for source, label in chosen:
        name = os.path.basename(source)
        target = os.path.join(base, folder, name)
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
        rows.append({"path": f"{folder}/{name}", "label": label})
    unknown = sum(label == UNKNOWN for _, label in chosen)
    logger.info(f"{path}: {len(chosen)} photo(s) written ({_counted(found['taken'])}; {unknown} labelled "
                f"{UNKNOWN}, which train --add uses as 'none of these' examples, not as a class)"
                + (f"; {sum(found['left'].values())} queue row(s) left out: {_counted(found['left'])}"
                   if found["left"] else ""))
    return write_csv(rows, path, ("path", "label"))


def review(source: str, *, model: str | None = None, n: int = 50, out_dir: str = "review", labels: str | None = None,
           accept: str | None = None, files: str | None = None, ray: str | None = None) -> dict:
    """The review queue of a store (``source``: a SQLite file or URL) or of an unlabelled folder (with
    ``model``; ``ray``: answers and features computed on the Ray cluster at that address, "local": a local
    one); returns the paths written and the queue."""
    if accept and not labels:
        raise TransferkitError(f"--accept {accept}: the filled queue is read with --out LABELS.csv (the label file "
                               f"to write)")
    metadata, predictor = _model_metadata(model)
    if os.path.isdir(source):
        if predictor is None:
            raise TransferkitError(f"{source}: a folder is reviewed with --model M (its answers are computed)")
        candidates = folder_candidates(source, predictor) if ray is None else \
            ray_folder_candidates(source, os.path.abspath(model), predictor, ray, out_dir)
    elif ray is not None:
        raise TransferkitError(f"{source}: --ray reviews a folder of photos (a store's answers are already there)")
    else:
        candidates = store_candidates(source, files)
    if not candidates:
        raise TransferkitError(f"{source}: no collected photo to review")
    if metadata.get("task") == "multi_label":  # --model: rows a store's first schema kept without their task
        for c in candidates:
            c["multi_label"] = True
    queue_path = os.path.join(out_dir, "queue.csv")
    if labels:  # read before queue.csv is written again
        chosen, found = accepted_rows(candidates, accept, metadata.get("class_names") or None)
        if not chosen:  # before the features are computed
            raise nothing_to_write(labels, found, accept, queue_path)
    order, scores = rank(candidates, metadata, n, ray)
    rows = queue_rows(candidates, order, scores, model_thresholds(metadata))
    _keep_edits(rows, queue_path)
    os.makedirs(out_dir, exist_ok=True)
    written = {"queue": write_csv(rows, queue_path),
               "html": write_html(rows, os.path.join(out_dir, "review.html"), f"Review queue of {source}", source,
                                  queue_path)}
    if labels:
        written["labels"] = write_labels(chosen, labels, found)
    return {"written": written, "queue": rows, "candidates": len(candidates)}


def _keep_edits(rows: list[dict], queue_path: str) -> None:
    """The ``accept`` and ``label`` a person filled in an earlier queue.csv stay on the same photos."""
    if not os.path.isfile(queue_path):
        return
    with open(queue_path, newline="", encoding="utf-8") as f:
        edits = {r.get("path"): r for r in csv.DictReader(f) if r.get("accept") or r.get("label")}
    for row in rows:
        old = edits.get(row["path"])
        if old:
            row["accept"], row["label"] = old.get("accept") or "", old.get("label") or row["label"]


def _model_metadata(model: str | None):
    if model is None:  # the store alone: the default backbone's features for the diversity
        return {"backbone": "efficientnet_lite0", "image_size": None, "class_names": []}, None
    from transferkit.api import load_predictor

    predictor = load_predictor(model)
    return predictor.metadata | {"class_names": predictor.class_names}, predictor
