"""Run a GLAD pipeline over calibration images and keep what a :class:`~glad_runtime.core.calibration.Calibration` needs.

Image scores are kept whole; anomaly maps are reduced to a seeded pixel subsample per image as they are produced
(:func:`glad_runtime.core.calibration.sample_pixels`), so memory stays ``N * pixels_per_image`` floats whatever the resolution.
Images are scored by :meth:`glad_runtime.detector.Detector.score_files`, the loop ``glad detect`` and ``glad eval`` use. Torch-free: the pipeline may run on any :class:`~glad_runtime.engines.Engines` backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from glad_runtime.detector import Detector
from glad_runtime.errors import ImageLoadError
from glad_runtime.core.calibration import PIXELS_PER_IMAGE, CalibrationError, sample_pixels

__all__ = ["ScoredImages", "score_images"]


@dataclass
class ScoredImages:
    """Pipeline results of calibration images.

    Attributes:
        paths: the N image files, in input order.
        scores: float64 ``[N]`` raw image scores (``PipelineOutput.scores``).
        pixels: N float32 arrays ``[k]``: sampled anomaly-map values (map at ``dino_resolution``).
        mask_pixels: N bool arrays ``[k]`` of the ground truth at the same positions, or None (no masks given).
    """

    paths: list[Path]
    scores: np.ndarray
    pixels: list[np.ndarray]
    mask_pixels: list[np.ndarray] | None = None


def score_images(detector: Detector, paths: Sequence[str | Path], *,
                 mask_paths: Sequence[str | Path | None] | None = None, batch_size: int = 4,
                 pixels_per_image: int = PIXELS_PER_IMAGE, seed: int = 0, progress: bool = True,
                 desc: str = "calibrate") -> ScoredImages:
    """Score calibration images with ``pipeline``.

    Args:
        detector: the bundle's :class:`Detector` (built as ``glad detect`` builds it; its labels are unused).
        paths: N image files.
        mask_paths: optional N ground-truth mask files (None entries: all-normal mask); read with
            ``training.data.load_mask`` at ``dino_resolution``.
        batch_size: images per pipeline call.
        pixels_per_image, seed: the seeded pixel subsample kept per map.
        progress: tqdm bar on stderr.
    Returns:
        :class:`ScoredImages`.
    Raises:
        CalibrationError: no paths, mask count mismatch, or an image that cannot be read (named); pipeline errors
            (``EngineError``, ``InvalidInputError``) propagate.
    """

    from training.data import load_mask

    paths = [Path(p) for p in paths]
    if not paths:
        raise CalibrationError("no calibration images")
    if mask_paths is not None and len(mask_paths) != len(paths):
        raise CalibrationError(f"{len(mask_paths)} mask paths for {len(paths)} images")
    d = detector.config.dino_resolution
    rng = np.random.default_rng(seed)
    try:
        dets = detector.score_files(paths, batch_size=batch_size, progress=progress, desc=desc)
    except ImageLoadError as e:
        raise CalibrationError(f"cannot read a calibration image: {e}") from e
    pixels, masks = [], []
    for i, det in enumerate(dets):
        mask = None if mask_paths is None else load_mask(mask_paths[i], d)
        v, m = sample_pixels(det.anomaly_map, pixels_per_image, rng, mask)
        pixels.append(v)
        masks.append(m)
    return ScoredImages(paths=paths, scores=np.array([det.score for det in dets], dtype=np.float64), pixels=pixels,
                        mask_pixels=None if mask_paths is None else masks)
