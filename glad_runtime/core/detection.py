"""The one per-image result type of the toolkit: :class:`Detection`.

``glad detect``, :class:`~glad_runtime.detector.Detector`, evaluation, calibration, the quantisation gate, the
benchmarks, the step-level stream, the BLS model and the client SDK all hand back this type, with the same field
names. Labels come from the one labelling rule, :func:`glad_runtime.core.calibration.label`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from glad_runtime.errors import UsageError

__all__ = ["Detection", "ADS_STATES", "ads_state"]

#: ``ads_state`` values, in the order of their served code (``ads_states`` INT8 on the wire: 0, 1, 2, 3):
#: ``off`` ADS disabled (the fixed ``t_max`` path); ``triggered`` decided by a SAFF trigger (ADS score > tau);
#: ``forced`` decided at the last candidate step without a trigger; ``undecided`` ADS on, no decision (only possible
#: with ``min_step`` <= 1).
ADS_STATES = ("off", "triggered", "forced", "undecided")


def ads_state(ads_enabled: bool, adaptive_step: int, saff_triggered: bool) -> str:
    """The explicit ADS outcome of one image (one of :data:`ADS_STATES`), from the pipeline's per-image fields."""
    if not ads_enabled:
        return "off"
    if adaptive_step < 0:
        return "undecided"
    return "triggered" if saff_triggered else "forced"


@dataclass
class Detection:
    """The result for one image.

    Attributes:
        source: the input's name (file path, the caller's key, or ``"#<index>"`` for arrays / bytes).
        score: raw image score, the top-K mean of the anomaly map (spec section 5; >= 0, uncalibrated).
        normalized_score: calibrated score in [0, 1] with the threshold at 0.5 (None without a calibration).
        label: ``"anomalous"`` when ``score > threshold`` (strictly) else ``"normal"``; None when neither a
            calibration nor a threshold override applies.
        threshold: the raw image threshold used; threshold_source ``"calibration"`` or ``"override"``.
        adaptive_step: DDIM timestep where ADS decided (first seed); -1 when ADS is off or never decided.
        ads_state: the ADS outcome, explicit: one of :data:`ADS_STATES` (``off``, ``triggered``, ``forced``,
            ``undecided``).
        ads_score: the top-10 ADS distance at the decision (None when ADS never decided).
        saff_triggered: True when the decision was a SAFF trigger (ADS score > tau), False when forced.
        pixel_threshold: the raw pixel threshold the regions were found with (the calibration's), or None: no
            pixel calibration, so ``regions`` is None (not computed), never an empty guess.
        regions: the connected defect regions (:class:`~glad_runtime.core.regions.Region`, original-image
            pixels, highest peak first); ``[]`` when no pixel exceeds ``pixel_threshold``.
        anomaly_map: float32 ``[D, D]`` at ``dino_resolution`` (not serialised by :meth:`to_dict`).
        reconstruction: float32 ``[3, R, R]`` in about [-1, 1] when asked for (evaluation reports; not serialised).
        original_size: ``(H, W)`` of the decoded input (None for preprocessed arrays).
        image_mode: the Pillow mode of the decoded file (``"L"``, ``"I;16"``, ``"RGB"``, ...).
        map_file, overlay_file, mask_file, map_png_scale: what ``glad detect`` wrote (16-bit map value =
            png / scale; one scale per bundle when calibrated, see ``glad_runtime.render``).
        timings_s: seconds per image in each pipeline stage (the batch's times divided by its size).
        ticks: step-level stream only: scheduler ticks from admission to result.
        server: client SDK only: the URL that answered.
        error: None, or the :class:`~glad_runtime.errors.GladError` that failed this image alone (its batch mates
            complete); the score fields are then None.
    """

    source: str
    score: float | None = None
    normalized_score: float | None = None
    label: str | None = None
    threshold: float | None = None
    threshold_source: str | None = None
    adaptive_step: int | None = None
    ads_state: str | None = None
    ads_score: float | None = None
    saff_triggered: bool | None = None
    pixel_threshold: float | None = None
    regions: list | None = None
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    reconstruction: np.ndarray | None = field(default=None, repr=False, compare=False)
    original_size: tuple[int, int] | None = None
    image_mode: str | None = None
    map_file: str | None = None
    overlay_file: str | None = None
    mask_file: str | None = None
    map_png_scale: float | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    ticks: int | None = None
    server: str | None = None
    error: Exception | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        """True when the image was scored (no error)."""
        return self.error is None

    @property
    def error_type(self) -> str | None:
        """The error's class name (``"ImageLoadError"``, ``"EngineError"``, ...) or None."""
        return None if self.error is None else type(self.error).__name__

    def map_at_original_size(self) -> np.ndarray:
        """The anomaly map resized (bilinear) to the input's original size (as ``glad detect`` writes it;
        :meth:`~glad_runtime.core.images.Preprocessor.map_to_original`).

        Raises:
            UsageError: the detection has no map (it failed, or the map was not kept).
        """
        from glad_runtime.core.images import Preprocessor

        if self.anomaly_map is None:
            raise UsageError(f"{self.source}: no anomaly map ({self.error})")
        if self.original_size is None:
            return self.anomaly_map
        return Preprocessor.map_to_original(self.anomaly_map, self.original_size)

    def defect_mask(self) -> np.ndarray:
        """bool ``[H, W]`` at the original size: ``map_at_original_size() > pixel_threshold`` (the pixels the
        regions were found in).

        Raises:
            UsageError: no map, or no pixel threshold (uncalibrated for pixels).
        """
        from glad_runtime.core.regions import defect_mask

        if self.pixel_threshold is None:
            raise UsageError(f"{self.source}: no pixel threshold (the bundle is not calibrated for pixels)")
        return defect_mask(self.map_at_original_size(), self.pixel_threshold)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: every field but the arrays; ``error`` as its message plus ``error_type``;
        non-finite floats as None (JSON has no NaN)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("anomaly_map", "reconstruction"):
                continue
            v = getattr(self, f.name)
            if f.name == "error":
                v = None if v is None else str(v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = None
            elif isinstance(v, tuple):
                v = list(v)
            elif f.name == "regions" and v is not None:
                v = [r.to_dict() for r in v]
            out[f.name] = v
        out["error_type"] = self.error_type
        return out
