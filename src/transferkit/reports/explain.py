"""Heat maps a person looks at: the photo with the Grad-CAM map of its predicted class laid over it (``predict
--explain``, ``--show``, the report's galleries, the server's ``?explain=1``).

Predictions come from whatever engine answers (a converted OpenVINO model, an ONNX export, Keras); the heat map
needs the Keras model's gradients, so :class:`Explainer` loads the ``.keras`` file's Keras model on first use only
(TensorFlow is imported there and nowhere else in this module: the server imports this module at start-up and an
ordinary request never loads TensorFlow because of it). An ONNX export has no gradients to give: no explainer.
"""

from __future__ import annotations

import base64
import io
import os
import threading

import numpy as np
from PIL import Image

from transferkit.errors import TransferkitError
from transferkit.files import atomic_path

MAX_PHOTO_SIDE = 1024  # the photo under a heat map (its 7 x 7 cells need no more)
ALPHA = 0.5  # the heat map's opacity where it is hottest (it fades out where the model did not look)


def colorize(photo: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """``photo`` (H, W, 3) uint8 with ``heatmap`` (any h, w; 0-1) resized over it in the 'jet' colour map, more
    opaque where hotter; uint8 (H, W, 3)."""
    from matplotlib import colormaps

    from transferkit.models.gradcam import upsample

    photo = np.asarray(photo, np.uint8)
    heat = upsample(heatmap, photo.shape[1], photo.shape[0])
    colours = colormaps["jet"](heat)[..., :3] * 255.0
    alpha = (ALPHA * np.sqrt(heat))[..., None]
    return np.clip(photo * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8)


FLAT = 0.05  # a heat map whose highest and lowest cells differ by less (of its 0-1 range) shows nothing


def is_flat(heatmap: np.ndarray) -> bool:
    """True for a map that points nowhere: every cell (nearly) equal, zero included (Grad-CAM's ReLU leaves all
    zeros where no region raises the class). Laid over the photo such a map is invisible (alpha 0) or an even
    tint, which read as "no map" in the report's galleries (issue 30); it is labelled "flat map" instead."""
    heat = np.asarray(heatmap, np.float64)
    return bool(heat.size == 0 or float(heat.max() - heat.min()) < FLAT)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def annotated_overlay(photo: np.ndarray, heatmap: np.ndarray, side: int = 360) -> Image.Image:
    """The overlay fitted in a ``side`` x ``side`` square (the galleries show square thumbnails, cropping
    anything else) with the colour scale beside it (the 'jet' map from low, blue, to high, red) and, for a flat
    map, "flat map" written across it."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    bar = max(side // 12, 12)
    image = Image.fromarray(colorize(photo, heatmap))
    scale = min((side - bar - 6) / image.width, side / image.height)  # up too: a small photo fills the square
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(image, (0, (side - image.height) // 2))
    ramp = (colormaps["jet"](np.linspace(1, 0, side - 2 * bar))[:, :3] * 255).astype(np.uint8)
    strip = Image.fromarray(np.repeat(ramp[:, None], bar // 2, axis=1))
    canvas.paste(strip, (side - bar // 2 - 2, bar))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(side // 24, 9))
    draw.text((side - 2, bar - 2), "high", fill="black", font=font, anchor="rb")
    draw.text((side - 2, side - bar + 2), "low", fill="black", font=font, anchor="rt")
    if is_flat(heatmap):
        big = _font(max(side // 9, 12))
        x, y = (side - bar) // 2, side // 2
        box = draw.textbbox((x, y), "flat map", font=big, anchor="mm")
        draw.rectangle((box[0] - 6, box[1] - 4, box[2] + 6, box[3] + 4), fill="white", outline="#c33", width=2)
        draw.text((x, y), "flat map", fill="#c33", font=big, anchor="mm")
    return canvas


def overlay_png(photo: np.ndarray, heatmap: np.ndarray, max_side: int = 480) -> bytes:
    """The overlay as PNG bytes, its longer side at most ``max_side`` (the server's data URI)."""
    image = Image.fromarray(colorize(photo, heatmap))
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def row_title(row: dict) -> str:
    """'label 0.973' or 'unknown (novelty 1.32) · nearest: label 0.61', the verdict a figure is titled with."""
    if row.get("unknown") and row.get("label") is None:
        nearest = row["top_k"][0]
        return f"unknown: none of these (novelty {row['novelty']:.2f}) · nearest {nearest['label']} " \
               f"{nearest['probability']:.3f}"
    text = f"{row['label']} {row['probability']:.3f}"
    if row.get("novelty") is not None:
        text += f" · novelty {row['novelty']:.2f} (known)"
    return text


def explained_class(row: dict, class_names: list[str]) -> int:
    """The class a row's heat map explains: its label, else (unknown) its nearest class."""
    return class_names.index(row["label"] if row.get("label") is not None else row["top_k"][0]["label"])


class Explainer:
    """Heat maps for a model's predictions, from its Keras model (loaded lazily, once, under a lock)."""

    def __init__(self, class_names: list[str], image_size: int, keras_model=None, path: str = "", forward=None):
        self.class_names, self.image_size, self.path = list(class_names), int(image_size), str(path or "")
        self._keras_model, self._cam, self._lock = keras_model, None, threading.Lock()
        self._forward = forward  # the frozen backbone on its converted engines (see GradCam)

    @classmethod
    def for_predictor(cls, predictor) -> "Explainer | None":
        """The explainer of a predictor: an ImageClassifier or a Keras model file's predictor (in memory), a
        ``.keras`` file answered by a converted engine (its Keras model loaded at the first heat map); None for
        an ONNX export."""
        model = getattr(predictor, "model_", None)
        if model is None:
            model = getattr(predictor, "keras_model", None)
        path = getattr(predictor, "path", "") or ""
        if model is None and not path.lower().endswith(".keras"):
            return None
        forward = getattr(predictor, "map_forward", None)
        return cls(predictor.class_names, predictor.image_size, model, path, forward() if forward else None)

    @property
    def method(self) -> str:
        return self._gradcam().method

    def _gradcam(self):
        with self._lock:
            if self._cam is None:
                from transferkit.models.gradcam import GradCam

                if self._keras_model is None:
                    from transferkit.log import logger
                    from transferkit.models import modelfile

                    logger.info(f"loading the Keras model of {self.path} for heat maps")
                    self._keras_model = modelfile.load(self.path).keras_model
                self._cam = GradCam(self._keras_model, self._forward)
            return self._cam

    def heatmaps(self, images: np.ndarray, classes) -> np.ndarray:
        """Heat maps (n, h, w), 0-1, of ``classes`` for RGB 0-255 images at the model's size."""
        cam = self._gradcam()
        with self._lock:  # one gradient pass at a time (the server's threads share the model)
            return cam.heatmaps(np.asarray(images, np.float32), np.asarray(classes))[0]

    def files(self, paths: list[str], classes) -> list[tuple[np.ndarray, np.ndarray]]:
        """(photo as decoded, its heat map) for each file, explaining ``classes``."""
        from transferkit.data.images import load_image, open_rgb

        photos = []
        for path in paths:
            photo = open_rgb(path, draft_size=MAX_PHOTO_SIDE)
            photo.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
            photos.append(np.asarray(photo))
        inputs = np.stack([load_image(p, self.image_size) for p in paths]) if paths else np.zeros((0,))
        maps = self.heatmaps(inputs, classes) if len(paths) else []
        return list(zip(photos, maps))


def write_explanations(rows: list[dict], explainer: Explainer, out_dir: str, pairs: list | None = None) -> list[str]:
    """One PNG per readable row in ``out_dir``: the photo and its overlay, titled with the verdict; each row
    gets ``explanation`` (the file's path). Names are the photos' stems (numbered where two would clash).
    ``pairs``: (photo, heat map) per readable row where already computed."""
    from transferkit.reports.plots import plot_explanation

    good = [r for r in rows if not r.get("error")]
    if not good:
        raise TransferkitError("no readable image to explain")
    os.makedirs(out_dir, exist_ok=True)
    if pairs is None:
        pairs = explainer.files([r["path"] for r in good], [explained_class(r, explainer.class_names) for r in good])
    used = {os.path.realpath(r["path"]) for r in rows}  # never overwrite a photo being explained
    written = []
    for row, (photo, heat) in zip(good, pairs):
        stem = os.path.splitext(os.path.basename(row["path"]))[0] or "image"
        name, n = f"{stem}.png", 1
        while name in used or os.path.realpath(os.path.join(out_dir, name)) in used:
            n += 1
            name = f"{stem}-{n}.png"
        used.add(name)
        row["explanation"] = plot_explanation(photo, colorize(photo, heat), row_title(row),
                                              os.path.join(out_dir, name), flat=is_flat(heat))
        written.append(row["explanation"])
    return written


def gallery_overlays(explainer: Explainer | None, entries: list[dict], thumb: int = 180) -> dict[str, str]:
    """{path: JPEG data URI of the overlay with its colour scale (``annotated_overlay``)} for the report's galleries (``entries``: path and the ``predicted``
    class name); empty without an explainer or images."""
    readable = [e for e in entries if os.path.isfile(e["path"])]
    if explainer is None or not readable:
        return {}
    pairs = explainer.files([e["path"] for e in readable],
                            [explainer.class_names.index(e["predicted"]) for e in readable])
    found = {}
    for entry, (photo, heat) in zip(readable, pairs):
        image = annotated_overlay(photo, heat, side=thumb * 2)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        found[entry["path"]] = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return found


def save_overlay(photo: np.ndarray, heatmap: np.ndarray, path: str) -> str:
    """The bare overlay as a PNG file, atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(colorize(photo, heatmap)).save(tmp, "PNG")
    return str(path)


def report_overlays(predictor_or_explainer, metrics: dict) -> dict[str, str]:
    """The heat maps of the report's two galleries (most confidently wrong, least confident right), or {} for a
    model without a Keras model (an ONNX export)."""
    explainer = predictor_or_explainer
    if not isinstance(explainer, Explainer):
        explainer = Explainer.for_predictor(predictor_or_explainer)
    entries = metrics.get("most_confident_errors", [])[:24] + metrics.get("least_confident_correct", [])[:12]
    return gallery_overlays(explainer, entries)
