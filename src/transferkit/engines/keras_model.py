"""A ``.keras`` classifier as a ``Predictor``, on any engine: Keras's compiled step, or the frozen model converted
once to onnxruntime / OpenVINO (checked against Keras fp32 on the first real batch; see ``engines.runtimes``)."""

from __future__ import annotations

import numpy as np

from transferkit.engines import runtimes
from transferkit.engines.keras_step import run_model, without_resize
from transferkit.engines.cached import classifier_key
from transferkit.models import modelfile
from transferkit.options import EngineOptions


class KerasPredictor:
    """A Keras classifier (raw RGB of any size -> probabilities) with its class names, run on ``engine``."""

    def __init__(self, keras_model, class_names: list[str], image_size: int, metadata: dict | None = None,
                 path: str = "", engine: EngineOptions | None = None, check_images: np.ndarray | None = None):
        self.keras_model, self.class_names, self.image_size = keras_model, list(class_names), int(image_size)
        self.metadata, self.path = dict(metadata or {}), str(path or "")
        self.engine_options = engine or EngineOptions()
        self.runtime, self.precision = runtimes.resolve(self.engine_options.runtime, self.engine_options.precision)
        self.check_images = check_images if runtimes.photo_like(check_images) else None
        self._engine = None

    @classmethod
    def from_file(cls, path: str, engine: EngineOptions | None = None) -> "KerasPredictor":
        loaded = modelfile.load(path)
        return cls(loaded.keras_model, loaded.class_names, loaded.image_size, loaded.metadata, loaded.path, engine,
                   loaded.check_images)

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of RGB 0-255 images (n, size, size, 3), through the compiled model or the
        chosen engine, converted and checked against Keras fp32 at the first call on real photos: the model
        file's stored validation photos, else the first batch that looks like photos (until then, and for a
        constant warm-up batch, Keras answers: an engine is never certified on synthetic input)."""
        if self.runtime == "keras":
            return run_model(self.keras_model, images)
        if self._engine is None:
            sample = self.check_images if self.check_images is not None else images
            if not runtimes.photo_like(sample):
                return run_model(self.keras_model, images)
            self.build_engine(sample)
        return self._engine(images)

    def build_engine(self, sample: np.ndarray) -> runtimes.Engine:
        """The chosen engine, converted and checked against Keras fp32 on ``sample`` (real photos), cached under
        the model file's content hash (a model without a file has no stable identity: not cached)."""
        if self._engine is None:
            key = classifier_key(self.path, self.image_size) if self.path else None
            fixed = without_resize(self.keras_model, self.image_size, call=False)
            self._engine = runtimes.build_engine(fixed, key, self.runtime, self.precision,
                                                 check_images=np.asarray(sample, np.float32),
                                                 n_classes=len(self.class_names))
        return self._engine
