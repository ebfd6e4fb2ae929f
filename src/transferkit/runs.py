"""The run folder a training writes (``runs/<date-time>/`` or ``--out``): what each file holds, and the checks
that let ``--resume`` continue a run only on the same split and the same features.

    model.keras           the classifier + metadata (rewritten at every better epoch, atomically)
    split.json            which files went to training and to validation, the files' fingerprint, skipped files
    history.json / .png   the head's (and the second stage's) curves, the kept epoch marked
    metrics.json          validation (and test) metrics, timings, skipped files
    finetune_state.json   the second stage's progress (epochs done, best epoch), for --resume
    report.html           the test report (with confusion matrices) when a test folder was given
    MODEL_CARD.md         data, backbone, options, metrics, calibration, limits: rendered from the metadata only
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os

from transferkit.data.folders import TrainingData, label_count
from transferkit.errors import TransferkitError
from transferkit.files import file_digest, write_json_atomic
from transferkit.log import logger
from transferkit.options import SPLIT_AND_FEATURES, TrainOptions

FORMAT = "transferkit-model/2"  # the metadata layout: "training" is the options record, "data" the fingerprint
MODEL_NAME = "model.keras"
SPLIT_NAME = "split.json"
CARD_NAME = "MODEL_CARD.md"
RUN_FILES = (MODEL_NAME, SPLIT_NAME, "history.json", "history.png", "metrics.json", "finetune_state.json",
             "report.html", CARD_NAME)


def default_folder() -> str:
    return os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def weights_id(weights) -> str | None:
    """How a run records its weights: ``imagenet``, None (random), or a local file by name and content hash (the
    path itself stays on this machine)."""
    if weights in (None, "imagenet") or not os.path.isfile(str(weights)):
        return weights
    return f"{os.path.basename(str(weights))}#blake2b:{file_digest(weights)[:16]}"


def stored_options(options: TrainOptions) -> dict:
    """``metadata["training"]``: the options record, with the image size resolved and the weights by identity."""
    return options.to_dict() | {"image_size": options.size, "weights": weights_id(options.weights)}


def write_split(out: str, data: TrainingData) -> None:
    write_json_atomic(os.path.join(out, SPLIT_NAME), {
        "root": data.root, "fingerprint": data.fingerprint, "class_names": data.class_names,
        "train": data.relative(data.train_paths), "validation": data.relative(data.val_paths),
        "skipped": data.skipped})


def read_split(out: str) -> dict:
    try:
        with open(os.path.join(out, SPLIT_NAME), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def check_resumable(out: str, metadata: dict, options: TrainOptions) -> TrainOptions:
    """Refuse, in one line naming the difference, a resume whose options would change the split or features.
    Returns the options the run continues with: the run's own record (its head was trained with them), with this
    call's engine and cache choices."""
    if metadata.get("format") != FORMAT:
        raise TransferkitError(f"{out}: made by transferkit {metadata.get('transferkit_version', '?')}, whose runs "
                               f"this version cannot resume; start a new run with another --out")
    stored, now = metadata.get("training", {}), stored_options(options)
    for name in SPLIT_AND_FEATURES:
        if stored.get(name) != now[name]:
            raise TransferkitError(f"{out}: cannot resume with {name}={now[name]!r}: the run used "
                                   f"{name}={stored.get(name)!r}, and another value would change the split or the "
                                   f"features (start a new run with another --out)")
    kept = {k: v for k, v in stored.items() if k in TrainOptions.names()}
    ignored = [k for k in kept if k not in ("runtime", "precision", "cache") and kept[k] != now[k]]
    if ignored:
        logger.info(f"resuming with the run's own {', '.join(ignored)} (the model was trained with them)")
    return TrainOptions(**(kept | {k: now[k] for k in ("runtime", "precision", "cache")}))


def options_of(metadata: dict, image_size: int, params: dict) -> TrainOptions:
    """The options record of a loaded model file, true to the file's own image size and backbone even where the
    record is missing or from an older version."""
    try:
        options = TrainOptions(**params)
    except TransferkitError:  # a record that no longer validates: keep what the file itself says
        options = TrainOptions()
    backbone = metadata.get("backbone", options.backbone)
    try:
        return dataclasses.replace(options, image_size=int(image_size), backbone=backbone)
    except TransferkitError:  # a backbone this version does not know: the file still predicts
        return dataclasses.replace(options, image_size=int(image_size))


def remove(out: str, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(out, name))


def check_same_files(out: str, metadata: dict, data: TrainingData) -> None:
    """Refuse a resume on training files that changed since the run began (validation images could leak into
    training); name one file that was added, removed or changed."""
    if metadata.get("data", {}).get("fingerprint") == data.fingerprint:
        return
    before = read_split(out)
    if not before:
        raise TransferkitError(f"{out}: cannot resume: the training files differ from the run's (and its "
                               f"{SPLIT_NAME} is missing); start a new run with another --out")
    old = set(before.get("train", []) + before.get("validation", []))
    new = set(data.relative(data.train_paths + data.val_paths))
    change = (f"'{sorted(new - old)[0]}' was added" if new - old else
              f"'{sorted(old - new)[0]}' was removed" if old - new else "a file's content or label changed")
    raise TransferkitError(f"{out}: cannot resume: the training files changed since the run began ({change}); "
                           f"start a new run with another --out")


