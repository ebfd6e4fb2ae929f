"""``MODEL_CARD.md``: what a person should know before using a model, rendered from its metadata alone.

Every figure in the card is read from the metadata the model file carries (``transferkit.json``: the options
record, the split's counts, the duplicate findings, validation and test metrics, calibration, the novelty
threshold, the backbone comparison); nothing is hand-kept text that could drift from the model. The limits are
rules over the same figures (a class with fewer than ``FEW_IMAGES`` images, a validation split so small that its
95 % interval is wide, no test folder, leakage, imbalance, skipped files, a reduced image size), so they appear
exactly when they apply. ``transferkit card MODEL`` renders it for any existing model file.
"""

from __future__ import annotations

import os

from transferkit.files import write_text_atomic

FEW_IMAGES = 20  # a class with fewer (training + validation) images gets a limit line
IMBALANCE = 3.0  # largest / smallest class above this gets a limit line
WIDE_INTERVAL = 0.10  # a 95 % accuracy interval wider than this (either side) gets a limit line


def wilson(accuracy: float, n: int) -> tuple[float, float]:
    """The 95 % Wilson interval of an accuracy measured on ``n`` images (scipy's binomial test)."""
    from scipy.stats import binomtest

    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(int(round(accuracy * n)), n).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def _cell(value) -> str:
    text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _intended_use(meta: dict) -> list[str]:
    names, novelty = meta.get("class_names", []), meta.get("novelty")
    data = meta.get("data", {})
    seen = (f", photos like the {data.get('n_train', 0) + data.get('n_val', 0)} it was trained and validated on "
            f"(folder `{os.path.basename(str(data['dir']).rstrip('/'))}`)") if data.get("dir") else ""
    lines = ["## Intended use", "",
             f"Sorting photos into one of {len(names)} classes: {', '.join(f'*{n}*' for n in names)}{seen}. "
             f"Input: {meta.get('input', 'RGB')}.", ""]
    if novelty:
        kept = f", a threshold that keeps {novelty['keep_known']:.0%} of known validation photos" \
            if "keep_known" in novelty else ""
        lines.append(f"A photo far from every class (novelty score above {novelty['threshold']:.4g}{kept}) is "
                     f"answered *unknown* instead of a class.")
        if novelty.get("background"):
            lines.append(f"The score was also fitted against {novelty['background']['photos']} photo(s) a reviewer "
                         f"labelled *unknown* (none of these classes), as examples of what is none of them.")
    else:
        lines.append("This model has no novelty threshold: every photo gets one of these classes, even a photo of "
                     "none of them.")
    return lines + [""]


def _data(meta: dict) -> list[str]:
    data, training = meta.get("data", {}), meta.get("training", {})
    counts = data.get("counts") or {}
    test_counts = {n: s.get("support") for n, s in (meta.get("test", {}).get("per_class") or {}).items()}
    lines = ["## Data", ""]
    if not data:
        return lines + ["The model file records no training data (made by an older transferkit, or elsewhere).", ""]
    if counts:
        header = ["class", "train", "validation"] + (["test"] if test_counts else []) + ["total (train + val)"]
        rows = [[n, c["train"], c["validation"]] + ([test_counts.get(n)] if test_counts else [])
                + [c["train"] + c["validation"]] for n, c in counts.items()]
        lines += _table(header, rows) + [""]
    lines.append(f"Split: {data.get('n_train')} training and {data.get('n_val')} validation images "
                 f"({training.get('val_split')} of each class held out, seed {training.get('seed')}); files' "
                 f"fingerprint `{data.get('fingerprint')}`.")
    if "n_skipped" in data:
        lines.append(f"Skipped (unreadable) files: {data['n_skipped']}.")
        lines += [f"- `{s['path']}`: {s['reason']}" for s in data.get("skipped", [])]
    dup = data.get("duplicates")
    if dup:
        found = ", ".join(f"{k}: {v}" for k, v in sorted(dup.get("counts", {}).items())) or "none"
        lines += ["", f"Duplicates ({dup.get('method')}, checked in {', '.join(dup.get('checked', []))}): "
                      f"{dup.get('n_groups', 0)} group(s); {found}. Near duplicates (resized or re-encoded copies) "
                      f"are not checked at training: `transferkit inspect DATA --test-dir TEST`."]
        lines += [f"- {', '.join(g['kinds'])}: " + ", ".join(f"`{f['split']}/{f['path']}`" for f in g["files"])
                  for g in dup.get("groups", [])]
    return lines + [""]


