"""Trust: calibrated probabilities and a novelty score, both inside the model, so every engine and export gives
the same "none of these".

Softmax must pick a class: a photo of a shoe shown to a fruit model gets "fraise pourrie 0.97". Measured in
``benchmarks/unknown.py`` (frozen EfficientNet-Lite0, 8 classes of scikit-image photo crops, 3 repeats), AUROC of
unknown vs known test photos for held-out classes / other domains: top probability 0.939 / 0.949, class-conditional
Mahalanobis with a shared Ledoit-Wolf covariance 0.964 / 0.945, mean cosine to the 5 nearest training features
0.979 / 0.950. With 5 photos per class: 0.834, 0.932 and 0.968 on held-out classes; unshrunk Mahalanobis collapses
to 0.565 there, which is why the covariance is shrunk. Mahalanobis is the score built here: fixed size (one
whitening matrix), and made of built-in layers (nearest-neighbour top-k is not one), at about 0.015 AUROC below
kNN on held-out classes, within 2 standard deviations of the repeats.

The score is computed by plain Keras layers appended to the head (a whitening Dense, the squared distance to each
whitened class mean, the minimum over classes), so ``.keras``, ONNX, TFLite and SavedModel carry it. The model's
output is ``[probabilities..., novelty / threshold]`` (n, classes + 1); :func:`split_outputs` is the one place that
reads it. (Keras is imported inside the functions that build layers: the readers of outputs run without it.)
The temperature (fitted on held-out logits, out-of-fold training photos and validation, by minimising the log
loss) divides the logits before the softmax, and is kept only where it lowers their cross-fitted ECE (else T = 1:
on 24 validation photos a fitted T of 3.08 raised ECE 0.160 -> 0.184); it and the statistics are refitted after
fine-tuning (the backbone's features moved). The threshold (metadata) keeps
``keep_known`` of the validation images.

Photos a reviewer labelled ``unknown`` (``train --add``) make the score a likelihood ratio against a "none of
these" class: minus the squared distance to their mean, in the same layers (||z||^2 cancels). Measured in
``benchmarks/unknown_labels.py`` (3 classes, 6 or 12 such photos, 3 seeds): AUROC on other domains 0.985-0.990 ->
0.996-0.998, their unknown rate 86-92 % -> 97-100 %, false unknowns 4.4 -> 1.9-3.0 %.
"""

from __future__ import annotations

import math

import numpy as np

NOVELTY = "novelty"  # the name of the score layer; metadata["novelty"] describes it


TEMPERATURES = (0.5, 5.0)  # the search range: on a validation split the head separates perfectly, the log loss
# keeps falling as T -> 0 (every probability pushed to 0 or 1); the benchmark's fitted T is 0.6-0.64


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in ``TEMPERATURES`` minimising the mean log loss of softmax(logits / T) (searched on
    log T)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, np.float64)

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_p[np.arange(len(labels)), labels].mean())

    best = minimize_scalar(nll, bounds=tuple(math.log(t) for t in TEMPERATURES), method="bounded")
    return float(math.exp(best.x))


CALIBRATION_FOLDS = 5  # the cross-fitting of the keep-or-not rule (see cross_fitted_calibration)


def softmax_logits(probabilities: np.ndarray) -> np.ndarray:
    """Logits (up to a per-row constant) of float64 softmax probabilities, exact down to 1e-300 (a head's
    NumPy ``predict`` gives probabilities; ``logits_of`` clips at 1e-12, too near for a confident head)."""
    return np.log(np.clip(np.asarray(probabilities, np.float64), 1e-300, 1.0))


