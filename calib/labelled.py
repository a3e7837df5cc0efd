"""Threshold calibration from image files: held-out normal images, optionally with a labelled set.

:func:`calibrate_images` is what ``glad calibrate`` (without ``--quantize``) runs: it scores the images with a
:class:`~glad_runtime.detector.Detector` (:func:`calib.collect.score_images`) and fits a
:class:`~glad_runtime.core.calibration.Calibration`:

* normal images only: the image threshold is their (1 - target FPR) quantile, the pixel threshold the same
  quantile over their sampled pixels (:meth:`Calibration.from_normals`);
* with a labelled set (good/ plus one folder per defect, or an MVTec-format category, see
  :func:`training.data.labelled_samples`): the normals are pooled with the labelled set's images and the image
  threshold is F1-optimal; the pixel threshold is F1-optimal over the masks when the set has them, else the normal
  quantile (:meth:`Calibration.from_labelled`).

Torch-free; the detector may run on any backend. Writing the result is the caller's (``Bundle.write_calibration``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from glad_runtime.core.calibration import PIXELS_PER_IMAGE, Calibration
from glad_runtime.errors import PathNotFoundError

__all__ = ["calibrate_images", "labelled_set"]


def labelled_set(folder: str | Path) -> list:
    """The labelled images of ``folder`` (:func:`training.data.labelled_samples`: label 0 for ``good``, 1 for the
    other folders, masks where the layout has them).

    Raises:
        PathNotFoundError: (a UsageError) the folder has neither ``test/`` nor ``good/``, or no images.
    """
    from training.data import labelled_samples

    try:
        return labelled_samples(folder)
    except PathNotFoundError as e:
        raise PathNotFoundError(f"labelled set {folder}: {e}") from e


def calibrate_images(detector, normal_paths: Sequence[str | Path], *, labelled: str | Path | None = None,
                     target_fpr: float = 0.01, seed: int = 0, batch_size: int = 4,
                     pixels_per_image: int = PIXELS_PER_IMAGE, progress: bool = True,
                     model_checksum: str | None = None, extra_params: dict | None = None) -> Calibration:
    """Score held-out images with ``detector`` and fit the calibration (see the module docstring for the rules).

    Args:
        detector: the bundle's :class:`~glad_runtime.detector.Detector` (its own calibration is unused).
        normal_paths: normal image files the model was not trained on.
        labelled: a labelled folder (:func:`labelled_set`), or None for the normal rule.
        target_fpr: fraction of normal images (and pixels) flagged by the normal rule; the pixel rule's FPR when
            the labelled set has no masks.
        seed: pixel sampling seed (the labelled images use ``seed + 1``).
        batch_size: images per pipeline call. pixels_per_image: anomaly-map pixels sampled per image.
        progress: tqdm bars on stderr.
        model_checksum: the bundle's model checksum, recorded in the calibration.
        extra_params: recorded in ``Calibration.params`` (with a labelled set, ``labelled_dir`` is added).
    Returns:
        the :class:`~glad_runtime.core.calibration.Calibration` (not written anywhere).
    Raises:
        UsageError: a labelled folder without ``good/`` or ``test/`` (checked before any image is scored).
        CalibrationError: no or unreadable images, too few images, a labelled set with one class, non-finite or
            constant scores. Pipeline errors (``EngineError``, ...) propagate.
    """
    from calib.collect import score_images

    samples = labelled_set(labelled) if labelled is not None else None
    common = dict(batch_size=batch_size, pixels_per_image=pixels_per_image, progress=progress)
    extra = dict(extra_params or {})
    normals = score_images(detector, normal_paths, seed=seed, desc="calibrate normals", **common)
    if samples is None:
        return Calibration.from_normals(normals.scores, normals.pixels, target_fpr, seed=seed,
                                        pixels_per_image=pixels_per_image, model_checksum=model_checksum,
                                        extra_params=extra)
    with_masks = any(t.mask_path is not None for t in samples)
    lab = score_images(detector, [t.path for t in samples], seed=seed + 1, desc="calibrate labelled",
                       mask_paths=[t.mask_path for t in samples] if with_masks else None, **common)
    scores = np.concatenate([normals.scores, lab.scores])
    labels = np.concatenate([np.zeros(len(normals.scores), bool), [t.label == 1 for t in samples]])
    maps = normals.pixels + lab.pixels
    masks = [np.zeros(len(v), bool) for v in normals.pixels] + lab.mask_pixels if with_masks else None
    return Calibration.from_labelled(scores, labels, pixel_maps=maps, masks=masks, pixel_target_fpr=target_fpr,
                                     seed=seed, pixels_per_image=pixels_per_image, model_checksum=model_checksum,
                                     extra_params=extra | {"labelled_dir": str(Path(labelled).resolve())})