def _model(meta: dict) -> list[str]:
    info, fit, training = meta.get("backbone_info") or {}, meta.get("fit") or {}, meta.get("training") or {}
    weights = info.get("weights") or {}
    lines = ["## Model", "",
             f"- Backbone: **{meta.get('backbone')}** at {meta.get('image_size')} px"
             + (f" (its default {info['default_size']} px, {info.get('feature_dim')} features)" if info else ""),
             f"- Weights: {training.get('weights')}" + (f", from {weights['source']}" if weights.get("source") else "")
             + (f" (`{weights['checksum']}`)" if weights.get("checksum") else "")]
    chosen = (fit.get("head_choice") or {}).get("chosen")
    if chosen:
        n = len((fit.get("head_choice") or {}).get("candidates", []))
        lines.append(f"- Head: {chosen['head']} on the final features + {chosen['depths']} intermediate block(s)"
                     + (f", the best of {n} candidates on the validation split" if n > 1 else ""))
    if fit.get("feature_runtime"):
        lines.append(f"- Features computed on {fit['feature_runtime']}")
    if meta.get("fine_tune"):
        ft = meta["fine_tune"]
        lines.append(f"- Fine-tuned: top {ft.get('unfreeze_top')} block(s), {ft.get('epochs')} epoch(s) at "
                     f"learning rate {ft.get('learning_rate')}")
    lines.append(f"- Made by transferkit {meta.get('transferkit_version')} (Keras {meta.get('keras_version')}) on "
                 f"{meta.get('created')}")
    lines += ["", "<details><summary>Training options (the options record)</summary>", ""]
    lines += _table(["option", "value"], [[k, v] for k, v in training.items()]) + ["", "</details>", ""]
    choice = meta.get("backbone_choice")
    if choice:
        lines += ["### Backbone choice (`--backbone auto`)", ""]
        lines += _table(["backbone", "val accuracy", "val macro F1", "images/s"],
                        [[r["backbone"], f"{r['val_accuracy']:.3f}", f"{r['val_macro_f1']:.3f}",
                          f"{r['images_per_second']:.0f}"]
                         for r in choice.get("results", [])])
        lines += ["", f"Chosen: {choice.get('chosen')}: {choice.get('reason')}."]
        lines += [f"Note: {n}." for n in choice.get("notes", [])] + [""]
    return lines


def _metrics(meta: dict) -> list[str]:
    lines = ["## Metrics", ""]
    rows = []
    for name in ("validation", "test"):
        m = meta.get(name)
        if m:
            n = m.get("n_images")
            low, high = wilson(m["accuracy"], n) if n else (None, None)
            rows.append([name, n, f"{m['accuracy']:.3f}", f"{low:.3f}–{high:.3f}" if n else "",
                         f"{m['macro_f1']:.3f}"])
    lines += _table(["split", "images", "accuracy", "95 % interval (Wilson)", "macro F1"], rows) + [""]
    if not meta.get("test"):
        lines += ["No separate test folder was evaluated.", ""]
    per_class = (meta.get("test") or meta.get("validation") or {}).get("per_class")
    if per_class:
        which = "test" if meta.get("test", {}).get("per_class") else "validation"
        lines += [f"Per class ({which}):", ""]
        lines += _table(["class", "precision", "recall", "F1", "images"],
                        [[n] + [f"{s[k]:.3f}" for k in ("precision", "recall", "f1")] + [s["support"]]
                         for n, s in per_class.items()])
        lines.append("")
    return lines + _per_label(meta)


def _per_label(meta: dict) -> list[str]:
    """A multi-label model's figures: micro F1, mAP, subset accuracy (the "accuracy" above), Hamming loss, and
    each label's precision, recall, F1, AP and threshold."""
    which = "test" if (meta.get("test") or {}).get("per_label") else "validation"
    m = meta.get(which) or {}
    if not m.get("per_label"):
        return []
    m_ap = "-" if m.get("mAP") is None else f"{m['mAP']:.3f}"
    lines = [f"Multi-label ({which}): the accuracy above is subset accuracy (every label of a photo right); micro "
             f"F1 {m['micro_f1']:.3f}, mAP {m_ap}, Hamming loss {m['hamming_loss']:.3f}. Each label's threshold "
             f"is the one of maximum F1 on the validation split.", ""]
    lines += _table(["label", "precision", "recall", "F1", "AP", "threshold", "images"],
                    [[n] + [f"{s[k]:.3f}" for k in ("precision", "recall", "f1")]
                     + ["-" if s.get("ap") is None else f"{s['ap']:.3f}", f"{s['threshold']:.2f}", s["support"]]
                     for n, s in m["per_label"].items()])
    return lines + [""]


