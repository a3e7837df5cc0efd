"""Run a GLAD pipeline over calibration images and keep what a :class:`~glad_runtime.core.calibration.Calibration` needs.

Image scores are kept whole; anomaly maps are reduced to a seeded pixel subsample per image as they are produced
(:func:`glad_runtime.core.calibration.sample_pixels`), so memory stays ``N * pixels_per_image`` floats whatever the resolution.
Images are loaded and preprocessed exactly as ``glad eval`` does (``training.evaluate.load_batches``, the runtime's
loader). Torch-free: the pipeline may run on any :class:`~glad_runtime.engines.Engines` backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from glad_runtime.core.images import ImageLoadError
from glad_runtime.pipeline.batch import GladPipeline

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


def score_images(pipeline: GladPipeline, paths: Sequence[str | Path], *,
                 mask_paths: Sequence[str | Path | None] | None = None, batch_size: int = 4,
                 pixels_per_image: int = PIXELS_PER_IMAGE, seed: int = 0, progress: bool = True,
                 desc: str = "calibrate") -> ScoredImages:
    """Score calibration images with ``pipeline``.

    Args:
        pipeline: the configured pipeline (built from the bundle as ``glad detect`` builds it).
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
    from tqdm import tqdm

    from training.data import load_mask
    from training.evaluate import load_batches

    paths = [Path(p) for p in paths]
    if not paths:
        raise CalibrationError("no calibration images")
    if mask_paths is not None and len(mask_paths) != len(paths):
        raise CalibrationError(f"{len(mask_paths)} mask paths for {len(paths)} images")
    cfg = pipeline.config
    d = cfg.dino_resolution
    rng = np.random.default_rng(seed)
    scores, pixels, masks = [], [], []
    with tqdm(total=len(paths), desc=desc, unit="img", disable=not progress) as bar:
        start = 0
        for batch in _checked(load_batches(paths, cfg.resolution, batch_size)):
            out = pipeline(batch)
            for j in range(len(batch)):
                i = start + j
                mask = None
                if mask_paths is not None:
                    mask = load_mask(mask_paths[i], d)
                v, m = sample_pixels(out.anomaly_maps[j], pixels_per_image, rng, mask)
                pixels.append(v)
                masks.append(m)
            scores.append(np.asarray(out.scores, dtype=np.float64))
            start += len(batch)
            bar.update(len(batch))
    return ScoredImages(paths=paths, scores=np.concatenate(scores), pixels=pixels,
                        mask_pixels=None if mask_paths is None else masks)


def _checked(batches):
    """Re-raise image load errors of a batch generator as CalibrationError (calibration data must be clean)."""
    try:
        yield from batches
    except ImageLoadError as e:
        raise CalibrationError(f"cannot read a calibration image: {e}") from e
