"""`transferkit compare` on real-photo datasets: which offline backbone each one picks, and what it costs.

    python benchmarks/compare.py [--datasets textures,photos] [--backbones efficientnet_lite0,...] [--image-size N]

Per dataset (benchmarks/datasets.py): each backbone's validation accuracy and macro F1 (the same seeded split, the
same logistic head on its cached final features), its test accuracy and macro F1 (the test folder, never used to
pick), its backbone images/s on this machine (the default engine), the wall time of the comparison with an empty
feature cache (conversions included) and again with the cache warm, and the pick with its reason. `±` is the
binomial standard error of the validation accuracy, the width of a tie.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import datasets  # noqa: E402

BACKBONES = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="textures,photos")
    p.add_argument("--backbones", default=BACKBONES)
    p.add_argument("--image-size", type=int, help="one size for every backbone (default: each one's own)")
    args = p.parse_args()
    os.environ["TRANSFERKIT_CACHE_DIR"] = tempfile.mkdtemp(prefix="tk-compare-cache-")
    import transferkit
    from transferkit.training.compare import text_table

    options = {"image_size": args.image_size} if args.image_size else {}
    for name in args.datasets.split(","):
        root = tempfile.mkdtemp(prefix=f"tk-compare-{name}-")
        train_dir, test_dir = datasets.write(name, root)
        timings = []
        for _ in ("cold", "warm"):
            t0 = time.perf_counter()
            found = transferkit.compare(train_dir, backbones=args.backbones.split(","), test_dir=test_dir,
                                        out=os.path.join(root, "compare"), **options)
            timings.append(time.perf_counter() - t0)
        print(f"\n== {name}: {found['n_train']} train / {found['n_val']} validation images, test folder "
              f"{found['results'][0].get('test_images')} images; {os.cpu_count()} CPUs")
        print(text_table(found))
        for r in found["results"]:
            print(f"  {r['backbone']}: val accuracy {r['val_accuracy']:.4f} ± {r['val_accuracy_se']:.4f}, val log "
                  f"loss {r['val_log_loss']:.4f}, "
                  f"{r['images_per_second']:.0f} img/s on {r['engine']}, features {r['feature_seconds']:.1f} s")
        print(f"comparison wall time: {timings[0]:.1f} s with an empty cache, {timings[1]:.1f} s with it warm")
        print(f"plot: {found['plot']}")


if __name__ == "__main__":
    main()
