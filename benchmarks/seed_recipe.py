"""The seed's recipe vs `transferkit train` defaults, on the same images and the same (offline) backbone.

    python benchmarks/seed_recipe.py DATA_DIR --test-dir DIR [--epochs 20]

(a) seed: image_dataset_from_directory, augmentation layers (RandomFlip, RandomRotation(0.1), RandomZoom(0.1))
    inside the model, frozen EfficientNet-Lite0, Flatten -> Dense 256 -> Dense 128 -> softmax, 20 epochs of
    full forward passes through the backbone.
(b) transferkit train with its defaults, `--repeats` times with an empty feature cache (cold) and as many times with
    it warm; the median of each is reported, with the range (a single cold run varied by 10 % here).
One-time set-up per machine and backbone (weights conversion, the runtime's converted model) is done first and timed
apart; both recipes then use it. Prints wall seconds and test accuracy of each; the last line is
`speed ratio: R` (seed / transferkit's median, cold feature cache). `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` measures,
on a CPU with AMX, what one without it computes (oneDNN's kernels in OpenVINO and TensorFlow obey the cap).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TRANSFERKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tk-bench-cache-")

import keras  # noqa: E402

import transferkit  # noqa: E402
from transferkit.models.backbones import build_backbone  # noqa: E402


def seed_recipe(data_dir: str, test_dir: str, epochs: int, seed: int = 42) -> tuple[float, float]:
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    size = 224
    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        data_dir, validation_split=0.2, subset="both", seed=seed, image_size=(size, size), batch_size=32)
    test_ds = keras.utils.image_dataset_from_directory(test_dir, image_size=(size, size), batch_size=32, shuffle=False)
    n_classes = len(train_ds.class_names)
    backbone = build_backbone("efficientnet_lite0", (size, size, 3), weights="imagenet")  # frozen
    inputs = keras.Input((size, size, 3))
    x = keras.layers.RandomFlip("horizontal")(inputs)
    x = keras.layers.RandomRotation(0.1)(x)
    x = keras.layers.RandomZoom(0.1)(x)
    x = backbone(x, training=False)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=2)
    _, accuracy = model.evaluate(test_ds, verbose=0)
    return time.perf_counter() - start, float(accuracy)  # with its test evaluation, as transferkit train's time


def one_time_setup(data_dir: str) -> float:
    """Convert the backbone's weights and its runtime model (what the first run on a machine does once)."""
    import numpy as np

    from transferkit.data.folders import scan_folder
    from transferkit.data.images import load_image
    from transferkit.options import TrainOptions
    from transferkit.training.features import FeatureExtractor

    start = time.perf_counter()  # the extractor the defaults train with (multi-depth for --head auto)
    extractor = FeatureExtractor.from_options(TrainOptions())
    extractor.cache_root = None
    paths = scan_folder(data_dir).paths[:8]
    extractor.extract(paths)
    maps = extractor.map_forward()  # the report's heat maps: the backbone's last feature map, converted once
    if maps is not None:
        maps(np.stack([load_image(p, extractor.image_size) for p in paths]).astype(np.float32))
    return time.perf_counter() - start


def transferkit_default(data_dir: str, test_dir: str, out: str, cold: bool) -> tuple[float, float]:
    if cold:  # the features of every photo computed again; the one-time conversions stay
        shutil.rmtree(os.path.join(os.environ["TRANSFERKIT_CACHE_DIR"], "features"), ignore_errors=True)
    start = time.perf_counter()
    result = transferkit.train(data_dir, test_dir=test_dir, out=out)
    return time.perf_counter() - start, result["test"]["accuracy"]


def repeated(data_dir: str, test_dir: str, out: str, cold: bool, repeats: int) -> tuple[float, float, str]:
    """(median seconds, the lowest test accuracy, "min-max s") of ``repeats`` runs."""
    runs = [transferkit_default(data_dir, test_dir, os.path.join(out, f"{'cold' if cold else 'warm'}{i}"), cold)
            for i in range(repeats)]
    seconds = [r[0] for r in runs]
    return statistics.median(seconds), min(r[1] for r in runs), f"{min(seconds):.1f}-{max(seconds):.1f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir")
    p.add_argument("--test-dir", required=True)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="transferkit runs of each kind (the median is reported)")
    args = p.parse_args()
    out = tempfile.mkdtemp(prefix="tk-bench-run-")
    setup = one_time_setup(args.data_dir)
    tk_cold = repeated(args.data_dir, args.test_dir, out, True, args.repeats)
    tk_warm = repeated(args.data_dir, args.test_dir, out, False, args.repeats)
    seed = seed_recipe(args.data_dir, args.test_dir, args.epochs)
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "none")
    print(f"one-time set-up (weights + runtime conversion): {setup:.1f} s   ONEDNN_MAX_CPU_ISA cap: {isa}")
    print(f"seed recipe ({args.epochs} epochs):       {seed[0]:8.1f} s   test accuracy {seed[1]:.4f}")
    print(f"transferkit train (cold cache): {tk_cold[0]:8.1f} s   test accuracy {tk_cold[1]:.4f}   "
          f"({args.repeats} runs: {tk_cold[2]})")
    print(f"transferkit train (warm cache): {tk_warm[0]:8.1f} s   test accuracy {tk_warm[1]:.4f}   "
          f"({args.repeats} runs: {tk_warm[2]})")
    print(f"warm-cache speed ratio: {seed[0] / tk_warm[0]:.1f}")
    print(f"speed ratio: {seed[0] / tk_cold[0]:.1f}")


if __name__ == "__main__":
    main()
