"""The pictures a person opens: training curves and the confusion matrix (matplotlib, no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from transferkit.data.images import open_rgb  # noqa: E402
from transferkit.errors import TransferkitError  # noqa: E402
from transferkit.files import atomic_path  # noqa: E402


def _save(fig, path: str) -> str:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return str(path)


def plot_history(history: dict, path: str, best_epoch: int | None = None, stage_boundary: int | None = None) -> str:
    """Loss and accuracy per epoch, train vs validation, with the kept (best) epoch marked (and where the
    fine-tuning stage began, if there was one)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        if metric in history:
            ax.plot(epochs, history[metric], label=f"train {metric}")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], label=f"validation {metric}")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"kept epoch {best_epoch}")
        if stage_boundary:
            ax.axvspan(stage_boundary + 0.5, len(epochs) + 0.5, color="orange", alpha=0.1, label="fine-tuning")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion_matrix(cm, class_names: list[str], path: str, normalise: bool = False) -> str:
    """Counts (or row-normalised recall) with truth on rows, prediction on columns; accents render as written."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalise else cm
    n = len(class_names)
    size = max(4.5, 0.7 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalise else max(shown.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalise else ""))
    threshold = shown.max() / 2 if shown.size else 0
    for i in range(n):
        for j in range(n):
            text = f"{shown[i, j]:.2f}" if normalise else f"{int(cm[i, j])}"
            ax.text(j, i, text, ha="center", va="center", color="white" if shown[i, j] > threshold else "black")
    return _save(fig, path)


def plot_cooccurrence(counts, label_names: list[str], path: str) -> str:
    """How many photos carry both labels (the diagonal: each label's photos), in the truth of a multi-label
    set; each cell written in."""
    counts = np.asarray(counts, dtype=float)
    n = len(label_names)
    size = max(4.5, 0.7 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(counts, cmap="Purples", vmin=0, vmax=max(counts.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="photos")
    ax.set_xticks(range(n), label_names, rotation=45, ha="right")
    ax.set_yticks(range(n), label_names)
    ax.set_title("labels on the same photo")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if counts[i, j] > threshold else "black")
    return _save(fig, path)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: str, bins: int = 10) -> str:
    """Accuracy against confidence per confidence bin (the diagonal is perfect calibration), bar width by count."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfect calibration")
    for b in range(bins):
        if (which == b).any():
            ax.bar(edges[b], correct[which == b].mean(), width=1 / bins, align="edge", alpha=0.7,
                   color="tab:blue", edgecolor="white", label="accuracy" if not ax.patches else None)
            ax.text(edges[b] + 0.5 / bins, 0.02, str(int((which == b).sum())), ha="center", fontsize=7)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_novelty(known: np.ndarray, unknown: np.ndarray, threshold: float, path: str) -> str:
    """Histograms of the novelty score (relative to the threshold: above 1 is answered 'unknown')."""
    k, u = np.asarray(known) / threshold, np.asarray(unknown) / threshold
    bins = np.linspace(0, max(k.max(initial=1), u.max(initial=1), 1.5) * 1.05, 40)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(k, bins=bins, alpha=0.6, label=f"known test photos ({len(k)})")
    ax.hist(u, bins=bins, alpha=0.6, label=f"unknowns ({len(u)})")
    ax.axvline(1.0, color="black", linestyle="--", label="threshold")
    ax.set_xlabel("novelty (score / threshold)")
    ax.set_ylabel("photos")
    ax.legend()
    return _save(fig, path)


def plot_samples(samples: dict[str, list[str]], path: str, thumb: int = 160) -> str:
    """A grid: one row per class (its name as the row title), a few of its images."""
    from transferkit.data.images import UnreadableImage, load_image

    names = list(samples)
    cols = max([len(v) for v in samples.values()] + [1])
    fig, axes = plt.subplots(len(names), cols, figsize=(2.1 * cols, 2.3 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(samples[name]):
                try:
                    ax.imshow(load_image(samples[name][c], thumb))
                except UnreadableImage:
                    continue
            if c == 0:
                ax.set_title(name, loc="left", fontsize=11, fontweight="bold")
    fig.tight_layout()
    return _save(fig, path)


def plot_prediction(image: np.ndarray, title: str, top_k: list[dict], path: str,
                    overlay: np.ndarray | None = None) -> str:
    """The photo titled 'label (probability)' beside a bar chart of the top-k probabilities (and, given an
    ``overlay``, the photo with its heat map between them)."""
    panels = 3 if overlay is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 4),
                             gridspec_kw={"width_ratios": [1.2] * (panels - 1) + [1]})
    ax_img, ax_bar = axes[0], axes[-1]
    ax_img.imshow(image)
    ax_img.axis("off")
    ax_img.set_title(title, fontsize=13)
    if overlay is not None:
        axes[1].imshow(overlay)
        axes[1].axis("off")
        axes[1].set_title("where the model looked", fontsize=11)
    labels = [t["label"] for t in top_k][::-1]
    values = [t["probability"] for t in top_k][::-1]
    ax_bar.barh(range(len(labels)), values, color="tab:blue")
    ax_bar.set_yticks(range(len(labels)), labels)
    ax_bar.set_xlim(0, 1)
    ax_bar.set_xlabel("probability")
    for i, v in enumerate(values):
        ax_bar.text(min(v + 0.02, 0.85), i, f"{v:.3f}", va="center")
    fig.tight_layout()
    return _save(fig, path)