def _trust(meta: dict) -> list[str]:
    novelty, test = meta.get("novelty"), meta.get("test") or {}
    if not novelty:
        return []
    lines = ["## Calibration and unknowns", ""]
    on_test = f"; on the test folder {test['ece']:.3f}" if "ece" in test else ""
    if "temperature_reason" in novelty:  # the keep-or-not rule: which temperature, the held-out ECE, why
        fitted = novelty.get("ece_fitted")
        t = novelty.get("temperature")
        lines.append(f"- Temperature {'per label' if t is None else f'{t:.4g}'}"
                     f" ({'fitted and kept' if novelty.get('temperature_kept') else 'T = 1 kept'}): held-out expected "
                     f"calibration error at T = 1 {novelty.get('ece_before', float('nan')):.3f}, with the fitted T "
                     f"{'-' if fitted is None else f'{fitted:.3f}'}, as kept "
                     f"{novelty.get('ece_after', float('nan')):.3f}{on_test}. {novelty['temperature_reason']}.")
    elif novelty.get("temperature") is not None:
        lines.append(f"- Temperature {novelty['temperature']:.4g} (fitted on validation): expected calibration "
                     f"error {novelty.get('ece_before', float('nan')):.3f} → {novelty.get('ece_after', float('nan')):.3f}"
                     + on_test)
    lines.append(f"- Unknown threshold: novelty ({novelty.get('method')}, {novelty.get('covariance')}) above "
                 f"{novelty['threshold']:.6g}; keeps {novelty.get('validation_kept', 0):.1%} of validation photos"
                 + (f", {test['known_kept']:.1%} of test photos" if "known_kept" in test else ""))
    return lines + [""]


def _guarantees(meta: dict) -> list[str]:
    """The conformal guarantees the model offers (``models.conformal``), with their assumption."""
    found = meta.get("conformal")
    if not isinstance(found, dict):
        return []
    fitted = found.get("fitted_on") or {}
    delta = (found.get("risk") or {}).get("delta", 0.1)
    if found.get("task") == "multi_label":
        return _label_guarantees(found, fitted, delta)
    return ["## Guarantees", "",
            f"- Prediction sets (`predict --coverage 0.95`; {str(found.get('method')).upper()}, split conformal, "
            f"on {found.get('n')} held-out photos: {fitted.get('validation', 0)} validation, "
            f"{fitted.get('out_of_fold', 0)} out-of-fold training): a set holds the right label at least the asked "
            f"share of the time, **on average over photos**; not for each class, not for each photo.",
            _class_line(found, meta.get("class_names") or []),
            f"- Abstention (`predict --max-error 0.05`): with probability ≥ {1 - delta:.0%} over those photos, the "
            f"error among answered photos is at most the bound (Learn-then-Test: exact binomial tests in fixed "
            f"sequence over 20 cut-offs). " + _floor_line(found, delta),
            "- Expected-error abstention (`predict --expected-error 0.05`): a new photo gets a wrong answer with "
            "probability at most the bound, **on average** over calibrations (conformal risk control), not with "
            f"{1 - delta:.0%} confidence; it needs at least 1 / bound - 1 calibration photos.",
            "- Assumption: new photos are exchangeable with the training folder's (same source, same class mix). "
            "Other cameras, a drifting class mix or photos of none of the classes void both.", ""]


def _floor_line(found: dict, delta: float) -> str:
    """The smallest error bound the calibration photos can certify (all right): below it every photo abstains."""
    from transferkit.models.conformal import smallest_certifiable

    n = len((found.get("risk") or {}).get("confidence") or [])
    return (f"The smallest bound {n} calibration photos can certify is {smallest_certifiable(n, delta):.4f} (all of "
            f"them right); under it every photo abstains.")


def _class_line(found: dict, class_names: list) -> str:
    """The per-class (Mondrian) sets, with the classes too small for 0.90 named."""
    from transferkit.models.conformal import class_needed

    per_class = found.get("per_class")
    if not isinstance(per_class, list) or not per_class:
        return "- Per-class sets (`--class-coverage`): not in this file (trained before they were stored)."
    names = class_names if len(class_names) == len(per_class) else [str(i) for i in range(len(per_class))]
    few = [f"{n} ({c.get('n')})" for n, c in zip(names, per_class) if c.get("n", 0) < class_needed(0.9)]
    return ("- Per-class sets (`predict --class-coverage 0.9`; each class's own conformal quantile, Mondrian): the "
            "asked coverage holds **within every class**; a class with under level / (1 - level) calibration photos "
            f"(9 at 0.90, 19 at 0.95) is in every set. Under 9 at 0.90: {', '.join(few) or 'none'}.")