def cross_fitted_calibration(logits: np.ndarray, labels: np.ndarray, fit, calibrated, errors,
                             folds: int = CALIBRATION_FOLDS) -> dict:
    """The keep-or-not rule of a temperature, the same for every task: ``fit(logits, labels)`` -> T (a float, or
    one per label), ``calibrated(logits, T)`` -> probabilities, ``errors(probabilities, labels)`` -> ECE (a float,
    or one per label). T is fitted on all held-out rows; the ECE it would give is measured by cross-fitting
    (each fold calibrated by a T fitted on the other folds, the calibrated rows pooled), against the ECE at
    T = 1 on the same rows; T is kept where that is strictly lower. Measured on 24 validation photos (issue 30)
    a log-loss T of 3.08 raised validation ECE from 0.160 to 0.184: the rule keeps T = 1 there. Returns
    {"fitted", "before", "fitted_ece" (None: too few rows to cross-fit), "pooled" (the cross-fitted
    probabilities), "kept" (bool or one per label)}."""
    from sklearn.model_selection import KFold

    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    fitted = fit(logits, labels)
    before = errors(calibrated(logits, np.ones_like(np.asarray(fitted, np.float64))), labels)
    k = int(min(folds, len(logits)))
    if k < 2:
        return {"fitted": fitted, "before": before, "fitted_ece": None, "pooled": None,
                "kept": np.zeros_like(np.asarray(before), bool)}
    pooled = np.zeros(logits.shape, np.float64)
    for fit_rows, held in KFold(k, shuffle=True, random_state=0).split(logits):
        pooled[held] = calibrated(logits[held], fit(logits[fit_rows], labels[fit_rows]))
    after = errors(pooled, labels)
    return {"fitted": fitted, "before": before, "fitted_ece": after, "pooled": pooled,
            "kept": np.asarray(after) < np.asarray(before)}


def temperature_reason(kept: bool, fitted: float, before: float, after: float | None, rows: int) -> str:
    """Why a temperature was kept or not, in a sentence (the report's card and the model card show it)."""
    if after is None:
        return f"T = 1 kept: {rows} held-out photos are too few to measure a fitted T (fitted {fitted:.3g})"
    if kept:
        return (f"T = {fitted:.3g} kept: it lowers held-out ECE {before:.3f} -> {after:.3f} "
                f"(cross-fitted on {rows} held-out photos)")
    return (f"T = 1 kept: the fitted T = {fitted:.3g} does not lower held-out ECE ({before:.3f} -> {after:.3f}, "
            f"cross-fitted on {rows} held-out photos)")