def check_same_split(out: str, data: TrainingData) -> None:
    """For a resume: the run's recorded split must be the one these files and options give (a run killed before
    its first model file has only ``split.json`` to go by)."""
    before = read_split(out)
    if before and (before.get("train") != data.relative(data.train_paths)
                   or before.get("validation") != data.relative(data.val_paths)):
        raise TransferkitError(f"{out}: cannot resume: these files or options give another training/validation "
                               f"split than the run's {SPLIT_NAME}; start a new run with another --out")


def remove_partial_writes(out: str) -> None:
    """Delete the temporary files of atomic writes that a killed run left in ``out`` (``.model.keras.*``)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(out):
            if name.startswith(".") and any(name.startswith(f".{known}.") for known in RUN_FILES):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(out, name))


def check_model_metadata(path: str, metadata, n_outputs: int | None = None) -> list[str]:
    """The class names of a model file's metadata, or one line saying what is wrong with it (a file from
    elsewhere may carry anything: no names, names that are not strings, duplicates, a count that is not the
    model's)."""
    if not isinstance(metadata, dict):
        raise TransferkitError(f"{path}: damaged transferkit metadata (not a JSON object)")
    names = metadata.get("class_names")
    if not isinstance(names, list) or not names:
        raise TransferkitError(f"{path}: not a usable transferkit model (its metadata has no class names)")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise TransferkitError(f"{path}: damaged transferkit metadata (class names must be distinct, non-empty "
                               f"strings)")
    novelty = metadata.get("novelty")
    if novelty is not None:
        threshold = novelty.get("threshold") if isinstance(novelty, dict) else None
        if not isinstance(threshold, (int, float)) or not 0 < threshold < float("inf"):
            raise TransferkitError(f"{path}: damaged transferkit metadata (novelty threshold {threshold!r})")
    expected = len(names) + (novelty is not None)  # a trusted model's last output is its novelty score
    if n_outputs is not None and n_outputs != expected:
        raise TransferkitError(f"{path}: {len(names)} class names for {n_outputs} model outputs")
    return list(names)


def portable_metadata(metadata: dict) -> dict:
    """The metadata an export carries: no path of this machine (the training folder becomes its base name; any
    other absolute path string its file name), so a shared model does not reveal where it was made."""

    def scrub(value):
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if isinstance(value, str) and _looks_local(value):
            return os.path.basename(value.rstrip("/\\")) or "."
        return value

    return scrub(metadata)


def _looks_local(text: str) -> bool:
    return (os.path.isabs(text) or text.startswith("~") or (len(text) > 2 and text[1:3] in (":\\", ":/"))) \
        and "\n" not in text and len(text) < 4096


def data_record(data: TrainingData, skipped: list[dict] | None, duplicates: dict | None, limit: int = 20) -> dict:
    """``metadata["data"]``'s details for the model card: images per class and split, the skipped files (paths
    below the training folder), the duplicate findings of ``data.health.run_duplicates``."""
    counts = {name: {"train": label_count(data.y_train, k), "validation": label_count(data.y_val, k)}
              for k, name in enumerate(data.class_names)}
    root = os.path.abspath(data.root)
    shown = [{"path": os.path.relpath(s["path"], root) if os.path.abspath(s["path"]).startswith(root + os.sep)
              else os.path.basename(s["path"]), "reason": s.get("reason", "")} for s in (skipped or [])[:limit]]
    record = {"counts": counts, "n_skipped": len(skipped or []), "skipped": shown}
    if duplicates is not None:
        record["duplicates"] = duplicates
    return record


def metrics_record(metrics: dict) -> dict:
    """What the model file keeps of a metrics dict beside accuracy and macro F1: images, per-class figures, the
    confusion matrix (the model card and a notebook's view of a loaded classifier read them), and a test run's
    calibration error and known photos kept."""
    kept = {k: metrics[k] for k in ("n_images", "per_class", "confusion_matrix", "per_label", "micro_f1", "mAP",
                                     "subset_accuracy", "hamming_loss") if k in metrics}
    if (metrics.get("calibration") or {}).get("ece") is not None:
        kept["ece"] = metrics["calibration"]["ece"]
    if isinstance(metrics.get("novelty"), dict) and "known_kept" in metrics["novelty"]:
        kept["known_kept"] = metrics["novelty"]["known_kept"]
    return kept


def backbone_record(options: TrainOptions) -> dict:
    """``metadata["backbone_info"]``: the registry's facts about the run's backbone and where its weights came from
    (written at training, so a model card needs no registry of this version to say it)."""
    from transferkit.models.backbones import get_spec

    spec = get_spec(options.backbone)
    if options.weights == "imagenet":
        origin = {"source": spec.weights.describe(), "kind": spec.weights.kind, "checksum": spec.weights.checksum}
    else:
        origin = {"source": "random initialisation" if options.weights is None else "local file",
                  "kind": "none" if options.weights is None else "file", "checksum": weights_id(options.weights)}
    return {"backbone_info": {"default_size": spec.default_size, "feature_dim": spec.feature_dim,
                              "n_blocks": spec.n_blocks, "weights": origin}}
