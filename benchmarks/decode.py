"""Decode + resize throughput of the image loader alone (thread pool, as training and prediction use it).

    python benchmarks/decode.py DIR [--size 224]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from transferkit.data.images import decode_batch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args()
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(args.folder) for f in fs)
    for workers in (1, os.cpu_count() or 2):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            start = time.perf_counter()
            arrays, _ = decode_batch(paths, args.size, pool)
            elapsed = time.perf_counter() - start
        print(f"{len(paths)} files, {workers} thread(s): {len(paths) / elapsed:.0f} img/s decode + resize to {args.size}px")


if __name__ == "__main__":
    main()
