"""The options records: the one place where an option is defined (name, default, choices, bounds, help).

Before, every training option was written four times (argparse, the CLI glue, a 25-parameter ``train`` signature,
the metadata) and the defaults had drifted apart (``runtime`` was ``auto`` in the CLI, ``keras`` in Python's
``predict``). Now the CLI builds its flags from these records (``batch_size`` -> ``--batch-size``), the
``ImageClassifier`` validates one record before any image is read, and ``metadata["training"]`` *is* the record, so
``--resume`` can compare it field by field. This module imports no Keras: ``transferkit --help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field

from transferkit.errors import OptionError, TransferkitError

RUNTIMES = ("auto", "keras", "onnxruntime", "openvino")
PRECISIONS = ("auto", "fp32", "bf16", "int8")
FEATURE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
HEADS = ("auto", "gap", "logistic", "flatten-256-128")
CLASS_WEIGHTS = ("balanced", "none")
# what decides the split and the features: a resumed run must have the same values (and the same training files)
SPLIT_AND_FEATURES = ("seed", "val_split", "image_size", "backbone", "weights", "augment_views", "depths")


def option(default, help: str, *, choices: tuple | None = None, low=None, high=None, low_open: bool = False,
           high_open: bool = False, none_ok: bool = False, flag: str | None = None, kind: type | None = None,
           shown: str | None = None):
    """A dataclass field carrying its validation rule and help text (read by :func:`check_field` and the CLI)."""
    kind = kind or type(default)
    rule = dict(help=help, choices=choices, low=low, high=high, low_open=low_open, high_open=high_open,
                none_ok=none_ok or default is None, flag=flag, kind=kind, shown=shown)
    return field(default=default, metadata=rule)


def _describe_range(rule: dict) -> str:
    low, high = rule["low"], rule["high"]
    lo = f"> {low}" if rule["low_open"] else f">= {low}"
    hi = f"< {high}" if rule["high_open"] else f"<= {high}"
    if low is not None and high is not None:
        return f"{lo} and {hi}"
    return lo if low is not None else hi


def check_field(name: str, value, rule: dict) -> None:
    """Raise :class:`OptionError` (naming ``name`` and ``value``) unless ``value`` obeys ``rule``."""
    if value is None:
        if not rule["none_ok"]:
            raise OptionError(name, "must be set", value)
        return
    kind = rule["kind"]
    if kind is bool:
        if not isinstance(value, bool):
            raise OptionError(name, "must be True or False", value)
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise OptionError(name, "must be a whole number", value)
    if kind is float and (isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value):
        raise OptionError(name, "must be a number", value)
    if kind is str and not isinstance(value, str):
        raise OptionError(name, "must be a string", value)
    if rule["choices"] and value not in rule["choices"]:
        raise OptionError(name, f"must be one of {', '.join(map(str, rule['choices']))}", value)
    low, high = rule["low"], rule["high"]
    below = low is not None and (value <= low if rule["low_open"] else value < low)
    above = high is not None and (value >= high if rule["high_open"] else value > high)
    if below or above:
        raise OptionError(name, f"must be {_describe_range(rule)}", value)


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of the records: field-by-field validation at construction, plain-dict round trip."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_field(f.name, getattr(self, f.name), f.metadata)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_names(cls, values: dict) -> None:
        """A misspelt option name is a one-line error that lists the known ones."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise TransferkitError(f"unknown option {unknown[0]!r}; known: {', '.join(cls.names())}")


@dataclass(frozen=True, kw_only=True)
class EngineOptions(Options):
    """Which engine computes a model's outputs (feature extraction, predict, evaluate, serve): the same default
    for every entry point."""

    runtime: str = option("auto", "inference engine: auto = the fastest installed that matches keras fp32 on your "
                                  "images, else keras", choices=RUNTIMES)
    precision: str = option("fp32", "fp32 (the same answer as the model file's exports and the server), or a speed "
                                    "choice checked against fp32 on your images, its label agreement printed: bf16 "
                                    "(openvino), int8 (openvino + NNCF), auto (bf16 where AMX makes it the fast one)",
                            choices=PRECISIONS)

    def __post_init__(self):
        super().__post_init__()
        if self.precision in ("bf16", "int8") and self.runtime not in ("auto", "openvino"):
            raise OptionError("precision", f"{self.precision} needs runtime openvino (runtime is {self.runtime!r})",
                              self.precision)


