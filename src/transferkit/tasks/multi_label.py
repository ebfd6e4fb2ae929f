"""The multi-label task: a photo shows any number of the labels at once ("fraise pourrie" and "grenade fraîche" in
one crate; "rayure", "tache", "moisissure" on one fruit), none included.

One sigmoid output per label on the same cached features (one-vs-rest logistic regression on the multi-depth
features, or a softmax-free Keras head), inside the one ``.keras`` file, so every export, the cached engine and
the server carry it. Each label has its own temperature (fitted on held-out logits by the binary log loss, kept where it lowers that
label's cross-fitted ECE, else 1) and its
own threshold, the one of maximum F1 on the validation split (recorded in the model file, read by every
predictor), and the novelty score is kept: the Mahalanobis distance to the nearest label's mean feature under the
shared Ledoit-Wolf covariance. Labels are an indicator matrix (photos x labels) from here to the metrics;
scikit-learn computes every metric (micro and macro F1, per-label precision / recall / F1 / AP, mAP, subset
accuracy, Hamming loss), so none is hand-rolled (fastai #2619 was a wrong multi-label metric).
"""

from __future__ import annotations

import numpy as np

from transferkit.tasks.base import Task

DEFAULT_THRESHOLD = 0.5
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.01), 2)  # the candidates of each label's threshold


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(z, np.float64), -60, 60)))


