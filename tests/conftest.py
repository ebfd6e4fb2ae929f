"""Shared fixtures: a private cache folder, real photo files written by the tests, one trained run."""

import importlib
import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="transferkit-test-cache-")
os.environ["TRANSFERKIT_CACHE_DIR"] = _CACHE  # never touch the user's cache
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from photos import PHOTOS, photo_crop  # noqa: E402


def on_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as GitHub Actions, GitLab CI and most others set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(reason: str):
    """What a test does where something it needs is not there: a skip with ``reason`` locally, a failure under
    CI=true (where everything the test extra installs, Chromium and the PostgreSQL server must be there)."""
    if on_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, why: str = "part of the [test] extra"):
    """``module`` imported, for a test (or, at its top, a test module) that needs it. Where it is missing:
    ``missing`` (a skip locally, a failure under CI=true: an importorskip would hide a missing dependency on CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        error = str(exc)  # reported below, outside this handler: no "during handling of..." chain in the report
    missing(f"{module} is not installed ({why}): {error}")


HARDWARE = "hardware: "  # the start of a hardware skip's reason: the run's summary lists those skips


def hardware_skip(reason: str):
    """A skip this machine's hardware (or platform) justifies, e.g. no AMX or native bf16: never a missing
    package (``require``). Listed under "hardware skips:" at the end of the run."""
    pytest.skip(HARDWARE + reason, allow_module_level=True)


def hardware_reason(reason: str) -> str:
    """The reason of a ``pytest.mark.skipif`` for hardware (or platform): listed as ``hardware_skip``'s are."""
    return HARDWARE + reason


def _skip_reason(report) -> str:
    """The reason of a skipped test's report (a ``(path, line, message)`` tuple; a list once it has come back
    from a pytest-xdist worker), without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    if isinstance(longrepr, (tuple, list)) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter):
    """The hardware skips of the run, each test with its reason: the skips a run on other hardware would not
    have, so a summary shows what this machine could not check (every other skip is a missing dependency,
    which fails under CI=true)."""
    rows = [(r.nodeid, reason.removeprefix(HARDWARE)) for r in terminalreporter.stats.get("skipped", [])
            if (reason := _skip_reason(r)).startswith(HARDWARE)]
    terminalreporter.write_line(f"hardware skips: {len(rows) or 'none'}")
    for nodeid, reason in rows:
        terminalreporter.write_line(f"  {nodeid}: {reason}")


CLASSES = ["fraise fraîche", "pêche pourrie", "grenade"]  # crops of three photographs (photos.PHOTOS)
IMAGE_SIZE = 64  # small input: fast, still real EfficientNet-Lite0 features


def pattern_image(kind: int, rng: np.random.Generator, size=(72, 56)) -> np.ndarray:
    """A synthetic RGB array whose class is visible: horizontal stripes, vertical stripes or a disc (colour-coded:
    even random weights separate these, so no accuracy test trains on them; write_dataset writes photo crops)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.integers(6, 10)
    if kind == 0:
        mask = (yy // period) % 2 == 0
    elif kind == 1:
        mask = (xx // period) % 2 == 0
    else:
        r = rng.uniform(0.25, 0.4) * min(h, w)
        mask = (yy - h / 2 + rng.normal(0, 3)) ** 2 + (xx - w / 2 + rng.normal(0, 3)) ** 2 < r * r
    fg = np.array([[220, 40, 40], [240, 170, 60], [120, 20, 90]][kind], dtype=float)
    bg = np.array([235, 235, 225], dtype=float)
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dataset(root, per_class: int, seed: int, classes=CLASSES, fmt="JPEG") -> str:
    """``root/<class>/photo_NNN.jpg`` (or .png): class k is random crops of the photograph photos.PHOTOS[k]; another
    seed draws other crops (train and test sets are written with different seeds)."""
    if len(classes) > len(PHOTOS):
        raise ValueError(f"at most {len(PHOTOS)} classes (one photograph each)")
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for k, name in enumerate(classes):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(photo_crop(k, rng))
            path = os.path.join(folder, f"photo_{i:03d}.{ext}")
            quality = int(rng.integers(70, 95))
            img.save(path, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return str(root)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """(train folder, test folder) of three accented classes, 16 + 6 photo crops each (different crops)."""
    root = tmp_path_factory.mktemp("fruit")
    return write_dataset(root / "train", 16, seed=1), write_dataset(root / "test", 6, seed=2)


@pytest.fixture(scope="session")
def trained(dataset, tmp_path_factory):
    """One real training run on the tiny dataset (shared by the tests that only read its outputs)."""
    import transferkit

    out = tmp_path_factory.mktemp("run")
    result = transferkit.train(dataset[0], test_dir=dataset[1], image_size=IMAGE_SIZE, epochs=15, augment_views=2,
                               out=str(out))
    return result, str(out)


def _shared_folder(tmp_path_factory, name: str):
    """(folder, lock file) shared by this run's pytest-xdist workers (their base temporary folders' parent), or
    this run's own where there are none."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root / name, root / f"{name}.lock"


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory):
    """One CLI training of the multi-label task on 120 mosaics (tests/mosaics.py; 60 more held out), for
    test_multilabel and test_feedback_multilabel: {"train", "test": labels.csv, "out": run folder, "stderr": the
    training command's}. Built once per run, even by two pytest-xdist workers (a file lock; the second reads the
    first's folder), since `make test` may give the two files to different workers."""
    import fcntl

    from children import run_cli
    from mosaics import write_mosaics

    root, lock_path = _shared_folder(tmp_path_factory, "multilabel-run")
    paths = {"train": str(root / "train" / "labels.csv"), "test": str(root / "test" / "labels.csv"),
             "out": root / "run"}
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held until the run is built: another worker waits here, then reads it
        if not (root / "stderr.txt").exists():
            write_mosaics(root / "train", 120, seed=1)  # root/train/labels.csv
            write_mosaics(root / "test", 60, seed=2)
            proc = run_cli("train", paths["train"], "--multi-label", "--image-size", 64, "--out", paths["out"], "-q",
                           timeout=900)
            (root / "stderr.txt").write_text(proc.stderr, encoding="utf-8")  # last: the mark of a finished run
    return paths | {"stderr": (root / "stderr.txt").read_text(encoding="utf-8")}


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module (2 CPUs, a small object store), shut down after it."""
    ray = require("ray", "the [ray] extra, part of [test]")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20,
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _library_logging():
    """A test that runs the CLI in this process (``cli.main``) installs its stderr handler, sets its level and stops
    propagation: undone after each test, so later tests' ``caplog`` sees transferkit's messages again."""
    yield
    import logging

    from transferkit.log import logger

    for handler in [h for h in logger.handlers if getattr(h, "_transferkit", False)]:
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.INFO)