@dataclass(frozen=True, kw_only=True)
class TrainOptions(EngineOptions):
    """Every option of a training run. ``transferkit train --help`` is generated from these fields."""

    backbone: str = option("efficientnet_lite0", "see `transferkit backbones`; auto: compare the offline ones on "
                                                 "the validation split (transferkit compare) and train the pick")
    weights: str = option("imagenet", "'imagenet' or PATH to a local weights file", none_ok=True)
    image_size: int = option(None, "square input size", low=32, high=1024, kind=int)
    epochs: int = option(30, "epochs of the head fit", low=1, high=10_000)
    val_split: float = option(0.2, "share of each class held out for validation", low=0.0, high=1.0,
                              low_open=True, high_open=True)
    seed: int = option(42, "seed of the split, the augmented views and the fits", low=0)
    batch_size: int = option(32, "images (or feature vectors) per batch", low=1, high=4096)
    augment_views: int = option(0, "augmented views per training image (random flip, rotation, zoom), each cached; "
                                   "0 by measurement (benchmarks/quality.py: they did not earn their extraction time)",
                                low=0, high=64)
    class_weight: str = option("balanced", "weight classes by inverse frequency, or not (multi-label: each "
                                           "label's positives, in the logistic heads)", choices=CLASS_WEIGHTS)
    multi_label: bool = option(False, "multi-label: a photo shows any number of the labels (a label file whose "
                                      "label column lists them, separated by --label-sep; an empty cell: none)")
    label_sep: str = option("|", "with --multi-label: the separator of the labels in a label cell")
    head: str = option("auto", "auto: the best on the validation split of gap and logistic on 0, 2 or 4 depths (and "
                               "with or without the augmented views), the table printed; gap: softmax on pooled "
                               "features (Adam epochs, fitted by scikit-learn); logistic: L2 logistic regression "
                               "on standardised features (scikit-learn, saved as Keras layers); flatten-256-128: "
                               "the seed's dense head",
                       choices=HEADS)
    depths: int = option(None, "intermediate blocks whose pooled outputs join the final features (Head2Toe): "
                               "default 0, and for head auto the most it compares (0, 2, 4)", low=0, high=8,
                         kind=int)
    refit: bool = option(False, "after the choice, refit the chosen head on training + validation photos (the "
                                "validation metrics then no longer measure the final head)")
    learning_rate: float = option(1e-3, "head learning rate (Adam)", low=0.0, low_open=True, high=10.0)
    patience: int = option(8, "epochs without a better val_accuracy before stopping", low=1)
    dropout: float = option(0.2, "dropout before the head's classifier (in the flatten head's fit and in "
                                  "fine-tuning; the gap head's own fit uses L2 instead)",
                            low=0.0, high=1.0, high_open=True)
    keep_known: float = option(0.95, "share of known validation images the novelty threshold keeps (above it a "
                                     "photo is answered 'unknown')", low=0.5, high=1.0)
    feature_precision: str = option("auto", "numerics of the training views' features only (validation, test and "
                                    "every metric train reports use --precision, so evaluate reproduces them): auto "
                                    "= bf16 for runs of >= 1,000 backbone passes on a CPU with AMX, int8 from 2,000 "
                                    "on a CPU with int8 dot products (VNNI) but no AMX, else fp32; each checked "
                                    "against fp32", choices=FEATURE_PRECISIONS)
    cache: bool = option(True, "read and write the feature cache", flag="--no-cache")
    fine_tune_epochs: int = option(0, "second stage: epochs of end-to-end training (0: none)", low=0, high=10_000)
    unfreeze_top: int = option(2, "backbone blocks to unfreeze in the second stage, from the top", low=1)
    fine_tune_lr: float = option(1e-5, "learning rate of the second stage", low=0.0, low_open=True, high=10.0)

    def __post_init__(self):
        super().__post_init__()
        if not self.label_sep or self.label_sep.strip() != self.label_sep or len(self.label_sep) > 4:
            raise OptionError("label_sep", "must be 1 to 4 characters, not blank", self.label_sep)
        if self.multi_label and self.backbone == "auto":
            raise OptionError("backbone", "auto compares backbones on single-label heads; choose one backbone "
                              "with --multi-label", self.backbone)
        if self.precision == "int8":
            raise OptionError("precision", "is the numerics of the metrics train reports (fp32, or bf16): "
                              "--feature-precision int8 computes the training views in int8", self.precision)
        self._check_backbone()

    def for_training(self) -> "TrainOptions":
        """This record, after the checks only a training run needs (a local weights file must exist)."""
        if self.weights not in (None, "imagenet") and not os.path.isfile(self.weights):
            raise OptionError("weights", "must be 'imagenet' or an existing weights file", self.weights)
        return self

    def _check_backbone(self) -> None:
        from transferkit.models.backbones import get_spec  # the registry (imports Keras) only when validating

        if self.backbone == "auto":  # chosen from the data at training (training.compare)
            return
        try:
            spec = get_spec(self.backbone)
        except TransferkitError as exc:
            raise OptionError("backbone", f"is unknown ({str(exc).split('; ', 1)[-1]})", self.backbone) from None
        if self.unfreeze_top > spec.n_blocks:
            raise OptionError("unfreeze_top", f"must be between 1 and {spec.n_blocks} for {spec.name}",
                              self.unfreeze_top)

    @property
    def size(self) -> int:
        """The square input size: ``image_size`` or the backbone's default."""
        from transferkit.models.backbones import get_spec

        return int(self.image_size or get_spec(self.backbone).default_size)


