"""The GLAD metric families of the served BLS models: their known label values and histogram buckets (issue 27).

Pure Python and numpy (no Triton), so the rules are unit-tested; ``triton_models/python/glad_bls.py``
(``Metrics``) creates the families through Triton's custom metrics API from these values. Every family is exported
at zero from the model's start with each label value listed here, so an alert on a rate or a ratio reads 0, never
"no data"; values outside the lists (another error class, say) still appear when first counted.

Buckets: ``glad_score`` (raw image score) around the bundle's calibrated threshold (:func:`score_buckets`), else a
1-2-5 log grid; ``glad_normalized_score`` in [0, 1] finer near the threshold 0.5; ``glad_adaptive_step`` tenths of
the DDIM range.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["IMAGE_LABELS", "ERROR_TYPES", "ABANDON_REASONS", "ADS_STATES", "REJECT_REASONS", "MALFORMED_REASONS",
           "THRESHOLD_FACTORS", "DEFAULT_SCORE_BUCKETS", "known_series", "score_buckets",
           "normalized_score_buckets", "adaptive_step_buckets"]

#: ``glad_images_total{label}``: the calibrated verdict, or ``unlabelled`` (a bundle without calibration).
IMAGE_LABELS = ("normal", "anomalous", "unlabelled")
#: ``glad_errors_total{type}``: the per-image error classes (``glad_runtime.errors``) a served image can end in.
#: ``ImageTooLargeError`` counts oversized images.
ERROR_TYPES = ("ImageLoadError", "UnsupportedImageError", "ImageTooLargeError", "InvalidInputError", "EngineError")
#: ``glad_requests_abandoned_total{reason}``.
ABANDON_REASONS = ("cancelled", "deadline")
#: ``glad_ads_decisions_total{state}``: ``glad_runtime.core.detection.ADS_STATES``.
ADS_STATES = ("off", "triggered", "forced", "undecided")
#: ``glad_requests_rejected_total{reason}`` (in-flight model only).
REJECT_REASONS = ("pool_full", "closing")
#: ``glad_requests_malformed_total{reason}``: requests refused whole as malformed: ``empty`` (no image),
#: ``no_input`` (neither input), ``both_inputs``, ``too_many_images``, ``bad_parameter`` (a request parameter),
#: ``bad_tensor`` (the tensor input's shape / dtype / values).
MALFORMED_REASONS = ("empty", "no_input", "both_inputs", "too_many_images", "bad_parameter", "bad_tensor")

#: ``glad_score`` bounds as multiples of the calibrated image threshold: dense within +-20 % (the operating point),
#: coarse tails to 0.1x and 10x.
THRESHOLD_FACTORS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0)
#: ``glad_score`` bounds without a calibration: 1-2-5 per decade from 1e-3 to 100.
DEFAULT_SCORE_BUCKETS = tuple(float(f"{m}e{e}") for e in range(-3, 2) for m in (1, 2, 5)) + (100.0,)

#: A bound closer than this (relative) to one already kept is dropped (the threshold factors win).
_MERGE_RTOL = 1e-3


def known_series(inflight: bool = False) -> list[tuple[str, str, dict[str, str]]]:
    """``(family, kind, labels)`` of every GLAD series exported at zero when a model starts (labels without
    ``model``); ``kind`` is ``COUNTER``, ``GAUGE`` or ``HISTOGRAM``. ``inflight``: the in-flight model (adds
    ``glad_requests_rejected_total`` and the gauge ``glad_inflight_images``)."""
    out: list[tuple[str, str, dict[str, str]]] = []

    def counter(name: str, label: str | None = None, values: tuple[str, ...] = ()) -> None:
        out.extend([(name, "COUNTER", {label: v}) for v in values] if label else [(name, "COUNTER", {})])

    counter("glad_images_total", "label", IMAGE_LABELS)
    counter("glad_errors_total", "type", ERROR_TYPES)
    counter("glad_requests_abandoned_total", "reason", ABANDON_REASONS)
    counter("glad_ads_decisions_total", "state", ADS_STATES)
    counter("glad_requests_malformed_total", "reason", MALFORMED_REASONS)
    counter("glad_ddim_steps_saved_total")
    if inflight:
        counter("glad_requests_rejected_total", "reason", REJECT_REASONS)
        out.append(("glad_inflight_images", "GAUGE", {}))
    out += [(h, "HISTOGRAM", {}) for h in ("glad_adaptive_step", "glad_score", "glad_normalized_score")]
    return out


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _positive(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _round(x: float) -> float:
    """``x`` to 6 significant digits (readable ``le`` labels: 0.93, not 0.9299999999999999)."""
    return float(f"{x:.6g}")


def score_buckets(calibration: Any = None, factors: tuple[float, ...] = THRESHOLD_FACTORS,
                  default: tuple[float, ...] = DEFAULT_SCORE_BUCKETS) -> list[float]:
    """Upper bounds of the ``glad_score`` histogram (sorted, strictly increasing, positive; ``+Inf`` is implicit).

    With a calibration (a :class:`~glad_runtime.core.calibration.Calibration` or its ``to_dict()``) whose
    ``image_threshold`` is positive: ``image_threshold * factors`` (the threshold itself is a bound, its neighbours
    within 5 % with the default factors; the bucket ``le=threshold`` counts exactly the images labelled normal),
    the other multiples rounded to 6 significant digits, plus the normal-score quantiles the calibration keeps
    (``image_stats["q50" / "q90" / "q95" / "q99"]``) where positive; a bound within 0.1 % of one already kept is
    dropped, so the threshold stays exact. Otherwise (no calibration, or a threshold <= 0 that multiples cannot
    bracket): ``default``, a 1-2-5 grid from 1e-3 to 100.
    """
    t = None if calibration is None else _positive(_field(calibration, "image_threshold"))
    if t is None:
        return sorted({float(b) for b in default if _positive(b)})
    kept = sorted({_round(t * float(f)) for f in factors if _positive(f) and float(f) != 1.0} | {t})
    stats = _field(calibration, "image_stats") or {}
    extra = [_positive(v) for k, v in stats.items() if re.fullmatch(r"q\d+", str(k))] if isinstance(stats, dict) else []
    for q in sorted(_round(v) for v in extra if v is not None):
        if all(abs(q - b) > _MERGE_RTOL * b for b in kept):
            kept.append(q)
    return sorted(kept)


def normalized_score_buckets() -> list[float]:
    """Upper bounds of ``glad_normalized_score`` (in [0, 1], threshold at 0.5): tenths plus 0.45 and 0.55."""
    return sorted({round(0.1 * k, 10) for k in range(1, 11)} | {0.45, 0.55})


def adaptive_step_buckets(t_max: int) -> list[int]:
    """Upper bounds of ``glad_adaptive_step``: tenths of ``[0, t_max]`` (``t_max`` at least 1), distinct ints."""
    top = max(1, int(t_max))
    return sorted({int(round(top * k / 10)) for k in range(1, 11)})
