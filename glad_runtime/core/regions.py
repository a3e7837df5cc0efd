"""Defect regions: the binary mask of an anomaly map at the calibrated pixel threshold and its connected regions.

A pixel is defective when its map value is **strictly greater** than the pixel threshold (the decision rule of
:mod:`glad_runtime.core.calibration`, applied per pixel). Regions are the 8-connected components of that mask
(``scipy.ndimage.label``), computed on the map at the image's **original** size (upright, after EXIF), so the
bounding boxes and areas are in the pixels of the file the line sent. ``glad detect``, the BLS model and therefore
every client get their regions from :func:`find_regions`.

This module imports scipy lazily (a client that only reads served regions never needs it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from glad_runtime.errors import InvalidInputError

__all__ = ["Region", "defect_mask", "find_regions", "MAX_REGIONS"]

#: At most this many regions are reported per image (the highest peaks first); ``area`` of the mask still counts all.
MAX_REGIONS = 100


@dataclass(frozen=True)
class Region:
    """One connected defect region, in pixels of the original image.

    Attributes:
        x, y: top-left corner of the bounding box (column, row; 0-based, inclusive).
        width, height: bounding-box size in pixels (``x + width`` is exclusive).
        area: pixels of the region (<= width * height).
        peak: the maximum anomaly-map value inside the region (raw map units, > the pixel threshold).
        mean: the mean anomaly-map value over the region's pixels.
    """

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float
    mean: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ints and finite floats (``{"x", "y", "width", "height", "area", "peak", "mean"}``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["x"]), int(d["y"]), int(d["width"]), int(d["height"]), int(d["area"]),
                   float(d["peak"]), float(d["mean"]))


def defect_mask(amap: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """``amap > pixel_threshold`` as bool ``[H, W]``.

    Args:
        amap: float anomaly map ``[H, W]`` (raw map units, finite).
        pixel_threshold: the calibration's ``pixel_threshold`` (finite).
    Raises:
        InvalidInputError: a map that is not 2-D or not finite, or a non-finite threshold.
    """
    a = np.asarray(amap)
    if a.ndim != 2:
        raise InvalidInputError(f"anomaly map must be [H, W], got {list(a.shape)}")
    if not np.isfinite(float(pixel_threshold)):
        raise InvalidInputError(f"pixel threshold must be finite, got {pixel_threshold}")
    if not np.isfinite(a).all():
        raise InvalidInputError("anomaly map contains NaN or Inf")
    return a > float(pixel_threshold)


def find_regions(amap: np.ndarray, pixel_threshold: float, *, max_regions: int = MAX_REGIONS
                 ) -> tuple[np.ndarray, list[Region]]:
    """The defect mask of ``amap`` and its 8-connected regions, highest peak first.

    Args:
        amap: float anomaly map ``[H, W]`` at the image's original size (``Detection.map_at_original_size``).
        pixel_threshold: raw pixel threshold (strictly greater is defective).
        max_regions: keep at most this many regions (by peak, then area).
    Returns:
        ``(mask bool [H, W], [Region, ...])``; no regions when no pixel exceeds the threshold.
    Raises:
        InvalidInputError: see :func:`defect_mask`.
    """
    from scipy import ndimage

    mask = defect_mask(amap, pixel_threshold)
    if not mask.any():
        return mask, []
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    # statistics over the defect pixels only (the same values as over the whole map, whose other pixels carry
    # label 0): memory grows with the defect area, not the image (issue 27: maps of 80+ MP images)
    lab = labels[mask]
    a = np.asarray(amap)[mask].astype(np.float64)
    index = np.arange(1, n + 1)
    areas = np.bincount(lab, minlength=n + 1)[1:]
    peaks = ndimage.maximum(a, lab, index)
    means = ndimage.mean(a, lab, index)
    del lab, a
    regions = []
    for k, sl in enumerate(ndimage.find_objects(labels)):
        rows, cols = sl
        regions.append(Region(x=int(cols.start), y=int(rows.start), width=int(cols.stop - cols.start),
                              height=int(rows.stop - rows.start), area=int(areas[k]), peak=float(peaks[k]),
                              mean=float(means[k])))
    regions.sort(key=lambda r: (-r.peak, -r.area, r.y, r.x))
    return mask, regions[:max(0, int(max_regions))]
