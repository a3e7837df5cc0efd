"""Thresholds and score normalisation that travel with the model (project decision 3).

The official GLAD code min-max normalises scores over the test set, which a production line cannot do. Here a
:class:`Calibration` is computed once from held-out images, stored as ``BUNDLE/calibration.json`` and applied to
every later image on its own:

* :meth:`Calibration.from_normals`: the image threshold is the ``1 - target_fpr`` quantile of the raw scores of
  held-out **normal** images (a target false-positive rate; no defects needed). The pixel threshold is the same
  quantile over the pixels of their anomaly maps.
* :meth:`Calibration.from_labelled`: the image threshold maximises F1 on a labelled set (normal and anomalous
  images; ``sklearn.metrics.precision_recall_curve``, the rule of anomalib's ``F1AdaptiveThreshold``); with
  ground-truth masks the pixel threshold maximises pixel F1 over a seeded pixel subsample.

Decision rule everywhere: an image (pixel) is **anomalous when its raw score is strictly greater than the
threshold**. :meth:`Calibration.normalize` is anomalib's min-max convention
``clip((score - threshold) / (max - min) + 0.5, 0, 1)``: the threshold maps to 0.5, so ``normalized > 0.5``
exactly when the image is anomalous (up to float rounding at the boundary). ``min`` / ``max`` are the smallest and
largest raw scores of the calibration images; scores more than ``(max - min) / 2`` above the threshold saturate at
1 (anomalib issue #1547 notes the same saturation).

This module imports numpy only; scikit-learn is imported inside :func:`f1_optimal_threshold` (the labelled rule).
It never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from glad_runtime.errors import CalibrationError, CalibrationWarning  # noqa: F401 (re-exported)

__all__ = [
    "Calibration", "CalibrationError", "CalibrationWarning", "SCHEMA_VERSION", "MIN_IMAGES", "QUANTILE_STATS",
    "f1_optimal_threshold", "label", "label_for", "Verdict", "quantile_threshold", "sample_pixels", "score_summary",
]

#: Version of the ``calibration.json`` layout; :meth:`Calibration.from_dict` refuses newer versions.
SCHEMA_VERSION = 1
#: Fewest images a calibration accepts (fewer raise :class:`CalibrationError`).
MIN_IMAGES = 5
#: Quantiles of the normal score distribution stored in ``image_stats`` / ``pixel_stats`` (keys ``q50`` ...).
QUANTILE_STATS = (0.5, 0.9, 0.95, 0.99)
#: Default number of pixels kept per anomaly map for pixel thresholds (a seeded uniform subsample).
PIXELS_PER_IMAGE = 16384

RULE_NORMAL_QUANTILE = "normal_quantile"
RULE_F1_OPTIMAL = "f1_optimal"


# ---------------------------------------------------------------------------------------------- checks
def _finite(values: Any, what: str, ndim: int | None = 1) -> np.ndarray:
    """``values`` as float64, checked non-empty, numeric and finite (NaN and inf counted in the message)."""
    a = np.asarray(values)
    if a.dtype == bool or not (np.issubdtype(a.dtype, np.number)):
        raise CalibrationError(f"{what} must be real numbers, got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise CalibrationError(f"{what} must be {ndim}-D, got shape {a.shape}")
    if a.size == 0:
        raise CalibrationError(f"{what} are empty")
    a = a.astype(np.float64, copy=False)
    n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    if n_nan or n_inf:
        raise CalibrationError(f"{what} contain {n_nan} NaN and {n_inf} infinite values (of {a.size}); "
                               "a calibration needs finite scores")
    return a


def _not_constant(a: np.ndarray, what: str) -> None:
    if float(a.max()) == float(a.min()):
        raise CalibrationError(f"{what} are all equal ({float(a[0]):.6g}); a threshold cannot separate anything "
                               "(is the model untrained or the input constant?)")


def _check_fpr(fpr: float, what: str) -> float:
    fpr = float(fpr)
    if not (0.0 < fpr < 1.0):
        raise CalibrationError(f"{what} must be in (0, 1), got {fpr}")
    return fpr


def _binary_labels(labels: Any, n: int, what: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.size != n:
        raise CalibrationError(f"{what} must be 1-D with {n} entries like the scores, got shape {y.shape}")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            raise CalibrationError(f"{what} must be bool or 0/1 (1 = anomalous)")
        y = y.astype(bool)
    return y


# ---------------------------------------------------------------------------------------------- rules
def label_for(score: float, threshold: float) -> str:
    """The decision rule of the toolkit: ``"anomalous"`` when ``score > threshold`` (strictly), else ``"normal"``.

    Args:
        score: one raw image score (float). threshold: the raw image threshold (float).
    """
    return "anomalous" if float(score) > float(threshold) else "normal"


def _override(threshold: float) -> float:
    """A raw-threshold override as a float; CalibrationError when it is not finite (the one override check)."""
    t = float(threshold)
    if not math.isfinite(t):
        raise CalibrationError(f"threshold override must be finite, got {t}")
    return t


@dataclass(frozen=True)
class Verdict:
    """What :func:`label` decides for one raw score (every field None when nothing labels the image)."""

    label: str | None = None
    normalized_score: float | None = None
    threshold: float | None = None
    threshold_source: str | None = None


def label(score: float, calibration: "Calibration | None" = None, threshold: float | None = None) -> Verdict:
    """THE labelling function: every place that turns a raw score into a label calls this one.

    The raw image threshold is ``threshold`` when given (``threshold_source="override"``), else the calibration's
    ``image_threshold`` (``"calibration"``). ``label`` is ``"anomalous"`` when ``score > threshold`` (strictly).
    ``normalized_score`` is :meth:`Calibration.normalize` centred on the threshold in force (so an override
    moves the 0.5 point with it, in process and on the client alike); it needs a calibration's score span.

    Args:
        score: one finite raw image score. calibration: the bundle's calibration or None. threshold: optional
            finite raw-threshold override.
    Returns:
        :class:`Verdict`; all None with neither a calibration nor a threshold (an uncalibrated bundle).
    Raises:
        CalibrationError: a non-finite ``threshold`` or ``score``.
    """
    if calibration is None and threshold is None:
        return Verdict()
    t = calibration.image_threshold if threshold is None else _override(threshold)
    if not math.isfinite(float(score)):
        raise CalibrationError(f"cannot label a non-finite score ({score})")
    norm = None if calibration is None else float(calibration.normalize(float(score), threshold=t))
    return Verdict(label_for(score, t), norm, t, "override" if threshold is not None else "calibration")


def score_summary(values: np.ndarray) -> dict[str, float]:
    """Distribution summary of finite scores.

    Args:
        values: float array, any shape (flattened), finite.
    Returns:
        ``{"n", "mean", "std", "min", "max", "q50", "q90", "q95", "q99"}`` (``std`` with ddof=0; quantiles with
        numpy's default linear method); ``n`` is an int, the rest floats.
    """
    v = np.ravel(np.asarray(values, dtype=np.float64))
    out: dict[str, float] = {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()),
                             "min": float(v.min()), "max": float(v.max())}
    for q, val in zip(QUANTILE_STATS, np.quantile(v, QUANTILE_STATS)):
        out[f"q{round(q * 100)}"] = float(val)
    return out


def quantile_threshold(normal_scores: Any, target_fpr: float, method: str = "linear") -> float:
    """The ``1 - target_fpr`` quantile of normal scores: the raw threshold for a target false-positive rate.

    ``numpy.quantile(normal_scores, 1 - target_fpr, method=method)``; the default ``"linear"`` is numpy's default
    (Hyndman & Fan type 7). With the rule "anomalous when score > threshold" the fraction of these normals flagged is
    at most ``target_fpr`` (up to one order statistic). For a new normal image with a continuous score, the chance
    of exceeding the k-th smallest of n normal scores is (n + 1 - k) / (n + 1); so the FPR on unseen normals is
    only resolved to about ``1 / (n + 1)``: ask for ``target_fpr >= 1 / n``.

    Args:
        normal_scores: float array, any shape (flattened), finite.
        target_fpr: in (0, 1).
        method: any ``numpy.quantile`` method (``"higher"`` gives an observed score, never an interpolation).
    Returns:
        float threshold.
    Raises:
        CalibrationError: empty input, NaN/inf, or ``target_fpr`` outside (0, 1).
    """
    s = _finite(np.ravel(np.asarray(normal_scores)), "normal scores")
    return float(np.quantile(s, 1.0 - _check_fpr(target_fpr, "target_fpr"), method=method))


def f1_optimal_threshold(scores: Any, labels: Any) -> tuple[float, dict[str, float]]:
    """The threshold that maximises F1 = 2PR / (P + R) on a labelled set (anomalous = positive).

    Candidates come from ``sklearn.metrics.precision_recall_curve`` (every distinct score ``t``, predicting
    anomalous when ``score >= t``), as anomalib's ``F1AdaptiveThreshold``. Ties in F1 go to the **lowest**
    candidate (the highest recall). To fit this module's rule "anomalous when score > threshold", the returned
    threshold is the midpoint between the best ``t`` and the next lower distinct score (``nextafter(t, -inf)`` when
    ``t`` is the smallest score), so every score equal to ``t`` stays anomalous and tied scores always share a label.

    Args:
        scores: float [N], finite, not all equal.
        labels: bool or 0/1 [N] (1 = anomalous), both classes present.
    Returns:
        ``(threshold, {"f1", "precision", "recall"})`` at that threshold (floats in [0, 1]).
    Raises:
        CalibrationError: empty input, NaN/inf, length mismatch, non-binary labels, a single class, constant scores.
    """
    from sklearn.metrics import precision_recall_curve

    s = _finite(scores, "scores")
    y = _binary_labels(labels, s.size)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous" if n_pos else "normal"
        raise CalibrationError(f"the labelled set is all {only} ({y.size} images); an F1-optimal threshold needs "
                               "both normal and anomalous images (use the normal-quantile rule, "
                               "Calibration.from_normals, for normal images only)")
    _not_constant(s, "scores")
    precision, recall, thresholds = precision_recall_curve(y, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2.0 * precision * recall / (precision + recall)
    f1 = np.nan_to_num(f1[:-1], nan=0.0)  # the last point (P=1, R=0) has no threshold
    best = int(np.argmax(f1))  # thresholds ascend: the first maximum is the lowest threshold
    t = float(thresholds[best])
    below = s[s < t]
    if below.size:
        thr = (float(below.max()) + t) / 2.0
        if not thr < t:  # adjacent floats
            thr = float(np.nextafter(t, -np.inf))
    else:
        thr = float(np.nextafter(t, -np.inf))
    return thr, {"f1": float(f1[best]), "precision": float(precision[best]), "recall": float(recall[best])}


def sample_pixels(values: Any, max_pixels: int, rng: np.random.Generator,
                  mask: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A uniform random subsample (without replacement) of one anomaly map's pixels, for memory.

    Args:
        values: float map, any shape (flattened).
        max_pixels: keep at most this many pixels (all when the map is smaller).
        rng: the generator (seed it for reproducible calibrations).
        mask: optional bool ground truth of the same size; the same positions are taken.
    Returns:
        ``(float32 [k], bool [k] or None)``, k = min(size, max_pixels), positions in increasing order.
    """
    v = np.ravel(np.asarray(values))
    m = None if mask is None else np.ravel(np.asarray(mask, dtype=bool))
    if m is not None and m.size != v.size:
        raise CalibrationError(f"mask has {m.size} pixels, its map {v.size}")
    if v.size > max_pixels:
        idx = np.sort(rng.choice(v.size, size=int(max_pixels), replace=False))
        v = v[idx]
        m = None if m is None else m[idx]
    return v.astype(np.float32), m


def _pixels(maps: Iterable[Any] | None, masks: Iterable[Any] | None, max_pixels: int, seed: int):
    """Concatenated subsampled pixel values (and mask values) of a sequence of maps, or (None, None)."""
    if maps is None:
        return None, None
    rng = np.random.default_rng(seed)
    maps = list(maps)
    masks = [None] * len(maps) if masks is None else list(masks)
    if len(masks) != len(maps):
        raise CalibrationError(f"{len(masks)} masks for {len(maps)} anomaly maps")
    if not maps:
        raise CalibrationError("no anomaly maps given")
    vals, ms = [], []
    for amap, mask in zip(maps, masks):
        v, m = sample_pixels(amap, max_pixels, rng, mask)
        vals.append(v)
        ms.append(m)
    values = _finite(np.concatenate(vals), "pixel scores")
    return values, (None if ms[0] is None else np.concatenate(ms))


# ---------------------------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class Calibration:
    """Thresholds and normalisation of one detector, computed on held-out images (``calibration.json``).

    Build it with :meth:`from_normals` or :meth:`from_labelled`; store it with ``Bundle.write_calibration``.

    Attributes:
        rule: ``"normal_quantile"`` or ``"f1_optimal"`` (how ``image_threshold`` was chosen).
        image_threshold: raw image score above which an image is anomalous (``score > image_threshold``).
        image_min, image_max: smallest / largest raw score of the calibration images (``image_max > image_min``);
            the min-max span of :meth:`normalize`.
        n_images: images used (``n_normal + n_anomalous``).
        n_normal, n_anomalous: normal and anomalous calibration images (``n_anomalous`` is 0 for the normal rule).
        image_stats: :func:`score_summary` of the normal images' raw scores.
        pixel_threshold: raw anomaly-map value above which a pixel is anomalous, or None (no maps given).
        pixel_rule: ``"normal_quantile"``, ``"f1_optimal"`` or None.
        pixel_min, pixel_max: range of the sampled calibration pixels (for :meth:`normalize_map`), or None.
        pixel_stats: :func:`score_summary` of the sampled normal pixels, or None.
        params: the rule's parameters (``target_fpr``, ``quantile_method``, ``pixel_target_fpr``,
            ``pixels_per_image``, ``seed``, plus whatever the caller adds, e.g. the pipeline seed).
        metrics: the rule evaluated on the calibration images at the threshold (``fpr`` of the normals; with
            labels also ``tpr``, ``precision``, ``f1``; ``pixel_f1`` ...).
        model_checksum: identity of the weights and config the scores came from (``Bundle.model_checksum``), or
            None; a bundle warns when it no longer matches.
        created: UTC time stamp ``YYYY-mm-ddTHH:MM:SSZ``.
        schema_version: layout version of the JSON (:data:`SCHEMA_VERSION`).
    """

    rule: str
    image_threshold: float
    image_min: float
    image_max: float
    n_images: int
    n_normal: int
    n_anomalous: int = 0
    image_stats: dict[str, float] = field(default_factory=dict)
    pixel_threshold: float | None = None
    pixel_rule: str | None = None
    pixel_min: float | None = None
    pixel_max: float | None = None
    pixel_stats: dict[str, float] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    model_checksum: str | None = None
    created: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`CalibrationError` naming the field for an inconsistent value."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise CalibrationError(f"invalid calibration: {msg}")

        need(self.rule in (RULE_NORMAL_QUANTILE, RULE_F1_OPTIMAL), f"unknown rule {self.rule!r}")
        for name in ("image_threshold", "image_min", "image_max"):
            need(isinstance(getattr(self, name), (int, float)) and math.isfinite(getattr(self, name)),
                 f"{name} must be a finite number")
        need(self.image_max > self.image_min, "image_max must exceed image_min")
        need(self.n_images == self.n_normal + self.n_anomalous and self.n_images >= 1,
             "n_images must equal n_normal + n_anomalous (>= 1)")
        need((self.pixel_threshold is None) == (self.pixel_rule is None), "pixel_threshold needs pixel_rule")
        if self.pixel_threshold is not None:
            need(math.isfinite(self.pixel_threshold), "pixel_threshold must be finite")
            need(self.pixel_rule in (RULE_NORMAL_QUANTILE, RULE_F1_OPTIMAL), f"unknown pixel_rule {self.pixel_rule!r}")
            need(self.pixel_min is not None and self.pixel_max is not None and self.pixel_max > self.pixel_min,
                 "pixel_max must exceed pixel_min")

    # ------------------------------------------------------------------ applying it
    def threshold(self, override: float | None = None) -> float:
        """The raw image threshold in force: ``override`` when given (a per-run / per-request choice), else
        ``image_threshold``. Raises CalibrationError for a non-finite override."""
        return self.image_threshold if override is None else _override(override)

    def normalize(self, score: Any, threshold: float | None = None) -> Any:
        """Map raw image scores to [0, 1] with the threshold at 0.5 (anomalib's min-max convention).

        ``clip((score - t) / (image_max - image_min) + 0.5, 0, 1)`` with ``t = threshold(override)``. Monotonic in
        the score; ``> 0.5`` exactly for anomalous images; saturates at 0 / 1 for scores more than half the
        calibration span below / above ``t``.

        Args:
            score: a float or float array of raw scores (any shape).
            threshold: optional raw-threshold override (the normalisation then centres on it).
        Returns:
            float (for a scalar) or float64 array of the input's shape, in [0, 1].
        """
        t = self.threshold(threshold)
        out = np.clip((np.asarray(score, dtype=np.float64) - t) / (self.image_max - self.image_min) + 0.5, 0.0, 1.0)
        return float(out) if out.ndim == 0 else out

    def normalize_map(self, amap: Any, threshold: float | None = None) -> np.ndarray:
        """The pixel version of :meth:`normalize`: ``clip((map - pixel_t) / (pixel_max - pixel_min) + 0.5, 0, 1)``.

        Args:
            amap: float anomaly map(s), any shape. threshold: optional raw pixel-threshold override.
        Returns:
            float32 array of the same shape in [0, 1].
        Raises:
            CalibrationError: the calibration has no pixel threshold (no maps were given).
        """
        if self.pixel_threshold is None:
            raise CalibrationError("this calibration has no pixel threshold (calibrated without anomaly maps)")
        t = self.pixel_threshold if threshold is None else float(threshold)
        a = np.asarray(amap, dtype=np.float64)
        return np.clip((a - t) / (self.pixel_max - self.pixel_min) + 0.5, 0.0, 1.0).astype(np.float32)

    def is_anomalous(self, score: Any, threshold: float | None = None) -> Any:
        """``score > threshold`` (bool, or a bool array for an array of scores); the rule of :func:`label_for`."""
        out = np.asarray(score, dtype=np.float64) > self.threshold(threshold)
        return bool(out) if out.ndim == 0 else out

    def label(self, score: float, threshold: float | None = None) -> str:
        """``"anomalous"`` when ``score > threshold``, else ``"normal"`` (one image; :func:`label_for`)."""
        return label_for(score, self.threshold(threshold))

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (every field, ``schema_version`` included)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Indented JSON of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        """Rebuild from :meth:`to_dict` output.

        Raises:
            CalibrationError: not a dict, missing or newer ``schema_version``, unknown or missing keys, invalid values.
        """
        if not isinstance(d, dict):
            raise CalibrationError(f"calibration must be a JSON object, got {type(d).__name__}")
        version = d.get("schema_version")
        if not isinstance(version, int):
            raise CalibrationError("calibration has no integer schema_version")
        if version > SCHEMA_VERSION:
            raise CalibrationError(f"calibration schema_version {version} is newer than this toolkit's "
                                   f"({SCHEMA_VERSION}); upgrade the toolkit or recalibrate")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CalibrationError(f"unknown calibration keys: {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise CalibrationError(f"incomplete calibration: {e}") from e

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        """Parse :meth:`to_json` output (CalibrationError on bad JSON)."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise CalibrationError(f"calibration is not valid JSON: {e}") from e

    def replace(self, **changes: Any) -> "Calibration":
        """A validated copy with fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ rules
    @classmethod
    def from_normals(cls, image_scores: Any, pixel_maps: Sequence[Any] | None = None, target_fpr: float = 0.01, *,
                     pixel_target_fpr: float | None = None, quantile_method: str = "linear",
                     pixels_per_image: int = PIXELS_PER_IMAGE, seed: int = 0, min_images: int = MIN_IMAGES,
                     model_checksum: str | None = None, extra_params: dict | None = None) -> "Calibration":
        """Calibrate from held-out **normal** images: thresholds for a target false-positive rate.

        ``image_threshold = quantile(image_scores, 1 - target_fpr)`` (:func:`quantile_threshold`, numpy method
        ``quantile_method``); ``pixel_threshold`` the ``1 - pixel_target_fpr`` quantile over the pixels of
        ``pixel_maps`` (a seeded uniform subsample of at most ``pixels_per_image`` per map).

        Args:
            image_scores: float [N] raw image scores (``PipelineOutput.scores``) of normal images not used in
                training, finite, not all equal.
            pixel_maps: optional N anomaly maps (any shapes, e.g. float32 ``[D, D]``; already subsampled 1-D
                pixel arrays are fine).
            target_fpr: wanted fraction of normal images flagged, in (0, 1) (default 1 %).
            pixel_target_fpr: the same for pixels (default: ``target_fpr``).
            quantile_method: ``numpy.quantile`` method ("linear" = numpy's default).
            pixels_per_image, seed: pixel subsampling.
            min_images: fewer normal images raise CalibrationError.
            model_checksum, extra_params: recorded as is.
        Returns:
            a :class:`Calibration` with ``rule="normal_quantile"``; ``metrics["fpr"]`` is the fraction of these
            normals above the threshold.
        Raises:
            CalibrationError: fewer than ``min_images`` scores, NaN/inf scores (counted), constant scores, bad
                ``target_fpr``, map count different from the score count.
        Warns:
            CalibrationWarning: ``N < 1 / target_fpr`` (the quantile then sits at the top order statistics and the
                FPR on new normals is only resolved to about 1 / (N + 1)).
        """
        s = _finite(image_scores, "image scores")
        fpr = _check_fpr(target_fpr, "target_fpr")
        pfpr = _check_fpr(fpr if pixel_target_fpr is None else pixel_target_fpr, "pixel_target_fpr")
        if s.size < min_images:
            raise CalibrationError(f"{s.size} normal images given; a calibration needs at least {min_images} "
                                   f"(and at least 1/target_fpr = {math.ceil(1 / fpr)} for target_fpr {fpr:g})")
        if s.size < 1.0 / fpr:
            warnings.warn(f"{s.size} normal images are too few for target_fpr {fpr:g} (need >= {math.ceil(1 / fpr)}):"
                          " the threshold sits near the largest normal score and the false-positive rate on new "
                          f"images is only resolved to about {1 / (s.size + 1):.3f}", CalibrationWarning, stacklevel=2)
        _not_constant(s, "image scores")
        if pixel_maps is not None and len(pixel_maps) != s.size:
            raise CalibrationError(f"{len(pixel_maps)} anomaly maps for {s.size} image scores")
        thr = quantile_threshold(s, fpr, quantile_method)
        pix, _ = _pixels(pixel_maps, None, pixels_per_image, seed)
        pixel = {}
        if pix is not None:
            _not_constant(pix, "pixel scores")
            pixel = dict(pixel_threshold=quantile_threshold(pix, pfpr, quantile_method), pixel_rule=RULE_NORMAL_QUANTILE,
                         pixel_min=float(pix.min()), pixel_max=float(pix.max()), pixel_stats=score_summary(pix))
        metrics = {"fpr": float((s > thr).mean())}
        if pix is not None:
            metrics["pixel_fpr"] = float((pix > pixel["pixel_threshold"]).mean())
        params = {"target_fpr": fpr, "quantile_method": quantile_method, "seed": int(seed)}
        if pix is not None:
            params |= {"pixel_target_fpr": pfpr, "pixels_per_image": int(pixels_per_image)}
        return cls(rule=RULE_NORMAL_QUANTILE, image_threshold=thr, image_min=float(s.min()), image_max=float(s.max()),
                   n_images=int(s.size), n_normal=int(s.size), image_stats=score_summary(s), **pixel,
                   params=params | dict(extra_params or {}), metrics=metrics, model_checksum=model_checksum,
                   created=_now())

    @classmethod
    def from_labelled(cls, scores: Any, labels: Any, *, pixel_maps: Sequence[Any] | None = None,
                      masks: Sequence[Any] | None = None, pixel_target_fpr: float = 0.01,
                      pixels_per_image: int = PIXELS_PER_IMAGE, seed: int = 0, min_images: int = MIN_IMAGES,
                      model_checksum: str | None = None, extra_params: dict | None = None) -> "Calibration":
        """Calibrate from a labelled set: the F1-optimal image threshold (:func:`f1_optimal_threshold`).

        Normalisation uses the min / max of all given scores; ``image_stats`` describe the normal ones. Pixel
        threshold: with ``masks`` the F1-optimal threshold over a seeded pixel subsample of all maps
        (``pixel_rule="f1_optimal"``); with maps but no masks the ``1 - pixel_target_fpr`` quantile over the
        pixels of the normal images' maps (``"normal_quantile"``); without maps none.

        A labelled set with one class only raises (it does not silently fall back to the normal rule: the caller
        chooses :meth:`from_normals` explicitly).

        Args:
            scores: float [N] raw image scores, finite, not all equal.
            labels: bool or 0/1 [N], 1 = anomalous; both classes present.
            pixel_maps: optional N anomaly maps (any shapes). masks: optional N bool ground truths, each the same
                size as its map (all-False for normal images).
            pixel_target_fpr, pixels_per_image, seed: pixel quantile rule and subsampling.
            min_images: fewer images in total raise CalibrationError.
            model_checksum, extra_params: recorded as is.
        Returns:
            a :class:`Calibration` with ``rule="f1_optimal"``; ``metrics`` hold ``f1``, ``precision``, ``recall``
            (= ``tpr``) and ``fpr`` on these images.
        Raises:
            CalibrationError: too few images, NaN/inf (counted), length mismatch, non-binary labels, a single class,
                constant scores, masks without maps, masks with a single class over all pixels.
        Warns:
            CalibrationWarning: fewer than ``min_images`` images in one class, or a threshold that flags every image.
        """
        s = _finite(scores, "scores")
        y = _binary_labels(labels, s.size)
        if s.size < min_images:
            raise CalibrationError(f"{s.size} labelled images given; a calibration needs at least {min_images}")
        thr, best = f1_optimal_threshold(s, y)
        n_pos = int(y.sum())
        n_neg = int(s.size - n_pos)
        if min(n_pos, n_neg) < min_images:
            warnings.warn(f"the labelled set has {n_neg} normal and {n_pos} anomalous images; an F1-optimal threshold "
                          f"from fewer than {min_images} per class is unreliable", CalibrationWarning, stacklevel=2)
        if thr < s.min():
            warnings.warn("the F1-optimal threshold flags every calibration image as anomalous: the scores do not "
                          "separate the classes", CalibrationWarning, stacklevel=2)
        pfpr = _check_fpr(pixel_target_fpr, "pixel_target_fpr")
        if masks is not None and pixel_maps is None:
            raise CalibrationError("masks given without pixel_maps")
        if pixel_maps is not None and len(pixel_maps) != s.size:
            raise CalibrationError(f"{len(pixel_maps)} anomaly maps for {s.size} image scores")
        pixel: dict[str, Any] = {}
        metrics = {"f1": best["f1"], "precision": best["precision"], "recall": best["recall"],
                   "tpr": float((s[y] > thr).mean()), "fpr": float((s[~y] > thr).mean())}
        params: dict[str, Any] = {"seed": int(seed)}
        if pixel_maps is not None:
            params["pixels_per_image"] = int(pixels_per_image)
            if masks is not None:
                pix, pm = _pixels(pixel_maps, masks, pixels_per_image, seed)
                if not pm.any() or pm.all():
                    raise CalibrationError("the sampled mask pixels have a single class; a pixel F1 threshold needs "
                                           "anomalous and normal pixels")
                pthr, pbest = f1_optimal_threshold(pix, pm)
                normal_pix = pix[~pm]
                pixel = dict(pixel_threshold=pthr, pixel_rule=RULE_F1_OPTIMAL)
                metrics |= {"pixel_f1": pbest["f1"], "pixel_precision": pbest["precision"],
                            "pixel_recall": pbest["recall"]}
            else:
                pix, _ = _pixels([m for m, lab in zip(pixel_maps, y) if not lab], None, pixels_per_image, seed)
                normal_pix = pix
                _not_constant(pix, "pixel scores")
                pixel = dict(pixel_threshold=quantile_threshold(pix, pfpr), pixel_rule=RULE_NORMAL_QUANTILE)
                params |= {"pixel_target_fpr": pfpr, "quantile_method": "linear"}
            pixel |= dict(pixel_min=float(pix.min()), pixel_max=float(pix.max()), pixel_stats=score_summary(normal_pix))
            metrics["pixel_fpr"] = float((normal_pix > pixel["pixel_threshold"]).mean())
        return cls(rule=RULE_F1_OPTIMAL, image_threshold=thr, image_min=float(s.min()), image_max=float(s.max()),
                   n_images=int(s.size), n_normal=n_neg, n_anomalous=n_pos, image_stats=score_summary(s[~y]), **pixel,
                   params=params | dict(extra_params or {}), metrics=metrics, model_checksum=model_checksum,
                   created=_now())

    # ------------------------------------------------------------------ display
    def summary_lines(self) -> list[str]:
        """Human-readable lines: rule, counts, thresholds, the normal score distribution, calibration metrics."""
        st = self.image_stats
        lines = [f"rule: {self.rule} ({', '.join(f'{k}={v}' for k, v in sorted(self.params.items()))})",
                 f"images: {self.n_images} ({self.n_normal} normal, {self.n_anomalous} anomalous)",
                 f"image threshold: {self.image_threshold:.6g} (normalised 0.5; span {self.image_min:.6g} .. "
                 f"{self.image_max:.6g})"]
        if st:
            lines.append("normal scores: " + ", ".join(f"{k} {st[k]:.6g}" for k in
                                                       ("min", "q50", "q90", "q95", "q99", "max", "mean", "std")
                                                       if k in st))
        if self.pixel_threshold is not None:
            lines.append(f"pixel threshold: {self.pixel_threshold:.6g} ({self.pixel_rule})")
        if self.metrics:
            lines.append("on the calibration images: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                   sorted(self.metrics.items())))
        return lines


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