def _label_guarantees(found: dict, fitted: dict, delta: float) -> list[str]:
    """A multi-label model's guarantees (``models.conformal_labels``): per label, with the labels too rare for a
    level named."""
    import math

    positives = {n: r.get("n", 0) for n, r in (found.get("labels") or {}).items()}
    short = [f"{level:.2f}: {', '.join(n for n, k in positives.items() if k < math.ceil(level / (1 - level) - 1e-9))}"
             for level in (0.8, 0.9, 0.95) if any(k < math.ceil(level / (1 - level) - 1e-9) for k in positives.values())]
    return ["## Guarantees", "",
            f"- Label sets (`predict --coverage 0.9`; per-label split conformal thresholds, Mondrian by label, on "
            f"{found.get('n')} held-out photos: {fitted.get('validation', 0)} validation, "
            f"{fitted.get('out_of_fold', 0)} out-of-fold training; positives per label: "
            + ", ".join(f"{n} {k}" for n, k in positives.items()) + "): **for each label**, a photo that shows "
            "it has it in its set at least the asked share of the time. Not per photo, and a set may hold extra "
            "labels.",
            "- No guarantee where a label has too few held-out photos for the level (the set then always holds "
            "it): " + ("; ".join(short) if short else "none") + ".",
            f"- Abstention (`predict --max-error 0.05`): with probability ≥ {1 - delta:.0%} over those photos, "
            "the share of answered photos whose label set is not exactly right is at most the bound (Learn-then-"
            "Test: exact binomial tests in fixed sequence over 20 cut-offs of the answer's confidence). "
            + _floor_line(found, delta),
            "- Assumption: new photos are exchangeable with the training folder's (same source, same label mix). "
            "Other cameras, a drifting label mix or photos of none of the labels void both.", ""]


def limits(meta: dict) -> list[str]:
    """The limits that apply to this model, each a sentence computed from its metadata."""
    data, training, found = meta.get("data") or {}, meta.get("training") or {}, []
    totals = {n: c["train"] + c["validation"] for n, c in (data.get("counts") or {}).items()}
    few = {n: t for n, t in totals.items() if t < FEW_IMAGES}
    found += [f"Class *{n}* has only {t} images (fewer than {FEW_IMAGES}): its figures rest on very few photos, "
              f"expect it to be the least reliable." for n, t in few.items()]
    nonzero = [t for t in totals.values() if t]
    if nonzero and max(nonzero) / min(nonzero) > IMBALANCE:
        found.append(f"The classes are imbalanced ({max(nonzero)} vs {min(nonzero)} images): the rare classes are "
                     f"weighted up in training, yet measured on few photos.")
    val = meta.get("validation") or {}
    if val.get("n_images"):
        low, high = wilson(val["accuracy"], val["n_images"])
        if high - low > 2 * WIDE_INTERVAL:
            found.append(f"Validation measured on {val['n_images']} images only: its accuracy "
                         f"{val['accuracy']:.3f} could be anywhere in {low:.3f}–{high:.3f} (95 %).")
    if not meta.get("test"):
        found.append("No separate test folder: validation also chose the head"
                     + (" and the backbone" if meta.get("backbone_choice") else "") + ", so it is slightly "
                     "optimistic. Measure on photos taken apart from the training ones: `transferkit evaluate`.")
    if training.get("refit"):
        found.append("The head was refitted on training + validation photos: the validation figures no longer "
                     "measure the final head.")
    counts = (data.get("duplicates") or {}).get("counts") or {}
    for kind, text in (("train-test leak", "the test score overstates accuracy"),
                       ("train-validation leak", "the validation score overstates accuracy"),
                       ("across classes", "the same photo is labelled with different classes")):
        if counts.get(kind):
            found.append(f"{counts[kind]} exact duplicate(s) of kind '{kind}': {text}.")
    if data.get("n_skipped"):
        found.append(f"{data['n_skipped']} file(s) could not be read and were left out.")
    info = meta.get("backbone_info") or {}
    if info.get("default_size") and meta.get("image_size", 0) < info["default_size"]:
        found.append(f"Trained at {meta['image_size']} px, below the backbone's {info['default_size']} px: fine "
                     f"detail is lost.")
    found.append(f"It knows only its {len(meta.get('class_names', []))} classes, and only photos like its training "
                 f"photos: other cameras, lighting or backgrounds are not measured here.")
    return found


def model_card(metadata: dict) -> str:
    """The model card (Markdown) of a model, from its metadata only (no absolute path of this machine in it)."""
    from transferkit.runs import portable_metadata

    metadata = portable_metadata(metadata)
    names = metadata.get("class_names", [])
    lines = [f"# Model card: {metadata.get('backbone')} classifier of {len(names)} classes", "",
             "*Written by transferkit from the model file's metadata; regenerate with `transferkit card MODEL`.*", ""]
    lines += _intended_use(metadata) + _data(metadata) + _model(metadata) + _metrics(metadata) + _trust(metadata)
    lines += _guarantees(metadata)
    lines += ["## Limits", ""] + [f"- {line}" for line in limits(metadata)]
    return "\n".join(lines) + "\n"


def write_model_card(metadata: dict, path: str) -> str:
    """Write the card to ``path`` atomically."""
    write_text_atomic(path, model_card(metadata))
    return str(path)
