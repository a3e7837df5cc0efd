"""Evaluation metrics of GLAD (spec section 6) with the project's AUPRO decision (project decision 10).

* I-AUROC: ``sklearn.metrics.roc_auc_score``.
* I-AP: average precision from ``sklearn.metrics.precision_recall_curve`` with the exact formula of
  ``sklearn.metrics.average_precision_score`` (``-sum(diff(recall) * precision[:-1])``).
* I-F1max: max of 2PR/(P+R) over ``precision_recall_curve``, NaNs (0/0) dropped.
* P-AUROC / P-AP / P-F1max: the same three scikit-learn computations over all pixels flattened.
* AUPRO: per-region overlap (PRO) over 8-connected ground-truth components, averaged over all regions of all
  images, against the false-positive rate FP/negatives, integrated with the trapezoid rule from FPR 0 to exactly
  ``fpr_limit`` (the curve is interpolated at ``fpr_limit``) and divided by ``fpr_limit``. The official code
  divides by the largest retained FPR instead; project decision 10 fixes that so the value never exceeds 1.

At an operating point (the calibrated thresholds, :func:`operating_point` / :func:`pixel_operating_point`) the
decision rule is the calibration's: anomalous when the raw value is strictly greater than the threshold.

All pixel metrics use every pixel of every image of the category, flattened. Values are in [0, 1] (not x100).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from glad_runtime.errors import InvalidInputError, UsageError

__all__ = ["image_metrics", "pixel_metrics", "aupro", "f1_max", "operating_point", "pixel_operating_point"]


def _check_scores(scores: np.ndarray, what: str) -> np.ndarray:
    s = np.asarray(scores)
    if s.dtype == bool or not np.issubdtype(s.dtype, np.number):
        raise InvalidInputError(f"{what} must be a real-valued array, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.integer):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        raise InvalidInputError(f"{what} contain NaN values ({int(np.isnan(s).sum())} of {s.size})")
    if not np.isfinite(s).all():
        raise InvalidInputError(f"{what} contain infinite values")
    return s


def _check_labels(labels: np.ndarray, what: str, both_classes: bool = True) -> np.ndarray:
    y = np.asarray(labels)
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number):
            raise InvalidInputError(f"{what} must be bool or 0/1, got dtype {y.dtype}")
        bad = ~np.isin(y, (0, 1))
        if bad.any():
            raise InvalidInputError(f"{what} must be binary (bool or 0/1); found values such as {y[bad][:3].tolist()}")
        y = y.astype(bool)
    n_pos = int(y.sum())
    if both_classes and (n_pos == 0 or n_pos == y.size):
        only = "anomalous (1)" if n_pos else "normal (0)"
        raise InvalidInputError(f"{what} contain a single class (all {only}); AUROC/AP/F1 need both classes")
    return y


def _curve_metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, AP, F1max) for flat bool labels ``y`` and float scores ``s`` (already validated)."""
    auroc = float(roc_auc_score(y, s))
    precision, recall, _ = precision_recall_curve(y, s)
    # identical to sklearn.metrics.average_precision_score for binary labels
    ap = float(-np.sum(np.diff(recall) * np.asarray(precision)[:-1]))
    return auroc, ap, _f1_from_pr(precision, recall)