@dataclass(frozen=True, kw_only=True)
class PredictOptions(Options):
    """How answers are given (``predict``, ``ImageClassifier.predict``, the server's default): the one place
    where ``top_k``, ``batch_size``, ``reject`` and the guarantees (``coverage``, ``class_coverage``,
    ``max_error``, ``expected_error``) and their defaults are written."""

    top_k: int = option(3, "classes listed per image", low=1)
    batch_size: int = option(32, "images per engine call", low=1, high=4096)
    reject: bool = option(True, "label photos unlike every class with their nearest class instead of 'unknown'",
                          flag="--no-reject")
    coverage: float | None = option(None, "add each photo's conformal prediction set: the fewest labels holding the "
                                    "right one this share of the time (multi-label: each label it shows, this "
                                    "share of the time) (e.g. 0.95)", low=0.0, high=1.0,
                                    low_open=True, high_open=True, kind=float, shown="off")
    max_error: float | None = option(None, "mark 'abstain' where answering would break this error rate among "
                                     "answered photos (e.g. 0.02)", low=0.0, high=1.0, low_open=True,
                                     high_open=True, kind=float, shown="off")
    expected_error: float | None = option(None, "mark 'abstain' so that a new photo gets a wrong answer with "
                                          "probability at most this, on average (conformal risk control: a "
                                          "promise in expectation, not with 90 % confidence like --max-error)",
                                          low=0.0, high=1.0, low_open=True, high_open=True, kind=float,
                                          shown="off")
    class_coverage: float | None = option(None, "add each photo's set with this coverage within every class "
                                          "(each class's own conformal quantile; a class with too few "
                                          "calibration photos is in every set) (e.g. 0.9)", low=0.0, high=1.0,
                                          low_open=True, high_open=True, kind=float, shown="off")


DEFAULT_PREDICT = PredictOptions()


@dataclass(frozen=True, kw_only=True)
class ServeOptions(EngineOptions):
    """The web server's options (``transferkit serve``)."""

    host: str = option("127.0.0.1", "address to bind (default: this machine only)")
    port: int = option(8000, "TCP port (0: a free one, the one bound printed)", low=0, high=65535)
    workers: int = option(1, "processes, each with its own copy of the model", low=1, high=64)
    threads: int = option(4, "request threads per worker", low=1, high=256)
    max_upload_mb: float = option(20.0, "largest request body accepted (413 above)", low=0.0, low_open=True)
    max_request_pixels: int = option(100_000_000, "pixels of all the images of one request (width x height, a JPEG "
                                     "at its reduced decode size), read from their headers before decoding (413 "
                                     "above)", low=1)
    top_k: int = option(DEFAULT_PREDICT.top_k, "classes listed per image", low=1)
    collect: str = option(None, "store each prediction, its upload (content-hash named) and the corrections given "
                                "on the page in DB: a SQLite file (WAL), or a postgresql:// URL (off by default)",
                          kind=str)
    collect_files: str = option(None, "folder of the collected uploads (default: DB.files beside a SQLite file, "
                                      "./collected-files for a URL)", kind=str)
    feedback_token: str = option(None, "corrections (POST /api/feedback) need this in X-Feedback-Token", kind=str)


DEFAULT_ENGINE = EngineOptions()  # the one default engine of every entry point (CLI, Python, server)
