"""Post-training int8 for OpenVINO (NNCF), calibrated on the user's own images and cached like the other
conversions.

EfficientNet-Lite was designed for int8 (ReLU6, no squeeze-excite). Measured here on its 1,280 pooled features of
photo crops (2 cores, AVX512-BF16 + AMX, batch 32, benchmarks/precision.py): OpenVINO fp32 199 img/s, bf16 395
(cosine 0.9976 vs fp32), int8 270 (cosine 0.987, the layers NNCF keeps in float run in bf16): with AMX, bf16 is
the faster choice. With AMX ruled out (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``: AVX512-BF16 and VNNI, as on a CPU
without AMX) fp32 ran at 154, bf16 at 132 and int8 at 256: ``feature_precision=auto`` takes int8 on CPUs without
AMX. NNCF's
calibration (64 images) takes 3.5 s once per model and calibration set: the quantized model is cached under the
model's key and the calibration images' digest, with a checksum (a damaged file is quantized again, never used).
This module imports no Keras.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from transferkit.files import atomic_path, bytes_digest, cache_dir, file_digest, read_checked, write_checked
from transferkit.log import logger

KEEP_FLOAT = (".*novelty.*", ".*temperature.*", ".*calibrated.*", ".*logits.*", ".*with_novelty.*")  # the head


def calibration_id(images: np.ndarray) -> str:
    """What a quantized model was calibrated on (part of its cache name and of its features' cache key)."""
    from transferkit.engines.runtimes import MAX_CALIBRATION

    return bytes_digest(np.ascontiguousarray(images[:MAX_CALIBRATION], np.float32).tobytes())[:12]


def int8_model(onnx_path: str, key: str | None, calibration: np.ndarray):
    """The OpenVINO model of ``onnx_path`` with its convolutions and matrix products quantized to int8, calibrated
    on ``calibration`` (RGB 0-255 images at the model's size); the classifier head (temperature, novelty score)
    stays in float. Cached as IR under ``key`` + the calibration's id (``key=None``: not cached)."""
    import openvino as ov

    from transferkit.engines.runtimes import MAX_CALIBRATION

    calibration = np.asarray(calibration[:MAX_CALIBRATION], np.float32)
    xml = None if key is None else cache_dir("runtimes") / f"{key}-int8-{calibration_id(calibration)}.xml"
    if xml is not None and _intact(xml):
        return ov.Core().read_model(str(xml))
    model = _quantize(ov.Core().read_model(onnx_path), calibration)
    if xml is not None:
        _save(model, xml)
    return model


def _quantize(model, calibration: np.ndarray):
    import nncf

    logger.info(f"quantizing to int8 on {len(calibration)} of your images (once per model and image set)")
    dataset = nncf.Dataset([image[None] for image in calibration])
    return nncf.quantize(model, dataset, subset_size=len(calibration), fast_bias_correction=True,
                         ignored_scope=nncf.IgnoredScope(patterns=list(KEEP_FLOAT), validate=False))


def _digest_file(xml: Path) -> Path:
    return xml.with_name(xml.name + ".blake2b")


def _pair_digest(xml: Path) -> bytes:
    return (file_digest(xml) + file_digest(xml.with_suffix(".bin"))).encode()


def _intact(xml: Path) -> bool:
    recorded = read_checked(_digest_file(xml))
    try:
        return recorded is not None and recorded == _pair_digest(xml)
    except OSError:
        return False


def _save(model, xml: Path) -> None:
    """IR (.xml + .bin) written under temporary names and moved in place, then their checksum: a file pair
    without a matching checksum (a killed write) is quantized again."""
    import openvino as ov

    with atomic_path(xml, suffix=".xml") as tmp_xml:
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), xml.with_suffix(".bin"))
    write_checked(_digest_file(xml), _pair_digest(xml))
