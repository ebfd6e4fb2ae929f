"""How well each out-of-distribution score rejects "unknown" photos (of none of the trained classes), to choose
the method transferkit ships: a classifier always answers one of its classes, so without a rejection score a
photo of something else is confidently mislabelled.

    python benchmarks/unknown.py [--size 224] [--seeds 3] [--train 30] [--val 20] [--test 20] [--tiny 5] [--k 5]

(about two minutes on 2 CPU cores; no download: every image ships with scikit-image or scikit-learn)

Known classes are random crops of scikit-image's bundled photographs (the crop of make_photo_dataset.py:
position, scale, flip, JPEG quality). Training crops come from two diagonal quadrants of each photograph,
validation and test crops from the other two, so a test image is a new view of its class, not a near-copy of a
training crop (which would flatter the nearest-neighbour score). Two further photographs are held out of
training as *near* unknowns (same source, unseen class). *Far* unknowns come from other domains:
scikit-learn's handwritten digits upscaled to RGB, crops of its two sample photos (china, flower), crops of the
textures grass and gravel, and crops of scikit-image photos used as no class (retina, moon, clock, page, text,
cell). Every image goes through the frozen EfficientNet-Lite0 (pooled 1280-d features, via FeatureExtractor).

Scores (higher = more likely unknown):
  max-softmax      1 - max softmax probability of a logistic-regression head on the (standardised) features
                   (ranked through log((1 - p) / p), the same order without float saturation at p = 1)
  max-softmax T    the same with the head's logits divided by a temperature fitted on validation (min NLL)
  mahalanobis LW   min over classes of the squared Mahalanobis distance, covariance shared across classes and
                   shrunk by Ledoit-Wolf
  mahalanobis raw  the same with the unshrunk (pseudo-inverted) covariance, for reference
  knn cosine       mean cosine distance to the k nearest training features

For each: AUROC of unknown vs known test images, and the share of unknowns rejected when the threshold is the
95th percentile of the score on known *validation* images (so ~95 % of known images are kept; the last column
shows how many known *test* images actually were). Also the expected calibration error (15 bins) of the softmax
head on known test images, before and after temperature scaling. All of it twice: with --train images per class
and with --tiny per class (same validation and test), to see which score survives tiny data.
Deterministic: seed s draws the crops of repeat s (0 .. --seeds - 1), and the tables show the mean±sd over the
repeats, since with a few hundred images one threshold moves the rejection rates by several points. Features are
not cached (each repeat's crops are new anyway).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from scipy.special import log_softmax, logsumexp, softmax  # noqa: E402
from skimage import data  # noqa: E402
from sklearn.covariance import LedoitWolf  # noqa: E402
from sklearn.datasets import load_digits, load_sample_images  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from make_photo_dataset import crop  # noqa: E402

KNOWN = {  # trained classes (data.cat is the same photograph as data.chelsea: not used twice)
    "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket, "astronaut": data.astronaut,
    "brick": data.brick, "coins": data.coins, "camera": data.camera, "hubble": data.hubble_deep_field,
}
NEAR = {"motorcycle": lambda: data.stereo_motorcycle()[0], "immunohistochemistry": data.immunohistochemistry}
FAR_PHOTOS = {  # source group -> {name: loader}; crops of these, like the known classes
    "sample photos": {f"sample{i}": (lambda i=i: load_sample_images().images[i]) for i in range(2)},
    "textures": {"grass": data.grass, "gravel": data.gravel},
    "other skimage": {"retina": data.retina, "moon": data.moon, "clock": data.clock, "page": data.page,
                      "text": data.text, "cell": data.cell},
}


def rgb(photo: np.ndarray) -> np.ndarray:
    photo = np.asarray(photo)
    if photo.dtype != np.uint8:
        photo = (255 * (photo - photo.min()) / max(float(np.ptp(photo)), 1e-9)).astype(np.uint8)
    if photo.ndim == 2:
        photo = np.stack([photo] * 3, axis=-1)
    return np.ascontiguousarray(photo[..., :3])


def write(img: Image.Image, folder: str, name: str, rng: np.random.Generator) -> str:
    path = os.path.join(folder, f"{name}.jpg")
    img.convert("RGB").save(path, quality=int(rng.integers(70, 95)))
    return path


def build_images(folder: str, args) -> dict:
    """Paths of every split: {"train"|"val"|"test": (paths, labels)}, {"near"|far group: paths}."""
    out: dict = {}
    splits = {"train": args.train, "val": args.val, "test": args.test}
    for split in splits:
        out[split] = ([], [])
    for c, (name, load) in enumerate(KNOWN.items()):
        photo, rng = rgb(load()), np.random.default_rng([args.seed, 1, c])
        h, w = photo.shape[0] // 2, photo.shape[1] // 2
        quadrants = [photo[:h, :w], photo[h:, w:], photo[:h, w:], photo[h:, :w]]
        for split, n in splits.items():  # each split its own draws, in a fixed order
            region = quadrants[:2] if split == "train" else quadrants[2:]  # train apart from val/test: no near-copies
            for i in range(n):
                img = crop(region[i % 2], rng)
                out[split][0].append(write(img, folder, f"{name}-{split}-{i}", rng))
                out[split][1].append(c)
    out["near"] = []
    for c, (name, load) in enumerate(NEAR.items()):
        photo, rng = rgb(load()), np.random.default_rng([args.seed, 2, c])
        out["near"] += [write(crop(photo, rng), folder, f"near-{name}-{i}", rng) for i in range(args.near)]
    digits = load_digits().images
    rng = np.random.default_rng([args.seed, 3])
    out["far: digits"] = []
    for i, j in enumerate(rng.choice(len(digits), args.far_digits, replace=False)):
        img = Image.fromarray(rgb(digits[j] * (255 / 16)).astype(np.uint8)).resize((224, 224), Image.Resampling.BILINEAR)
        out["far: digits"].append(write(img, folder, f"digit-{i}", rng))
    for g, (group, photos) in enumerate(FAR_PHOTOS.items()):
        out[f"far: {group}"] = []
        n = max(1, args.far_per_group // len(photos))
        for p, (name, load) in enumerate(photos.items()):
            photo, rng = rgb(load()), np.random.default_rng([args.seed, 4, g, p])
            out[f"far: {group}"] += [write(crop(photo, rng), folder, f"far-{name}-{i}", rng) for i in range(n)]
    return out


# --- scores (higher = more likely unknown) ------------------------------------------------------------------

def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Scores:
    """Every score, fitted on one training set; ``score(x)`` -> {method: (n,) scores}."""

    def __init__(self, x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, k: int, seed: int):
        self.scaler = StandardScaler().fit(x)
        self.head = LogisticRegression(C=1.0, max_iter=5000, random_state=seed).fit(self.scaler.transform(x), y)
        val_logits = self.logits(x_val)
        nll = lambda log_t: -log_softmax(val_logits / np.exp(log_t), axis=1)[np.arange(len(y_val)), y_val].mean()
        self.temperature = float(np.exp(minimize_scalar(nll, bounds=(-6, 6), method="bounded").x))
        self.means = np.stack([x[y == c].mean(0) for c in range(y.max() + 1)])
        resid = x - self.means[y]
        lw = LedoitWolf().fit(resid)
        self.shrinkage = float(lw.shrinkage_)
        self.precision_lw = lw.precision_
        self.precision_raw = np.linalg.pinv(np.cov(resid, rowvar=False), hermitian=True)
        self.train_unit = l2(x)
        self.k = min(k, len(x))

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.head.decision_function(self.scaler.transform(x))

    def probs(self, x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        return softmax(self.logits(x) / temperature, axis=1)

    def other_mass(self, x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """log of (1 - max p) / max p: ranks like 1 - max softmax probability, without its float64 saturation
        (1 - p is exactly 0 for any confident image, which would tie most of them)."""
        z = np.sort(self.logits(x) / temperature, axis=1)
        return logsumexp(z[:, :-1] - z[:, -1:], axis=1)

    def mahalanobis(self, x: np.ndarray, precision: np.ndarray) -> np.ndarray:
        d = x[:, None, :] - self.means[None]  # (n, classes, dim)
        return np.einsum("ncd,de,nce->nc", d, precision, d, optimize=True).min(1)

    def score(self, x: np.ndarray) -> dict[str, np.ndarray]:
        sims = l2(x) @ self.train_unit.T
        nearest = -np.sort(-sims, axis=1)[:, : self.k]
        return {
            "max-softmax": self.other_mass(x),
            "max-softmax T": self.other_mass(x, self.temperature),
            "mahalanobis LW": self.mahalanobis(x, self.precision_lw),
            "mahalanobis raw": self.mahalanobis(x, self.precision_raw),
            f"knn cosine k={self.k}": (1 - nearest).mean(1),
        }


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(conf[inside].mean() - (pred[inside] == labels[inside]).mean())
    return float(total)


def evaluate(scores: Scores, feats: dict, unknown_groups: dict[str, list[str]]) -> tuple[dict, dict]:
    """{method: {column: value}} for far / near, and {method: {far group: AUROC}}."""
    val, test = scores.score(feats["val"]), scores.score(feats["test"])
    unknown = {name: scores.score(feats[name]) for name in feats if name.startswith(("far", "near"))}
    table: dict = {}
    per_group: dict = {}
    for method in val:
        thr = np.percentile(val[method], 95)
        row = {}
        for kind, names in unknown_groups.items():
            u = np.concatenate([unknown[n][method] for n in names])
            row[f"{kind} AUROC"] = roc_auc_score(np.r_[np.zeros(len(test[method])), np.ones(len(u))],
                                                 np.r_[test[method], u])
            row[f"{kind} rej@95"] = float((u > thr).mean())
        row["known kept"] = float((test[method] <= thr).mean())
        table[method] = row
        per_group[method] = {n: roc_auc_score(np.r_[np.zeros(len(test[method])), np.ones(len(unknown[n][method]))],
                                              np.r_[test[method], unknown[n][method]])
                             for n in unknown_groups["far"]}
    return table, per_group


def cell(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" + (f"±{np.std(values):.3f}" if len(values) > 1 else "")


def print_table(title: str, rows: dict[str, dict[str, list[float]]], cols: list[str], width: int) -> None:
    print(f"\n{title}")
    print(f"  {'method':<18}" + "".join(f"{c:>{width}}" for c in cols))
    for method, row in rows.items():
        print(f"  {method:<18}" + "".join(f"{cell(row[c]):>{width}}" for c in cols))


def extract(fx, images: dict) -> tuple[dict, dict, int]:
    feats, labels, n = {}, {}, 0
    for name, value in images.items():
        paths, y = value if isinstance(value, tuple) else (value, None)
        f, kept, skipped = fx.extract(paths, 0)
        if skipped:
            raise SystemExit(f"{name}: undecodable {skipped[:3]}")
        feats[name] = f[:, 0].astype(np.float64)
        labels[name] = None if y is None else np.asarray(y)[kept]
        n += len(paths)
    return feats, labels, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seeds", type=int, default=3, help="repeats with fresh crops (tables show mean±sd)")
    p.add_argument("--train", type=int, default=30, help="training images per known class")
    p.add_argument("--val", type=int, default=20, help="validation images per known class (threshold, temperature)")
    p.add_argument("--test", type=int, default=20, help="test images per known class")
    p.add_argument("--tiny", type=int, default=5, help="training images per class of the tiny-data variant")
    p.add_argument("--near", type=int, default=25, help="images per held-out (near unknown) class")
    p.add_argument("--far-digits", type=int, default=50)
    p.add_argument("--far-per-group", type=int, default=48, help="crops per far photo group")
    p.add_argument("--k", type=int, default=5, help="neighbours of the kNN score")
    args = p.parse_args()
    start = time.perf_counter()

    from transferkit.training.features import FeatureExtractor

    fx = FeatureExtractor("efficientnet_lite0", args.size, runtime="auto", cache=False)
    variants = {"normal": args.train, "tiny": args.tiny}
    tables = {v: {} for v in variants}  # variant -> method -> column -> [value per seed]
    per_source: dict = {}  # method -> far source -> [AUROC per seed] (normal data)
    facts = {v: {} for v in variants}  # variant -> fact -> [value per seed]
    t_feat, n_images = 0.0, 0
    for seed in range(args.seeds):
        args.seed = seed
        with tempfile.TemporaryDirectory(prefix="transferkit-unknown-") as folder:
            images = build_images(folder, args)
            t0 = time.perf_counter()
            feats, labels, n = extract(fx, images)
            t_feat, n_images = t_feat + time.perf_counter() - t0, n_images + n
        groups = {"far": [n for n in feats if n.startswith("far")], "near": ["near"]}
        y_tr = labels["train"]
        for variant, per_class in variants.items():
            idx = np.concatenate([np.flatnonzero(y_tr == c)[:per_class] for c in range(len(KNOWN))])
            scores = Scores(feats["train"][idx], y_tr[idx], feats["val"], labels["val"], args.k, seed)
            table, per_group = evaluate(scores, feats, groups)
            for method, row in table.items():
                for col, value in row.items():
                    tables[variant].setdefault(method, {}).setdefault(col, []).append(value)
                if variant == "normal":
                    for source, value in per_group[method].items():
                        per_source.setdefault(method, {}).setdefault(source[5:], []).append(value)
            got = {"test accuracy": float((scores.probs(feats["test"]).argmax(1) == labels["test"]).mean()),
                   "Ledoit-Wolf shrinkage": scores.shrinkage, "temperature": scores.temperature,
                   "ECE before": ece(scores.probs(feats["test"]), labels["test"]),
                   "ECE after": ece(scores.probs(feats["test"], scores.temperature), labels["test"])}
            for fact, value in got.items():
                facts[variant].setdefault(fact, []).append(value)

    print(f"EfficientNet-Lite0 {args.size}px on {fx.runtime}/{fx.precision}: {n_images} images in {t_feat:.1f}s; "
          f"{args.seeds} seed(s), mean±sd over seeds")
    print(f"known: {len(KNOWN)} classes ({', '.join(KNOWN)}) x {args.train} train / {args.val} val / {args.test} test"
          f" per seed; near: {', '.join(NEAR)} ({len(feats['near'])}); far: "
          + ", ".join(f"{n[5:]} ({len(feats[n])})" for n in groups["far"]))
    print("rej@95 = share of unknowns scoring above the 95th percentile of known validation images; "
          "known kept = share of known test images below it")
    cols = ["far AUROC", "far rej@95", "near AUROC", "near rej@95", "known kept"]
    for variant, per_class in variants.items():
        f = facts[variant]
        print_table(f"{variant} data: {per_class} train/class (test accuracy {cell(f['test accuracy'])}, "
                    f"Ledoit-Wolf shrinkage {cell(f['Ledoit-Wolf shrinkage'])})", tables[variant], cols, 13)
    print_table("far AUROC per source (normal data)", per_source, list(next(iter(per_source.values()))), 15)
    print("\nsoftmax head ECE (15 bins, known test images), temperature fitted on validation by NLL")
    for variant, per_class in variants.items():
        f = facts[variant]
        print(f"  {variant} ({per_class}/class): ECE {cell(f['ECE before'])} -> {cell(f['ECE after'])} "
              f"at T = {cell(f['temperature'])}")
    print(f"\ntotal {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