def _f1_from_pr(precision: np.ndarray, recall: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2.0 * precision * recall / (precision + recall)
    f1 = f1[~np.isnan(f1)]
    return float(f1.max()) if f1.size else 0.0


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 = 2PR/(P+R) over ``sklearn.metrics.precision_recall_curve`` (NaNs dropped), spec section 6.

    Args:
        labels: binary labels, any shape (flattened), bool or 0/1.
        scores: float scores, same number of elements, higher = more anomalous.

    Returns:
        float in [0, 1].
    """
    y = _check_labels(np.ravel(labels), "labels")
    s = _check_scores(np.ravel(scores), "scores")
    if y.size != s.size:
        raise InvalidInputError(f"labels and scores differ in length: {y.size} vs {s.size}")
    precision, recall, _ = precision_recall_curve(y, s)
    return _f1_from_pr(precision, recall)


def image_metrics(labels, scores) -> dict[str, float]:
    """Image-level metrics of GLAD (spec section 6).

    Args:
        labels: shape [N], bool or 0/1 (1 = anomalous, i.e. any test folder other than ``good``).
        scores: shape [N], finite floats, higher = more anomalous (any range).

    Returns:
        ``{"I-AUROC", "I-AP", "I-F1max"}``, floats in [0, 1]. AUROC is ``sklearn.metrics.roc_auc_score``; AP equals
        ``sklearn.metrics.average_precision_score``; F1max is the max of 2PR/(P+R) over ``precision_recall_curve``.

    Raises:
        InvalidInputError: empty input, not 1-D, length mismatch, NaN/inf scores, non-binary labels, or a single
        class.
    """
    y = np.asarray(labels)
    s = np.asarray(scores)
    if y.size == 0 or s.size == 0:
        raise InvalidInputError("image_metrics got empty input")
    if y.ndim != 1 or s.ndim != 1:
        raise InvalidInputError(f"labels and scores must be 1-D [N], got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise InvalidInputError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    y = _check_labels(y, "labels")
    s = _check_scores(s, "scores")
    auroc, ap, f1 = _curve_metrics(y, s)
    return {"I-AUROC": auroc, "I-AP": ap, "I-F1max": f1}


def _check_pixel_inputs(masks, maps, both_classes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.size == 0 or a.size == 0:
        raise InvalidInputError("pixel metrics got empty input")
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or a.ndim != 3:
        raise InvalidInputError(
            f"masks and maps must be [N, H, W] (or a single [H, W]), got {np.shape(masks)} and {np.shape(maps)}"
        )
    if m.shape != a.shape:
        raise InvalidInputError(f"masks and maps differ in shape: {m.shape} vs {a.shape}")
    m = _check_labels(m, "masks", both_classes)
    a = _check_scores(a, "maps")
    return m, a


def pixel_metrics(
    masks, maps, fpr_limit: float = 0.3, num_thresholds: int = 200, with_aupro: bool = True
) -> dict[str, float]:
    """Pixel-level metrics of GLAD (spec section 6, project decision 10).

    P-AUROC, P-AP and P-F1max are those of ``roc_auc_score``, ``average_precision_score`` and the
    ``precision_recall_curve`` F1-max over all pixels of all images flattened (scikit-learn; about 30 s for
    300 maps of 256x256 on 2 cores).

    Args:
        masks: ground truth, [N, H, W] bool (or 0/1); a single [H, W] is accepted as N = 1.
        maps: anomaly maps, [N, H, W] finite floats (any range), same shape.
        fpr_limit, num_thresholds: passed to :func:`aupro`.
        with_aupro: set False to skip AUPRO (then the key is absent).

    Returns:
        ``{"P-AUROC", "P-AP", "P-F1max", "AUPRO"}``, floats in [0, 1].

    Raises:
        InvalidInputError: empty input, shape mismatch, NaN/inf in maps, non-binary masks, or a single class over all
        pixels.
    """
    m, a = _check_pixel_inputs(masks, maps)
    a = a.astype(np.float64, copy=False)
    auroc, ap, f1 = _curve_metrics(m.ravel(), a.ravel())
    out = {"P-AUROC": auroc, "P-AP": ap, "P-F1max": f1}
    if with_aupro:
        out["AUPRO"] = _aupro(m, a, fpr_limit, num_thresholds)
    return out


_EIGHT = np.ones((3, 3), dtype=bool)  # skimage.measure.label's default (full) connectivity in 2-D


def aupro(masks, maps, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (spec section 6, project decision 10).

    Definition:
      * thresholds ``t_k = min + k * (max - min) / num_thresholds``, k = 0..num_thresholds-1, over all maps (the
        RD4AD/GLAD grid: evenly spaced in [min, max)); a pixel is predicted anomalous when ``map > t_k``;
      * PRO(t) = mean over every 8-connected ground-truth region of every image of
        (predicted pixels in the region) / (region area);
      * FPR(t) = predicted pixels outside the masks / all pixels outside the masks;
      * the curve also gets its end points (0, 0) (threshold +inf) and (1, 1) (threshold -inf), is ordered by
        decreasing threshold (so FPR and PRO are both non-decreasing), cut at FPR = ``fpr_limit`` with linear
        interpolation at the cut, integrated with the trapezoid rule over [0, fpr_limit] and divided by
        ``fpr_limit``.

    A map equal to the mask gives 1.0, a constant map gives ``fpr_limit / 2`` (the random-ranking diagonal), and
    the value never exceeds 1 (it is clipped to [0, 1] against float rounding). Vectorised over thresholds with
    sorted pixel values and per-region weights 1/area, so it costs a sort of the pixels, not a pass per threshold.

    Args:
        masks: [N, H, W] bool (or 0/1) ground truth (or a single [H, W]); at least one anomalous and one normal
            pixel overall.
        maps: [N, H, W] finite float anomaly maps, same shape.
        fpr_limit: FPR integration limit in (0, 1] (official 0.3).
        num_thresholds: number of thresholds (official 200).

    Returns:
        float in [0, 1].

    Raises:
        InvalidInputError: empty input, shape mismatch, NaN/inf in maps, non-binary masks, a single class.
        UsageError: bad ``fpr_limit`` / ``num_thresholds``.
    """
    m, a = _check_pixel_inputs(masks, maps)
    return _aupro(m, a, fpr_limit, num_thresholds)


def _aupro(
    m: np.ndarray, a: np.ndarray, fpr_limit: float, num_thresholds: int
) -> float:
    if not (0.0 < float(fpr_limit) <= 1.0):
        raise UsageError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if int(num_thresholds) < 1:
        raise UsageError(f"num_thresholds must be >= 1, got {num_thresholds}")
    fpr_limit = float(fpr_limit)
    n = int(num_thresholds)

    lo, hi = float(a.min()), float(a.max())
    thresholds = lo + (hi - lo) * (np.arange(n, dtype=np.float64) / n)
    thresholds = thresholds[::-1]  # decreasing threshold -> increasing FPR and PRO

    # region ids for every positive pixel, numbered across images
    labels = np.zeros(m.shape, dtype=np.int32)
    n_regions = 0
    for i in range(m.shape[0]):
        lab, k = ndimage.label(m[i], structure=_EIGHT)
        if k:
            labels[i] = np.where(lab > 0, lab + n_regions, 0)
            n_regions += k
    pos_ids = labels[m] - 1
    areas = np.bincount(pos_ids, minlength=n_regions).astype(np.float64)

    # PRO(t) = (1/R) * sum over positive pixels with value > t of 1/area(region)
    pos_vals = a[m].astype(np.float64, copy=False)
    order = np.argsort(pos_vals, kind="stable")
    pos_sorted = pos_vals[order]
    w_cum = np.concatenate(([0.0], np.cumsum(1.0 / areas[pos_ids[order]])))
    below = np.searchsorted(pos_sorted, thresholds, side="right")  # count of values <= t
    # 1 - (weight of values <= t) / R: exact 1 when no positive pixel is at or below t
    pro = np.clip(1.0 - w_cum[below] / n_regions, 0.0, 1.0)

    neg_sorted = np.sort(a[~m].astype(np.float64, copy=False))
    fp = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="right")
    fpr = fp / neg_sorted.size

    fpr = np.concatenate(([0.0], fpr, [1.0]))
    pro = np.concatenate(([0.0], pro, [1.0]))
    # both are non-decreasing; guard float noise so the cut below is well defined
    fpr = np.maximum.accumulate(fpr)
    pro = np.maximum.accumulate(pro)

    idx = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    if idx >= fpr.size:
        x, y = fpr, pro
    else:
        x0, x1, y0, y1 = fpr[idx - 1], fpr[idx], pro[idx - 1], pro[idx]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x = np.concatenate((fpr[:idx], [fpr_limit]))
        y = np.concatenate((pro[:idx], [y_lim]))
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) * 0.5)) / fpr_limit
    return float(min(max(area, 0.0), 1.0))