class SharedCovariance:
    """The within-class covariance shared by all classes, shrunk by Ledoit-Wolf so that a few photos per class
    still give a well-conditioned estimate: S = (1 - shrinkage) C + shrinkage mu I, with C the empirical
    covariance of the class-centred rows and mu its mean variance.

    S is never formed. C has rank at most n (rows), far below the d = 1280 feature dimensions of a small set, so
    S = floor I + V diag(spectrum) V' (floor = shrinkage mu, spectrum = C's nonzero eigenvalues times
    1 - shrinkage), with V from the eigendecomposition of the smaller Gram matrix (n x n or d x d); S's inverse
    and inverse square root are the same sum with each eigenvalue raised to -1 or -1/2. The shrinkage is
    Ledoit-Wolf's, computed as scikit-learn's ``ledoit_wolf_shrinkage`` does but from that Gram matrix (equal
    to 1e-12; tested). Measured (400 photos, Lite0, 2 cores): ``fit_trust`` took 1.6 s through scikit-learn's
    d x d covariance, a d x d Cholesky solve per out-of-fold fit and one d x d eigh; 0.3 s this way."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, n_classes: int):
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        self.means = np.stack([x[labels == c].mean(axis=0) for c in range(n_classes)])
        centered = x - self.means[labels]
        centered = centered - centered.mean(axis=0)  # ~0 already; as ledoit_wolf centres
        n, d = centered.shape
        gram = centered @ centered.T if n <= d else centered.T @ centered
        squares = centered ** 2
        trace = squares.sum() / n
        mu = trace / d
        beta_ = float((squares.sum(axis=1) ** 2).sum())  # the sum of <X2', X2>
        delta_ = float((gram ** 2).sum()) / n ** 2  # the sum of <X', X> squared, /n^2
        beta = (beta_ / n - delta_) / (d * n)
        delta = (delta_ - 2.0 * mu * trace + d * mu ** 2) / d
        beta = min(beta, delta)
        self.shrinkage = 0.0 if beta == 0 else float(beta / delta)
        values, vectors = np.linalg.eigh(gram)
        keep = values > max(values.max(initial=0.0), 0.0) * 1e-10
        values, vectors = values[keep], vectors[:, keep]
        if n <= d:  # right singular vectors from the left ones
            vectors = centered.T @ vectors / np.sqrt(values)
        self.vectors = vectors  # (d, r), orthonormal columns
        self.spectrum = (1.0 - self.shrinkage) * values / n  # C's nonzero eigenvalues, shrunk
        self.floor = max(self.shrinkage * mu, 1e-12)  # S's eigenvalue off V's span

    def _apply(self, power: float, rows: np.ndarray) -> np.ndarray:
        """``rows`` (m, d) times S ** power."""
        scale = (self.floor + self.spectrum) ** power - self.floor ** power
        return self.floor ** power * rows + ((rows @ self.vectors) * scale) @ self.vectors.T

    def solve(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` times S's inverse."""
        return self._apply(-1.0, np.asarray(rows, np.float64))

    def inverse_sqrt(self) -> np.ndarray:
        """S ** -1/2 (d, d), symmetric."""
        return self._apply(-0.5, np.eye(self.vectors.shape[0]))

    def covariance(self) -> np.ndarray:
        """S itself (d, d), for tests."""
        return self._apply(1.0, np.eye(self.vectors.shape[0]))


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(whitening W, whitened class means M) from the *training* features: the squared Mahalanobis distance of x
    to class c is ||W x - M_c||^2. W is the symmetric inverse square root of the shrunk covariance: the model
    computes W x in float32, and a triangular W (Cholesky) has entries large enough that its float32 novelty
    scores moved by 70 % against float64."""
    shared = SharedCovariance(features, labels, n_classes)
    whitening = shared.inverse_sqrt()
    return whitening.astype(np.float32), (shared.means @ whitening.T).astype(np.float32)


def _held_out_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray, n_classes: int,
                     background: np.ndarray | None = None) -> np.ndarray:
    """The novelty score of ``x_held`` under statistics fitted on the other rows (their own Ledoit-Wolf
    shrinkage: a fold has fewer rows, hence more shrinkage; the whole set's made the held-out scores too large on
    5 photos per class, and the threshold with them), in float64: never stored in a model. ``background`` (1, d):
    the mean feature of photos of none of the classes, whose squared distance is subtracted."""
    shared = SharedCovariance(x_fit, y_fit, n_classes)
    found = nearest_distance(shared, shared.means, x_held)
    return found if background is None else found - nearest_distance(shared, background, x_held)


def nearest_distance(shared: SharedCovariance, means: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The squared Mahalanobis distance under ``shared`` of each row of ``x`` to the nearest of ``means``, in
    float64 (held-out scores; multi-label passes its labels' means)."""
    solved = shared.solve(np.concatenate([x, means]))
    sx, sm = solved[: len(x)], solved[len(x):]
    # (x - m)' S^-1 (x - m) = x'S^-1 x - 2 m'S^-1 x + m'S^-1 m, in float64 (no cancellation at these magnitudes)
    distances = (x * sx).sum(1, keepdims=True) - 2 * x @ sm.T + (means * sm).sum(1)
    return distances.min(axis=1)


def background_scores(features: np.ndarray, whitening: np.ndarray, centers: np.ndarray,
                      background: np.ndarray) -> np.ndarray:
    """The novelty score against a background class in NumPy: :func:`mahalanobis` minus the squared distance
    of the whitened features to ``background`` (the whitened mean of photos of none of the classes), in float64
    (the model adds the threshold's offset)."""
    z = np.asarray(features, np.float64).reshape(len(features), -1) @ whitening.T.astype(np.float64)
    return mahalanobis(features, whitening, centers) - ((z - np.asarray(background, np.float64)) ** 2).sum(axis=1)


