"""The single-label task: each photo is exactly one of the classes (softmax over them), the first task.

Everything here was spread over eight modules before (the loss strings of the head fit and fine-tuning, the
argmax of the head choice, the rows of predict and the server, the temperature, the metrics, the report's
confusion matrices); it is the same arithmetic, in one place. Keras, SciPy and scikit-learn are imported inside
the methods: ``decide`` runs on the cached predict path, which imports none of them (tested in a subprocess).
"""

from __future__ import annotations

import numpy as np

from transferkit.tasks.base import Task


def mean_log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of predicted ``probs`` (the tie-breaker of the kept epoch)."""
    probs = np.clip(probs, 1e-7, 1.0)
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def _add_guarantees(rows, probs, class_names, conformal, coverage, max_error) -> None:
    """Each row's conformal ``set`` (labels, most probable first) and/or ``abstain`` (its top probability under
    the cut-off certified for ``max_error``)."""
    from transferkit.models import conformal as cp

    if coverage is not None:
        for row, members in zip(rows, cp.prediction_sets(probs, conformal, coverage)):
            row["set"] = [class_names[j] for j in members]
    if max_error is not None:
        cut = cp.answer_threshold(conformal["risk"], max_error)
        for row, p in zip(rows, probs):
            row["abstain"] = bool(float(p.max()) < cut)


class SingleLabel(Task):
    """One label per photo: softmax outputs, integer labels, accuracy and log loss, top-k rows."""

    name = "single_label"
    loss = "sparse_categorical_crossentropy"
    activation = "softmax"

    # ----- training -----
    def build_head(self, kind, feature_shape, n_classes, dropout=0.2, keep=None):
        from transferkit.models.heads import build_head

        return build_head(kind, feature_shape, n_classes, dropout=dropout, keep=keep, activation=self.activation)

    def fit_linear(self, x, y, keep, n_classes, class_weight, seed, n_features):
        """An L2 logistic regression on standardised features (scikit-learn): (features -> probabilities in
        NumPy, () -> the same as a Keras head on ``n_features``)."""
        from scipy.special import softmax
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        from transferkit.models.heads import logistic_head

        scaler = StandardScaler().fit(x[:, :keep])
        model = LogisticRegression(C=1.0, max_iter=2000, class_weight=class_weight, random_state=seed)
        model.fit(scaler.transform(x[:, :keep]), y)
        coef, intercept = np.zeros((n_classes, keep)), np.zeros(n_classes)
        if n_classes == 2 and len(model.classes_) == 2:  # binary: sigmoid(w.x + b) = softmax([0, w.x + b])
            coef[1], intercept[1] = model.coef_[0], model.intercept_[0]
        else:
            coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_  # every class has rows

        def predict(features: np.ndarray) -> np.ndarray:  # what the Keras head computes
            return softmax(scaler.transform(features[:, :keep]) @ coef.T + intercept, axis=1)

        return predict, lambda: logistic_head(n_features, keep, scaler.mean_, scaler.scale_ ** 2, coef, intercept,
                                              activation=self.activation)

    def fit_epochs(self, options, x_train, y_train, x_val, y_val, n_classes, weights, keep=None):
        """The ``gap`` head fitted epoch by epoch (``training.head.train_softmax``): (head, history, best epoch)."""
        from transferkit.training.head import train_softmax

        return train_softmax(options, x_train, y_train, x_val, y_val, n_classes, weights, keep=keep, task=self)

    def sample_weights(self, class_weights, y):
        if not class_weights:
            return np.ones(len(y), np.float32)
        return np.asarray([class_weights[int(c)] for c in y], np.float32)

    def fit_trust(self, head, train, val, n_classes, keep_known, groups=None, novelty_dim=None, held_out=None,
                  negatives=None):
        from transferkit.models.novelty import fit_trust

        return fit_trust(head, train, val, n_classes, keep_known, groups=groups, novelty_dim=novelty_dim,
                         held_out=held_out, negatives=negatives)

    def audit(self, x, y, paths, class_names):
        from transferkit.training.audit import audit_labels

        return audit_labels(x, y, paths, class_names)

    def fine_tune_key(self, validation, probs, y):
        """What the second stage must beat: (the head's validation accuracy, - its validation log loss)."""
        return validation["accuracy"], -self.score(probs, y)[1]

    def score(self, probs, y):
        return float(np.mean(probs.argmax(1) == y)), mean_log_loss(probs, y)

    def class_weights(self, kind, y, n_classes):
        """``balanced``: each class weighted by inverse frequency (scikit-learn's formula); ``none``: None."""
        from sklearn.utils.class_weight import compute_class_weight

        if kind != "balanced":
            return None
        values = compute_class_weight("balanced", classes=np.arange(n_classes), y=y)
        return {i: float(w) for i, w in enumerate(values)}

    def calibrate(self, logits, y):
        from transferkit.models.novelty import fit_temperature

        return fit_temperature(logits, y)

    def probabilities(self, logits):
        from scipy.special import softmax

        return softmax(logits, axis=1)

    def logits(self, probabilities):
        from transferkit.models.novelty import softmax_logits

        return softmax_logits(probabilities)

    # ----- answers -----
    def decide(self, paths, outputs, class_names, top_k, novelty=None, reject=True, *, conformal=None,
               coverage=None, max_error=None):
        """One result dict per image: path, label, probability and the top-k (label, probability). For a model
        with a novelty score (``novelty`` = metadata["novelty"]) also ``novelty`` (the score over the model's
        threshold, as the model outputs it: above 1 is unknown) and ``unknown``; an unknown row's label and
        probability are None (``reject=False`` keeps the nearest class), and its top-k still lists the nearest
        classes. With ``coverage`` (and ``conformal`` = metadata["conformal"]) also ``set``, the conformal
        prediction set; with ``max_error``, ``abstain`` (see ``models.conformal``)."""
        from transferkit.models.novelty import split_outputs

        probs, scores = split_outputs(outputs, len(class_names))
        if not novelty:
            scores = None  # a model file without the trust metadata: its extra output is not ours to read
        k = max(1, min(int(top_k), len(class_names)))
        rows = []
        for i, (path, p) in enumerate(zip(paths, probs)):
            order = np.argsort(-p, kind="stable")[:k]
            row = {"path": path, "label": class_names[order[0]], "probability": float(p[order[0]]),
                   "top_k": [{"label": class_names[j], "probability": float(p[j])} for j in order]}
            if scores is not None:
                relative = float(scores[i])  # the score over the model's threshold
                row |= {"novelty": round(relative, 4), "unknown": bool(relative > 1.0)}
                if row["unknown"] and reject:
                    row |= {"label": None, "probability": None}
            rows.append(row)
        if coverage is not None or max_error is not None:
            _add_guarantees(rows, probs, class_names, conformal, coverage, max_error)
        return rows

    # ----- evaluation -----
    def metrics(self, y_true, probs, class_names, paths=None, skipped=None):
        from transferkit.reports.metrics import compute_metrics

        return compute_metrics(y_true, probs, class_names, paths, skipped)

    def text_report(self, metrics):
        from transferkit.reports.metrics import text_report

        return text_report(metrics)

    def report_parts(self, metrics, out):
        from transferkit.reports.html import confusion_parts

        return confusion_parts(metrics, out)