def _counts(y: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    return {"TP": int((pred & y).sum()), "FN": int((~pred & y).sum()), "FP": int((pred & ~y).sum()),
            "TN": int((~pred & ~y).sum())}


def _rates(c: dict[str, int]) -> dict[str, float | None]:
    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    precision, recall = ratio(c["TP"], c["TP"] + c["FP"]), ratio(c["TP"], c["TP"] + c["FN"])
    f1 = (2 * precision * recall / (precision + recall) if precision is not None and recall is not None
          and precision + recall > 0 else (0.0 if precision is not None or recall is not None else None))
    return {"precision": precision, "recall": recall, "F1": f1, "FPR": ratio(c["FP"], c["FP"] + c["TN"])}


def operating_point(labels, scores, threshold: float) -> dict:
    """Image-level confusion counts at one threshold (the calibrated operating point of a line).

    Args:
        labels: ground truth, [N] bool or 0/1 (1 = anomalous); one class alone is allowed.
        scores: raw image scores, [N] finite floats.
        threshold: raw image threshold; an image is predicted anomalous when ``score > threshold``
            (:mod:`glad_runtime.core.calibration`'s rule).
    Returns:
        ``{"threshold", "TP", "FN", "FP", "TN", "misses", "false_rejects", "precision", "recall", "F1", "FPR"}``:
        counts are ints (``misses`` = FN, defective images passed as normal; ``false_rejects`` = FP, good images
        rejected); rates are floats in [0, 1], or None when their denominator is 0 (no predicted or no actual
        positives / negatives).
    Raises:
        InvalidInputError: shape mismatch, NaN / inf, non-binary labels. UsageError: a non-finite threshold.
    """
    y = _check_labels(labels, "labels", both_classes=False).ravel()
    s = _check_scores(scores, "scores").ravel()
    if s.shape != y.shape:
        raise InvalidInputError(f"labels and scores differ in shape: {y.shape} vs {s.shape}")
    if not np.isfinite(threshold):
        raise UsageError(f"threshold must be finite, got {threshold}")
    c = _counts(y, s > threshold)
    return {"threshold": float(threshold), **c, "misses": c["FN"], "false_rejects": c["FP"], **_rates(c)}


def pixel_operating_point(masks, maps, pixel_threshold: float) -> dict:
    """Pixel-level counts and rates at the calibrated pixel threshold, over all pixels of all images flattened.

    Args:
        masks: ground truth [N, H, W] bool or 0/1. maps: raw anomaly maps, same shape, finite.
        pixel_threshold: a pixel is predicted defective when its map value is ``> pixel_threshold`` (the rule of
            :func:`glad_runtime.core.regions.defect_mask`).
    Returns:
        ``{"pixel_threshold", "TP", "FN", "FP", "TN", "precision", "recall", "F1", "FPR", "IoU"}`` (counts in
        pixels; rates in [0, 1] or None when undefined).
    Raises:
        InvalidInputError: as :func:`pixel_metrics`. UsageError: a non-finite threshold.
    """
    m, a = _check_pixel_inputs(masks, maps, both_classes=False)
    if not np.isfinite(pixel_threshold):
        raise UsageError(f"pixel_threshold must be finite, got {pixel_threshold}")
    c = _counts(m.ravel(), a.ravel() > pixel_threshold)
    union = c["TP"] + c["FP"] + c["FN"]
    return {"pixel_threshold": float(pixel_threshold), **c, **_rates(c), "IoU": c["TP"] / union if union else None}