def mahalanobis(features: np.ndarray, whitening: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """The novelty score in NumPy (the model's layers compute the same): min over classes of the squared
    Mahalanobis distance."""
    z = np.asarray(features, np.float64).reshape(len(features), -1) @ whitening.T.astype(np.float64)
    m = centers.astype(np.float64)
    return ((z * z).sum(axis=1, keepdims=True) - 2 * z @ m.T + (m * m).sum(axis=1)).min(axis=1)


def logits_of(probabilities: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant (softmax is invariant to it)."""
    return np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0))


def trusted_head(head: keras.Model, novelty_dim: int | None = None, activation: str = "softmax") -> keras.Model:
    """``head`` (features -> softmax) rebuilt as features -> [softmax(logits / T), novelty / threshold] (the
    task's ``activation``: sigmoid for multi-label, each label's own T on the diagonal of T's layer), sharing
    the head's trained layers; the score branch reads the features (pooled first where the head takes a feature
    map). The temperature, statistics and threshold are untrained weights, neutral here (T = 1, identity
    whitening, zero means, threshold 1): :func:`fit_trust` fits them, and fits them again after fine-tuning."""
    import keras
    from keras import layers

    final = head.get_layer("probabilities")
    inputs = keras.Input(shape=tuple(head.input.shape[1:]), name="features")
    hidden = keras.Model(head.input, final.input, name="head_body")(inputs)
    logits_layer = layers.Dense(final.units, name="logits")
    logits = logits_layer(hidden)
    logits_layer.set_weights(final.get_weights())
    scale = layers.Dense(final.units, use_bias=False, trainable=False, name="temperature")
    probabilities = (layers.Softmax(name="calibrated") if activation == "softmax"
                     else layers.Activation(activation, name="calibrated"))(scale(logits))
    pooled = inputs if len(inputs.shape) == 2 else layers.GlobalAveragePooling2D(name="novelty_pool")(inputs)
    if novelty_dim and novelty_dim < pooled.shape[-1]:  # multi-depth features: the score reads the final ones
        pooled = layers.Reshape((novelty_dim,), name="novelty_final")(
            layers.Cropping1D((0, int(pooled.shape[-1]) - novelty_dim), name="novelty_crop")(
                layers.Reshape((int(pooled.shape[-1]), 1), name="novelty_columns")(pooled)))
    dim = int(pooled.shape[-1])
    score = _distance_layers(pooled, dim, final.units)
    trusted = keras.Model(inputs, layers.Concatenate(name="with_novelty")([probabilities, score]), name="head")
    set_trust(trusted, 1.0, np.eye(dim, dtype=np.float32), np.zeros((final.units, dim), np.float32), 1.0)
    return trusted


def set_trust(head: keras.Model, temperature: float, whitening: np.ndarray, centers: np.ndarray,
              threshold: float, background: np.ndarray | None = None, offset: float = 0.0) -> None:
    """Write a temperature, novelty statistics and the threshold into a trusted head's (untrained) layers: the
    score comes out divided by the threshold (above 1 is unknown; and of the probabilities' order of magnitude,
    which int8 exports need, their concatenated output sharing one quantization scale). ``background`` (d,): the
    whitened mean of photos of none of the classes; the score becomes min_c ||z - M_c||^2 - ||z - background||^2
    + ``offset`` (:func:`background_scores`): ||z||^2 cancels, so the squares' kernel is zero and the class
    terms move, in the same layers."""
    n = centers.shape[0]
    head.get_layer(NOVELTY).set_weights([np.full((1, 1), -1.0 / threshold, np.float32)])
    head.get_layer("temperature").set_weights([np.eye(n, dtype=np.float32) / np.float32(temperature)])
    head.get_layer("novelty_whiten").set_weights([whitening.T.astype(np.float32)])
    units = head.get_layer("novelty_norm").units  # n; 1 in model files from before the equal-shape fix
    squares = np.ones if background is None else np.zeros
    head.get_layer("novelty_norm").set_weights([squares((whitening.shape[0], units), np.float32)])
    norms = (centers.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    if background is None:
        head.get_layer("novelty_cross").set_weights([(-2.0 * centers.T).astype(np.float32), norms])
        return
    m, b = centers.astype(np.float64), np.asarray(background, np.float64).reshape(1, -1)
    bias = (m ** 2).sum(axis=1) - (b ** 2).sum() + offset
    head.get_layer("novelty_cross").set_weights([(-2.0 * (m - b).T).astype(np.float32), bias.astype(np.float32)])


def reset_temperature(head: keras.Model) -> None:
    """T = 1: fine-tuning trains the plain softmax (the temperature is fitted again afterwards)."""
    n = head.get_layer("temperature").units
    head.get_layer("temperature").set_weights([np.eye(n, dtype=np.float32)])


def logit_model(head: keras.Model) -> keras.Model:
    """features -> logits (before the temperature) of a trusted head."""
    import keras

    return keras.Model(head.input, head.get_layer("logits").output)


def fit_trust(head: keras.Model, train: tuple, val: tuple, n_classes: int, keep_known: float,
              groups: np.ndarray | None = None, novelty_dim: int | None = None,
              held_out: tuple | None = None, negatives: np.ndarray | None = None) -> dict:
    """Fit the temperature and the novelty statistics (on training features only) of a trusted head in place.
    The temperature: on ``held_out`` (logits, labels) of photos the head never saw (out-of-fold training photos
    and validation, see ``training.select.out_of_fold_logits``; default: validation alone), kept only where it
    lowers their ECE (:func:`cross_fitted_calibration`), else T = 1. The threshold keeps ``keep_known`` of the
    known images' scores: the validation images', and, so that a small validation split still gives a steady
    quantile, out-of-fold scores of the training images (``groups``: the image of each row, so augmented views
    of one image stay in one fold). ``negatives``: features of photos of none of the classes (``train --add``'s
    ``unknown`` rows): the score becomes a likelihood ratio against them (:func:`_fit_background`). Returns
    metadata["novelty"]."""
    from transferkit.engines.keras_step import run_model

    (x_train, y_train), (x_val, y_val) = train, val
    pool = (lambda x: x[:, :novelty_dim]) if x_train.ndim == 2 else (lambda x: x.mean(axis=(1, 2)))
    if held_out is None:
        held_out = (run_model(logit_model(head), x_val), y_val)
    calibration = _softmax_calibration(*held_out)
    whitening, centers = fit_mahalanobis(pool(x_train), y_train, n_classes)
    scores = mahalanobis(pool(x_val), whitening, centers)
    known = np.concatenate([scores, _out_of_fold(pool(x_train), y_train, n_classes, groups)])
    threshold = float(np.quantile(known, keep_known, method="higher"))
    background, offset, found = None, 0.0, {}
    if negatives is not None and len(negatives):
        background, offset, scores, found = _fit_background(pool(x_train), y_train, pool(x_val), pool(negatives),
                                                            (whitening, centers), keep_known, groups, threshold)
    set_trust(head, calibration["temperature"], whitening, centers, threshold, background, offset)
    return {"method": "mahalanobis", "covariance": "shared, Ledoit-Wolf", "threshold": threshold,
            "keep_known": keep_known, "validation_kept": float((scores <= threshold).mean()), **calibration,
            "fitted_on": {"train": int(len(y_train)), "validation": int(len(y_val)),
                          "threshold_scores": int(len(known)), "temperature_rows": int(len(held_out[1])),
                          "temperature_out_of_fold": int(len(held_out[1]) - len(y_val))}, **found}


def _fit_background(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, negatives: np.ndarray,
                    statistics: tuple, keep_known: float, groups: np.ndarray | None, threshold: float):
    """The score against a background class: the class score minus the squared distance to the ``negatives``'
    mean (a likelihood ratio against "none of these", same shared covariance), its own cut keeping
    ``keep_known`` of the known held-out scores (validation, out-of-fold training rows), shifted by ``offset``
    so that the cut falls on the class score's ``threshold`` (positive, as the layer and the metadata need: the
    background score is at most the class score, so the offset is >= 0). Measured in
    ``benchmarks/unknown_labels.py``: AUROC on other domains 0.985-0.990 -> 0.996-0.998, false unknowns 4.4 ->
    1.9-3.0 %. Returns (whitened mean, offset, the validation scores shifted, metadata["novelty"]'s entries)."""
    whitening, centers = statistics
    mean = np.asarray(negatives, np.float64).mean(axis=0, keepdims=True)
    background = (mean @ whitening.T.astype(np.float64))[0]
    scores = background_scores(x_val, whitening, centers, background)
    known = np.concatenate([scores, _out_of_fold(x_train, y_train, len(centers), groups, background=mean)])
    cut = float(np.quantile(known, keep_known, method="higher"))
    offset = threshold - cut
    return background, offset, scores + offset, {"background": {"photos": int(len(negatives)), "cut": cut,
                                                                "offset": offset}}


def _softmax_calibration(logits: np.ndarray, labels: np.ndarray) -> dict:
    """The single-label temperature by :func:`cross_fitted_calibration`: metadata["novelty"]'s calibration
    entries (``ece_after``: the ECE of what is kept, cross-fitted; ``ece_fitted``: that of the fitted T)."""
    from scipy.special import softmax

    labels = np.asarray(labels, np.int64)
    found = cross_fitted_calibration(logits, labels, fit_temperature,
                                     lambda z, t: softmax(z / t, axis=1), expected_calibration_error)
    fitted, before, after, kept = found["fitted"], found["before"], found["fitted_ece"], bool(found["kept"])
    return {"temperature": round(fitted, 4) if kept else 1.0, "temperature_fitted": round(fitted, 4),
            "temperature_kept": kept, "ece_before": round(before, 4),
            "ece_after": round(after if kept else before, 4),
            "ece_fitted": None if after is None else round(after, 4),
            "temperature_reason": temperature_reason(kept, fitted, before, after, len(labels))}


def _out_of_fold(x: np.ndarray, y: np.ndarray, n_classes: int, groups: np.ndarray | None, folds: int = 5,
                 background: np.ndarray | None = None):
    """Scores of training rows by statistics fitted without their image (stratified, grouped folds; a fold
    that would leave a class without images is skipped); ``background``: see :func:`_held_out_scores`."""
    from sklearn.model_selection import StratifiedGroupKFold

    x = np.asarray(x, np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    n_folds = min(folds, int(np.bincount(y, minlength=n_classes).min()))
    if n_folds < 2:
        return np.zeros(0)
    out = []
    for fit_rows, held in StratifiedGroupKFold(n_folds, shuffle=True, random_state=0).split(x, y, groups):
        if len(np.unique(y[fit_rows])) == n_classes:
            out.append(_held_out_scores(x[fit_rows], y[fit_rows], x[held], n_classes, background))
    return np.concatenate(out) if out else np.zeros(0)


def _distance_layers(x, dim: int, n_classes: int):
    """min_c ||W x - M_c||^2 = min_c (||z||^2 - 2 z.M_c + ||M_c||^2), z = W x, over the threshold, in built-in
    layers only (their weights are set by :func:`set_trust`)."""
    from keras import layers

    z = layers.Dense(dim, use_bias=False, trainable=False, name="novelty_whiten")(x)
    # ||z||^2 repeated once per class (a ones kernel (dim, classes)), so that the Add below adds equal shapes:
    # adding a (n, 1) column to the (n, classes) products, TensorFlow's oneDNN fusion of MatMul + BiasAdd + Add
    # broadcast the first row's norm to every row (novelty off by up to 70 % in Keras, right in every export)
    norm = layers.Dense(n_classes, use_bias=False, trainable=False, name="novelty_norm")(
        layers.Multiply(name="novelty_square")([z, z]))
    dots = layers.Dense(n_classes, trainable=False, name="novelty_cross")(z)
    distances = layers.Add(name="novelty_distances")([dots, norm])
    negated = layers.Rescaling(-1.0, name="novelty_negate")(layers.Reshape((n_classes, 1))(distances))
    nearest = layers.GlobalMaxPooling1D(name="novelty_nearest")(negated)
    return layers.Dense(1, use_bias=False, trainable=False, name=NOVELTY)(nearest)  # x (-1 / threshold)


def novelty_dim(head: keras.Model) -> int | None:
    """How many of the head's input features its novelty score reads (None: all of them)."""
    try:
        return int(head.get_layer("novelty_final").output.shape[-1])
    except ValueError:
        return None


def has_trust(model: keras.Model) -> bool:
    """True for a classifier whose head carries the temperature and novelty layers."""
    try:
        model.get_layer("head").get_layer("temperature")
        return True
    except (ValueError, AttributeError):
        return False


def probability_view(model: keras.Model, n_classes: int) -> keras.Model:
    """The same layers with the probabilities only (what fine-tuning trains on)."""
    import keras

    if model.output.shape[-1] != n_classes + 1:
        return model
    return keras.Model(model.input, model.output[:, :n_classes], name="probabilities_view")


def feature_view(model: keras.Model) -> keras.Model:
    """image -> the features the head reads, sharing the classifier's (possibly fine-tuned) layers."""
    import keras

    head = model.get_layer("head")
    return keras.Model(model.input, head._inbound_nodes[0].input_tensors[0], name="feature_view")


def split_outputs(outputs: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities (n, classes), novelty (n,) or None) from a model's output; the novelty is relative to the
    model's threshold (above 1: unknown)."""
    outputs = np.asarray(outputs, np.float32)
    if outputs.shape[-1] == n_classes + 1:
        return outputs[:, :n_classes], outputs[:, n_classes]
    return outputs, None


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the |accuracy - confidence| gap averaged over equal-width confidence bins, weighted by their size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    gap = sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).sum()
              for b in range(bins) if (which == b).any())
    return float(gap / max(len(labels), 1))