def binary_log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def best_thresholds(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each label's threshold of maximum F1 on (probs, y) over ``THRESHOLD_GRID`` (ties: the one nearest 0.5; a
    label without a positive keeps 0.5)."""
    from sklearn.metrics import f1_score

    out = np.full(y.shape[1], DEFAULT_THRESHOLD)
    for j in range(y.shape[1]):
        if not y[:, j].any():
            continue
        f1 = np.array([f1_score(y[:, j], probs[:, j] >= t, zero_division=0) for t in THRESHOLD_GRID])
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        out[j] = THRESHOLD_GRID[best[np.argmin(np.abs(THRESHOLD_GRID[best] - 0.5))]]
    return out


class MultiLabel(Task):
    """Any number of labels per photo: sigmoid outputs, an indicator matrix of labels, per-label thresholds."""

    name = "multi_label"
    loss = "binary_crossentropy"
    activation = "sigmoid"
    multi_label = True

    def __init__(self, thresholds=None):
        self.thresholds = None if thresholds is None else np.asarray(thresholds, np.float64)

    @classmethod
    def from_metadata(cls, metadata: dict) -> "MultiLabel":
        params = (metadata or {}).get("task_params") or {}
        names = metadata.get("class_names") or []
        found = params.get("thresholds") if isinstance(params, dict) else None
        if isinstance(found, dict) and names:
            return cls([float(found.get(n, DEFAULT_THRESHOLD)) for n in names])
        return cls()

    def record(self, class_names: list[str]) -> dict | None:
        if self.thresholds is None:
            return None
        return {"thresholds": {n: round(float(t), 4) for n, t in zip(class_names, self.thresholds)},
                "threshold_rule": "maximum F1 per label on the validation split"}

    def decision_thresholds(self, n: int) -> np.ndarray:
        """Each label's F1 threshold (0.5 for a model without them): what ``labels`` and the abstention use."""
        return self.thresholds if self.thresholds is not None and len(self.thresholds) == n else \
            np.full(n, DEFAULT_THRESHOLD)

    # ----- training -----
    def build_head(self, kind, feature_shape, n_classes, dropout=0.2, keep=None):
        from transferkit.models.heads import build_head

        return build_head(kind, feature_shape, n_classes, dropout=dropout, keep=keep, activation=self.activation)

    def fit_linear(self, x, y, keep, n_classes, class_weight, seed, n_features):
        """One-vs-rest L2 logistic regressions on standardised features (scikit-learn), each label's positives
        weighted by the balance of its own column (``class_weight``: ``balanced`` or None)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        from transferkit.models.heads import logistic_head

        scaler = StandardScaler().fit(x[:, :keep])
        xs = scaler.transform(x[:, :keep])
        coef, intercept = np.zeros((n_classes, keep)), np.zeros(n_classes)
        for j in range(n_classes):
            column = y[:, j]
            if column.min() == column.max():  # every row the same: a constant at the observed rate
                rate = np.clip(column.mean(), 1e-3, 1 - 1e-3)
                intercept[j] = np.log(rate / (1 - rate))
                continue
            model = LogisticRegression(C=1.0, max_iter=2000, class_weight=class_weight, random_state=seed)
            model.fit(xs, column)
            coef[j], intercept[j] = model.coef_[0], model.intercept_[0]

        def predict(features: np.ndarray) -> np.ndarray:
            return sigmoid(scaler.transform(features[:, :keep]) @ coef.T + intercept)

        return predict, lambda: logistic_head(n_features, keep, scaler.mean_, scaler.scale_ ** 2, coef, intercept,
                                              activation=self.activation)

    def fit_epochs(self, options, x_train, y_train, x_val, y_val, n_classes, weights, keep=None):
        from transferkit.training.head import train_softmax

        return train_softmax(options, x_train, y_train, x_val, y_val, n_classes, None, keep=keep, task=self)

    def score(self, probs, y):
        """(the share of right label cells at 0.5, as Keras's binary accuracy counts them, the mean binary log
        loss): what a head candidate, an epoch and the second stage are chosen by (the thresholds are fitted
        after the choice)."""
        y = np.asarray(y)
        return float(np.mean((probs >= 0.5) == (y > 0))), binary_log_loss(probs, y)

    def fine_tune_key(self, validation, probs, y):
        accuracy, loss = self.score(probs, y)
        return accuracy, -loss

    def class_weights(self, kind, y, n_classes):
        return "balanced" if kind == "balanced" else None  # per label, in the logistic fit (see fit_linear)

    def sample_weights(self, class_weights, y):
        return np.ones(len(y), np.float32)

    def calibrate(self, logits, y):
        """One temperature per label: the T in [0.5, 5] minimising its binary log loss on held-out logits."""
        from scipy.optimize import minimize_scalar

        logits, y = np.asarray(logits, np.float64), np.asarray(y, np.float64)
        out = np.ones(logits.shape[1])
        for j in range(logits.shape[1]):
            if y[:, j].min() == y[:, j].max():
                continue
            best = minimize_scalar(lambda lt: binary_log_loss(sigmoid(logits[:, j] / np.exp(lt)), y[:, j]),
                                   bounds=(np.log(0.5), np.log(5.0)), method="bounded")
            out[j] = float(np.exp(best.x))
        return out

    def probabilities(self, logits):
        return sigmoid(logits)

    def logits(self, probabilities):
        p = np.clip(np.asarray(probabilities, np.float64), 1e-300, 1 - 1e-16)
        return np.log(p) - np.log1p(-p)

    def fit_decision(self, probs, y) -> None:
        self.thresholds = best_thresholds(np.asarray(probs), np.asarray(y))

    # ----- answers -----
    def decide(self, paths, outputs, class_names, top_k, novelty=None, reject=True, *, conformal=None,
               coverage=None, max_error=None):
        """One row per image: ``labels`` (those over their thresholds, most probable first; possibly none),
        ``scores`` ({label: probability}), ``label`` / ``probability`` (the most probable of ``labels``, None
        when there is none), ``top_k`` (the most probable labels, over their threshold or not), and with a
        novelty score ``novelty`` / ``unknown`` (an unknown photo's ``labels`` are empty, ``reject=False``
        keeps them). With ``coverage`` (``conformal`` = metadata["conformal"]) also ``set``, the labels over
        their per-label conformal thresholds; with ``max_error``, ``abstain``."""
        from transferkit.models.novelty import split_outputs

        probs, scores = split_outputs(outputs, len(class_names))
        if not novelty:
            scores = None
        thresholds = self.decision_thresholds(len(class_names))
        k = max(1, min(int(top_k), len(class_names)))
        rows = []
        for i, (path, p) in enumerate(zip(paths, probs)):
            order = np.argsort(-p, kind="stable")
            labels = [class_names[j] for j in order if p[j] >= thresholds[j]]
            row = {"path": path, "labels": labels, "scores": {n: float(v) for n, v in zip(class_names, p)},
                   "label": labels[0] if labels else None,
                   "probability": float(p[order[0]]) if labels else None,
                   "top_k": [{"label": class_names[j], "probability": float(p[j])} for j in order[:k]]}
            if scores is not None:
                relative = float(scores[i])
                row |= {"novelty": round(relative, 4), "unknown": bool(relative > 1.0)}
                if row["unknown"] and reject:
                    row |= {"labels": [], "label": None, "probability": None}
            rows.append(row)
        if coverage is not None or max_error is not None:
            self._add_guarantees(rows, probs, class_names, conformal, coverage, max_error)
        return rows

    def _add_guarantees(self, rows, probs, class_names, conformal, coverage, max_error) -> None:
        """Each row's conformal ``set`` (the labels over their per-label conformal threshold at ``coverage``,
        most probable first) and/or ``abstain`` (the answer's confidence under the cut-off certified for
        ``max_error``; see ``models.conformal_labels``)."""
        from transferkit.models import conformal as cp
        from transferkit.models import conformal_labels as cl

        if coverage is not None:
            thresholds, _ = cl.label_thresholds(conformal, class_names, coverage)
            for row, members in zip(rows, cl.label_sets(probs, thresholds)):
                row["set"] = [class_names[j] for j in members]
        if max_error is not None:
            cut = cp.answer_threshold(conformal["risk"], max_error)
            confidence = cl.set_confidence(probs, self.decision_thresholds(len(class_names)))
            for row, c in zip(rows, confidence):
                row["abstain"] = bool(float(c) < cut)

    # ----- evaluation -----
    def metrics(self, y_true, probs, class_names, paths=None, skipped=None):
        from transferkit.reports.multilabel import multilabel_metrics

        return multilabel_metrics(np.asarray(y_true), np.asarray(probs), class_names,
                                  self.decision_thresholds(len(class_names)), paths, skipped)

    def text_report(self, metrics):
        from transferkit.reports.multilabel import text_report

        return text_report(metrics)

    def report_parts(self, metrics, out):
        from transferkit.reports.multilabel import report_parts

        return report_parts(metrics, out)

    # ----- trust and audit -----
    def fit_trust(self, head, train, val, n_classes, keep_known, groups=None, novelty_dim=None, held_out=None):
        """Per-label temperatures (binary log loss on ``held_out`` (logits, labels) of photos the head never saw;
        default: validation), each kept only where it lowers that label's cross-fitted ECE (``novelty.
        cross_fitted_calibration``, the single-label rule), and the novelty statistics: the distance to the
        nearest label's mean training feature under the shared covariance around the overall mean; the
        threshold keeps ``keep_known`` of the validation and out-of-fold training scores."""
        from transferkit.engines.keras_step import run_model
        from transferkit.models import novelty

        (x_train, y_train), (x_val, y_val) = train, val
        pool = (lambda x: x[:, :novelty_dim]) if x_train.ndim == 2 else (lambda x: x.mean(axis=(1, 2)))
        if held_out is None:
            held_out = (run_model(novelty.logit_model(head), x_val), y_val)
        calibration = self._calibration(*held_out)
        whitening, centers = label_statistics(pool(x_train), y_train)
        scores = novelty.mahalanobis(pool(x_val), whitening, centers)
        known = np.concatenate([scores, _out_of_fold(pool(x_train), y_train, groups)])
        threshold = float(np.quantile(known, keep_known, method="higher"))
        novelty.set_trust(head, 1.0, whitening, centers, threshold)
        temperatures = np.asarray(calibration["temperatures"], np.float64)
        head.get_layer("temperature").set_weights([np.diag(1.0 / temperatures).astype(np.float32)])
        return {"method": "mahalanobis", "covariance": "shared, Ledoit-Wolf; centres: each label's mean",
                "threshold": threshold, "keep_known": keep_known,
                "validation_kept": float((scores <= threshold).mean()), "temperature": None, **calibration,
                "fitted_on": {"train": int(len(y_train)), "validation": int(len(y_val)),
                              "threshold_scores": int(len(known)), "temperature_rows": int(len(held_out[1])),
                              "temperature_out_of_fold": int(len(held_out[1]) - len(y_val))}}

    def _calibration(self, logits, y) -> dict:
        """Each label's temperature, kept where it lowers that label's cross-fitted ECE (else 1);
        ``ece_before`` / ``ece_after`` / ``ece_fitted``: every label cell at T = 1 / as kept / as fitted."""
        from transferkit.models.novelty import cross_fitted_calibration, expected_calibration_error

        y, logits = np.asarray(y, np.float64), np.asarray(logits, np.float64)
        cells = lambda p, truth: expected_calibration_error(*self.calibration_cells(p, truth))  # noqa: E731
        per_label = lambda p, truth: np.array([cells(p[:, [j]], truth[:, [j]])  # noqa: E731
                                               for j in range(truth.shape[1])])
        found = cross_fitted_calibration(logits, y, self.calibrate, lambda z, t: sigmoid(z / t), per_label)
        fitted, kept = np.asarray(found["fitted"], np.float64), np.asarray(found["kept"], bool)
        plain = sigmoid(logits)
        pooled = plain if found["pooled"] is None else found["pooled"]
        n_kept = int(kept.sum())
        return {"temperatures": [round(float(t), 4) for t in np.where(kept, fitted, 1.0)],
                "temperatures_fitted": [round(float(t), 4) for t in fitted], "temperatures_kept": kept.tolist(),
                "temperature_kept": bool(n_kept), "ece_before": round(cells(plain, y), 4),
                "ece_after": round(cells(np.where(kept, pooled, plain), y), 4),
                "ece_fitted": round(cells(pooled, y), 4),
                "temperature_reason": f"{n_kept} of {len(kept)} labels keep their fitted T (it lowers their "
                                      f"cross-fitted held-out ECE on {len(y)} photos); the others keep T = 1"}

    def calibration_cells(self, probs, y):
        """Every (photo, label) cell as a two-class prediction: the calibration error of the label cells."""
        p = np.asarray(probs, np.float64).ravel()
        return np.stack([1 - p, p], axis=1), np.asarray(y, np.int64).ravel()

    def audit(self, x, y, paths, class_names):
        from transferkit.training.audit import audit_multilabel

        return audit_multilabel(x, y, paths, class_names)


def _label_means(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each label's mean feature (a label without rows here: the overall mean)."""
    overall = x.mean(axis=0)
    return np.stack([x[y[:, j] > 0].mean(axis=0) if y[:, j].any() else overall for j in range(y.shape[1])])


