"""Overlays and map PNGs on one scale per bundle (glad_runtime.render), against closed forms written here."""

from __future__ import annotations

import numpy as np
import pytest

from glad_runtime.core.calibration import Calibration
from glad_runtime.core.detection import Detection
from glad_runtime.render import _CMAP as CMAP, PNG_HEADROOM, MapScale, colorize, contour, map_to_png16, overlay, render_detection


@pytest.fixture(scope="module")
def calibration():
    rng = np.random.default_rng(0)
    return Calibration.from_normals(rng.gamma(4, 0.004, 20), pixel_maps=[rng.gamma(4, 0.004, (16, 16)) for _ in range(20)],
                                    target_fpr=0.05, pixel_target_fpr=0.01)


def test_one_scale_per_bundle(calibration):
    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    assert s.vmax == pytest.approx(2 * t) and s.threshold == t
    assert s.png_scale == pytest.approx(65535 / (PNG_HEADROOM * max(calibration.pixel_max, t)))
    faint, hot = np.full((4, 4), 0.01, np.float32), np.full((4, 4), 0.05, np.float32)
    hot[0, 0] = 0.01
    # the same value gets the same colour and the same stored value in both maps
    assert s.png_scale_for(faint) == s.png_scale_for(hot)
    assert (colorize(faint, s.vmax_for(faint))[0, 0] == colorize(hot, s.vmax_for(hot))[0, 0]).all()
    # the threshold is mid-bar: halfway along the colour anchors (numpy interpolation written here)
    mid = np.array([np.interp(3.5, np.arange(len(CMAP)), CMAP[:, c]) for c in range(3)])
    np.testing.assert_allclose(colorize(np.array([[t]]), s.vmax)[0, 0], mid.round(), atol=1)
    # stored values read back as png / scale to within half a level, and clip at the ceiling
    png = map_to_png16(hot, s.png_scale)
    np.testing.assert_allclose(png / s.png_scale, hot, atol=0.5 / s.png_scale)
    assert map_to_png16(np.array([[1e9]]), s.png_scale)[0, 0] == 65535


def test_uncalibrated_fallback_is_per_image():
    s = MapScale.for_bundle(None)
    assert s.vmax is None and "uncalibrated" in s.source
    a = np.array([[0.0, 0.02]], np.float32)
    assert s.vmax_for(a) == pytest.approx(0.02) and s.png_scale_for(a) == pytest.approx(65535 / 0.02)
    assert s.png_scale_for(np.zeros((2, 2))) == 1.0


def test_contour_is_the_mask_boundary():
    m = np.zeros((7, 8), bool)
    m[1:6, 2:7] = True
    m[0, 0] = True
    ref = m.copy()
    ref[2:5, 3:6] = False  # the interior: every 4-neighbour inside the mask
    np.testing.assert_array_equal(contour(m), ref)
    assert not contour(np.zeros((5, 5), bool)).any()


def test_overlay_draws_caption_bar_and_contour(calibration):
    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    amap = np.full((40, 40), 0.5 * t, np.float32)
    amap[10:20, 10:20] = 3 * t
    d = Detection(source="x", score=float(amap.max()), label="anomalous", threshold=calibration.image_threshold,
                  threshold_source="calibration", ads_state="off", adaptive_step=-1, anomaly_map=amap,
                  original_size=(40, 40), pixel_threshold=t)
    img = np.asarray(render_detection(d, np.full((40, 40, 3), 0.5, np.float32), s))
    assert img.shape[0] > 320 and img.shape[1] > 320  # enlarged to MIN_SIDE, plus the caption band and the bar
    assert (img == (0, 255, 255)).all(axis=-1).sum() > 0  # the cyan contour of the defect
    below = d.__class__(**{**d.__dict__, "anomaly_map": np.full((40, 40), 0.5 * t, np.float32)})
    assert not below.defect_mask().any()
    img2 = np.asarray(render_detection(below, np.full((40, 40, 3), 0.5, np.float32), s))
    assert not (img2 == (0, 255, 255)).all(axis=-1).any()
    with pytest.raises(ValueError, match="must match"):
        overlay(np.zeros((4, 4, 3)), np.zeros((5, 5)), scale=s)