def plot_explanation(photo: np.ndarray, overlay: np.ndarray, title: str, path: str) -> str:
    """The photo and the same photo with its heat map, side by side, under one title (the verdict)."""
    height, width = photo.shape[:2]
    fig, axes = plt.subplots(1, 2, figsize=(9, max(2.5, 4.5 * height / max(width, 1)) + 0.6))
    for ax, image, caption in zip(axes, (photo, overlay), ("photo", "heat map (Grad-CAM)")):
        ax.imshow(image)
        ax.axis("off")
        ax.set_title(caption, fontsize=10, color="#555")
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def show_predictions(rows: list[dict], out: str, explainer=None) -> list[str]:
    """Draw each predicted image with 'label (probability)' and its top-k bars (with ``explainer``, a
    ``reports.explain.Explainer``, its heat map too): ``out`` for one image, ``out`` with ``-1``, ``-2``, ...
    before the extension for several."""
    good = [r for r in rows if not r.get("error")]
    if not good:
        raise TransferkitError("no readable image to show")
    stem, ext = os.path.splitext(out)
    overlays = [None] * len(good)
    if explainer is not None:
        from transferkit.reports.explain import colorize, explained_class

        pairs = explainer.files([r["path"] for r in good], [explained_class(r, explainer.class_names) for r in good])
        overlays = [colorize(photo, heat) for photo, heat in pairs]
    written = []
    for n, (row, overlay) in enumerate(zip(good, overlays), start=1):
        target = out if len(good) == 1 else f"{stem}-{n}{ext or '.png'}"
        title = (f"none of these (novelty {row['novelty']:.2f})" if row.get("unknown") and row["label"] is None
                 else f"{row['label']} ({row['probability']:.3f})")
        photo = np.asarray(open_rgb(row["path"]))
        if overlay is not None:
            photo = np.asarray(Image.fromarray(photo).resize(overlay.shape[1::-1]))
        written.append(plot_prediction(photo, title, row["top_k"], target, overlay))
    return written


def plot_comparison(results: list[dict], chosen: str, path: str) -> str:
    """``transferkit compare``'s picture: validation accuracy and macro F1 of each backbone (and test accuracy,
    when measured) against its images/s on this machine (up and to the right is better), the chosen one ringed."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    speed = [r["images_per_second"] for r in results]
    ax.errorbar(speed, [r["val_accuracy"] for r in results], yerr=[r["val_accuracy_se"] for r in results],
                fmt="o", color="tab:blue", capsize=3, label="validation accuracy (± 1 s.e.)")
    ax.plot(speed, [r["val_macro_f1"] for r in results], "s", color="tab:orange", label="validation macro F1")
    tested = [r for r in results if "test_accuracy" in r]
    if tested:
        ax.plot([r["images_per_second"] for r in tested], [r["test_accuracy"] for r in tested], "^",
                color="tab:purple", markerfacecolor="none", label="test accuracy (not used to pick)")
    for r in results:
        ax.annotate(r["backbone"] + (" (chosen)" if r["backbone"] == chosen else ""),
                    (r["images_per_second"], r["val_accuracy"]), textcoords="offset points",
                    xytext=(6, 6 + 10 * results.index(r)),
                    fontsize=8, fontweight="bold" if r["backbone"] == chosen else "normal")
        if r["backbone"] == chosen:
            ax.plot([r["images_per_second"]], [r["val_accuracy"]], "o", markersize=16, markerfacecolor="none",
                    markeredgecolor="tab:green", markeredgewidth=2)
    low = min([r["val_accuracy"] - r["val_accuracy_se"] for r in results] + [r["val_macro_f1"] for r in results]
              + [r["test_accuracy"] for r in tested])
    ax.set_ylim(max(0.0, low - 0.05), 1.02 + 0.015 * len(results))  # room for the names above 100 %
    ax.set_xlim(0, max(speed + [1]) * 1.3)
    ax.set_xlabel("backbone images/s on this machine")
    ax.set_ylabel("score")
    ax.set_title("backbones compared (same split, same head)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