def label_statistics(features: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whitening W, whitened label means): the shared Ledoit-Wolf covariance around the overall mean (a photo
    has several labels, so no class centres it), as ``novelty.fit_mahalanobis`` computes it."""
    from transferkit.models.novelty import SharedCovariance

    x = np.asarray(features, np.float64).reshape(len(features), -1)
    whitening = SharedCovariance(x, np.zeros(len(x), np.int64), 1).inverse_sqrt()
    return whitening.astype(np.float32), (_label_means(x, y) @ whitening.T).astype(np.float32)


def _out_of_fold(x: np.ndarray, y: np.ndarray, groups, folds: int = 5) -> np.ndarray:
    """Novelty scores of training rows under statistics fitted without their image (grouped folds)."""
    from sklearn.model_selection import GroupKFold

    from transferkit.models.novelty import SharedCovariance, nearest_distance

    x = np.asarray(x, np.float64)
    groups = np.arange(len(x)) if groups is None else np.asarray(groups)
    k = int(min(folds, len(np.unique(groups))))
    if k < 2:
        return np.zeros(0)
    out = []
    for fit_rows, held in GroupKFold(k).split(x, groups=groups):
        shared = SharedCovariance(x[fit_rows], np.zeros(len(fit_rows), np.int64), 1)
        out.append(nearest_distance(shared, _label_means(x[fit_rows], y[fit_rows]), x[held]))
    return np.concatenate(out)
