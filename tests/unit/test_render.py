"""Overlays and map PNGs on one scale per bundle (glad_runtime.render), against closed forms written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from glad_runtime.core.calibration import Calibration
from glad_runtime.core.detection import Detection
from glad_runtime.core.regions import find_regions
from glad_runtime.render import (_CMAP, MIN_SIDE, PNG_HEADROOM, MapScale, colorize, contour, map_to_png16, overlay,
                                 png16_to_map, render_detection)

CYAN = (0, 255, 255)


@pytest.fixture(scope="module")
def calibration():
    rng = np.random.default_rng(0)
    return Calibration.from_normals(rng.gamma(4, 0.004, 20),
                                    pixel_maps=[rng.gamma(4, 0.004, (16, 16)) for _ in range(20)],
                                    target_fpr=0.05, pixel_target_fpr=0.01)


def _is(img: np.ndarray, rgb) -> np.ndarray:
    return (img == rgb).all(axis=-1)


def _detection(amap, calibration, t, **kw):
    _, regions = find_regions(amap, t)
    score = float(np.sort(amap.ravel())[-10:].mean())
    lab = "anomalous" if score > calibration.image_threshold else "normal"
    return Detection(source="x", score=score, label=lab, threshold=calibration.image_threshold,
                     threshold_source="calibration", ads_state="off", adaptive_step=-1, anomaly_map=amap,
                     original_size=amap.shape, pixel_threshold=t, regions=regions, **kw)


def test_one_scale_per_bundle(calibration):
    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    assert s.source == "calibration" and not s.per_image
    assert s.vmax == pytest.approx(2 * t) and s.threshold == t
    assert s.png_scale == pytest.approx(65535 / (PNG_HEADROOM * max(calibration.pixel_max, t)))
    faint, hot = np.full((4, 4), 0.01, np.float32), np.full((4, 4), 0.05, np.float32)
    hot[0, 0] = 0.01
    # two maps of one bundle: the same PNG scale, and the same value gets the same colour and the same level
    assert s.png_scale_for(faint) == s.png_scale_for(hot) == s.png_scale
    assert (colorize(faint, s.vmax_for(faint))[0, 0] == colorize(hot, s.vmax_for(hot))[0, 0]).all()
    assert map_to_png16(faint, s.png_scale)[0, 0] == map_to_png16(hot, s.png_scale)[0, 0] == round(0.01 * s.png_scale)
    # the threshold is mid-bar: halfway along the colour anchors (numpy interpolation written here)
    mid = np.array([np.interp(3.5, np.arange(len(_CMAP)), _CMAP[:, c]) for c in range(3)])
    np.testing.assert_allclose(colorize(np.array([[t]]), s.vmax)[0, 0], mid.round(), atol=1)
    # stored values read back as png / scale to within half a level, and clip at the ceiling
    png = map_to_png16(hot, s.png_scale)
    assert png.dtype == np.uint16
    np.testing.assert_allclose(png16_to_map(png, s.png_scale), hot, atol=0.5 / s.png_scale)
    assert s.png_ceiling == pytest.approx(PNG_HEADROOM * max(calibration.pixel_max, t))
    assert map_to_png16(np.array([[2 * s.png_ceiling]]), s.png_scale)[0, 0] == 65535


def test_threshold_sits_mid_bar(calibration):
    s = MapScale.for_bundle(calibration)
    out = overlay(np.zeros((64, 64, 3)), np.zeros((64, 64)), scale=s)
    x0, y0, x1, y1 = out.info["layout"]["bar"]
    bar = np.asarray(out)[y0:y1, (x0 + x1) // 2]
    assert y1 - y0 == 64 * out.info["layout"]["enlarge"] >= MIN_SIDE
    # row r of the bar shows vmax * (1 - r / (H - 1)): vmax on top, 0 at the bottom (rows 0 and -1 carry ticks)
    n = y1 - y0
    for r in (3, n // 4, n - 4):
        np.testing.assert_array_equal(bar[r], colorize(np.array(s.vmax * (1 - r / (n - 1))), s.vmax))
    # the threshold tick is drawn across the bar at its middle row (vmax = 2 t), in the threshold colour
    mid = (y1 - y0 - 1) / 2
    marked = np.nonzero((bar == (0, 150, 170)).all(-1))[0]
    assert marked.size and abs(marked.mean() - mid) <= 1.5
    # and the colour just outside the mark is the threshold's (halfway along the anchors)
    want = np.array([np.interp(3.5, np.arange(len(_CMAP)), _CMAP[:, c]) for c in range(3)])
    row = int(marked.max()) + 2
    np.testing.assert_allclose(bar[row], want, atol=6)


def test_below_threshold_no_mask_no_contour(calibration):
    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    d = _detection(np.full((40, 40), 0.5 * t, np.float32), calibration, t)
    assert not d.defect_mask().any() and d.regions == []
    out = render_detection(d, np.full((40, 40, 3), 0.5, np.float32), s)
    x0, y0, x1, y1 = out.info["layout"]["image"]
    assert not _is(np.asarray(out)[y0:y1, x0:x1], CYAN).any()


def test_contour_is_the_mask_boundary():
    m = np.zeros((7, 8), bool)
    m[1:6, 2:7] = True
    m[0, 0] = True
    ref = m.copy()
    ref[2:5, 3:6] = False  # the interior: every 4-neighbour inside the mask
    np.testing.assert_array_equal(contour(m), ref)
    rng = np.random.default_rng(1)
    r = rng.random((30, 30)) > 0.4
    p = np.pad(r, 1)
    ref = r & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    np.testing.assert_array_equal(contour(r), ref)
    assert not contour(np.zeros((5, 5), bool)).any()


def test_overlay_draws_caption_bar_and_contour(calibration):
    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    amap = np.full((40, 40), 0.5 * t, np.float32)
    amap[10:20, 10:20] = 3 * t
    d = _detection(amap, calibration, t)
    img = np.asarray(render_detection(d, np.full((40, 40, 3), 0.5, np.float32), s))
    k = int(np.ceil(MIN_SIDE / 40))
    assert img.shape[0] > 40 * k and img.shape[1] > 40 * k  # enlarged, plus the caption band and the bar
    out = render_detection(d, np.full((40, 40, 3), 0.5, np.float32), s)
    lay = out.info["layout"]
    img = np.asarray(out)
    assert lay["enlarge"] == k and lay["caption_band"][3] >= 3 * 14  # three caption lines
    band = img[:lay["caption_band"][3]]
    assert (band != 255).any(-1).sum() > 500  # caption text drawn
    assert _is(band, (200, 0, 0)).any() and d.label == "anomalous"  # the label in red
    # the cyan contour lies exactly on the (enlarged) mask's boundary, inside the defect square
    x0, y0, x1, y1 = lay["image"]
    cyan = _is(img[y0:y1, x0:x1], CYAN)
    big = (amap > t).repeat(k, 0).repeat(k, 1)
    assert cyan.any() and not (cyan & ~big).any()
    np.testing.assert_array_equal(cyan & contour(big), contour(big))
    with pytest.raises(ValueError, match="must match"):
        overlay(np.zeros((4, 4, 3)), np.zeros((5, 5)), scale=s)


def test_uncalibrated_fallback_is_per_image():
    s = MapScale.for_bundle(None)
    assert s.vmax is None and s.per_image and s.source == "per-image (uncalibrated)" and s.png_ceiling is None
    assert "not comparable" in s.caption
    a = np.array([[0.0, 0.02]], np.float32)
    assert s.vmax_for(a) == pytest.approx(0.02) and s.png_scale_for(a) == pytest.approx(65535 / 0.02)
    assert s.png_scale_for(2 * a) == pytest.approx(65535 / 0.04)  # per image: differs between images
    assert s.png_scale_for(np.zeros((2, 2))) == 1.0
    d = Detection(source="x", score=0.01, anomaly_map=np.zeros((8, 8), np.float32), original_size=(8, 8))
    assert np.asarray(render_detection(d, np.zeros((8, 8, 3)), s)).shape[0] > MIN_SIDE


def test_write_outputs_mask_and_one_png_scale(calibration, tmp_path):
    from glad_runtime.output import write_outputs

    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    scales = []
    for name, level in (("good", 0.3), ("bad", 3.0)):
        amap = np.full((24, 32), 0.3 * t, np.float32)
        amap[5:9, 6:12] = level * t
        d = _detection(amap, calibration, t)
        write_outputs(d, amap, np.full((24, 32, 3), 0.5, np.float32), tmp_path, name, "png16", s)
        mask = np.asarray(Image.open(tmp_path / d.mask_file))
        assert mask.dtype == np.uint8 and mask.shape == (24, 32) and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, amap > t)
        png = np.asarray(Image.open(tmp_path / d.map_file))
        np.testing.assert_allclose(png / d.map_png_scale, amap, atol=0.5 / d.map_png_scale)
        assert (tmp_path / d.overlay_file).exists()
        json.dumps(d.to_dict())
        scales.append(d.map_png_scale)
    assert scales[0] == scales[1] == s.png_scale


def test_marks_only_on_an_image_labelled_anomalous(calibration):
    """Issue 32: contour and red boxes mark the defects of an anomalous image; the same hot spot on an image
    labelled normal is not outlined or boxed (its colours still show it) and the caption says it was left out."""
    import dataclasses

    from glad_runtime.render import BOX_RGB

    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    amap = np.full((40, 40), 0.5 * t, np.float32)
    amap[10:20, 10:20] = 3 * t
    bad = _detection(amap, calibration, t)
    assert bad.label == "anomalous" and len(bad.regions) == 1
    passed = dataclasses.replace(bad, label="normal", threshold=bad.score + 1.0, threshold_source="override")
    rgb = np.full((40, 40, 3), 0.5, np.float32)
    pictures = {}
    for name, d in (("bad", bad), ("passed", passed)):
        out = render_detection(d, rgb, s)
        x0, y0, x1, y1 = out.info["layout"]["image"]
        pictures[name] = (np.asarray(out)[y0:y1, x0:x1], out)
    img, _ = pictures["bad"]
    assert _is(img, CYAN).any() and _is(img, BOX_RGB).any()
    img, out = pictures["passed"]
    assert not _is(img, CYAN).any() and not _is(img, BOX_RGB).any()
    # the map's colours are the same in both (only the marks differ): the hot square's centre is drawn alike
    k = out.info["layout"]["enlarge"]
    c = 15 * k
    np.testing.assert_array_equal(pictures["bad"][0][c, c], img[c, c])
    # the caption says what was found and not marked (text pixels in the band; compared with the anomalous one)
    band = np.asarray(out)[:out.info["layout"]["caption_band"][3]]
    assert (band != 255).any(-1).sum() > 500
    assert not _is(band, (200, 0, 0)).any()  # the label is not drawn in the defect red


def test_caption_words_for_each_label(calibration, monkeypatch):
    """The caption lines render_detection passes to overlay: defects, passed (not marked), or no label."""
    import dataclasses

    import glad_runtime.render as render

    seen = {}
    monkeypatch.setattr(render, "overlay", lambda *a, **kw: seen.update(kw) or Image.new("RGB", (1, 1)))
    s = MapScale.for_bundle(calibration)
    t = calibration.pixel_threshold
    amap = np.full((40, 40), 0.5 * t, np.float32)
    amap[10:20, 10:20] = 3 * t
    bad = _detection(amap, calibration, t)
    rgb = np.zeros((40, 40, 3), np.float32)
    render.render_detection(bad, rgb, s)
    assert "1 defect region > " in seen["caption_lines"][1] and seen["mask"] is not None and seen["regions"]
    render.render_detection(dataclasses.replace(bad, label="normal", threshold=1e9), rgb, s)
    line = seen["caption_lines"][1]
    assert "passed: 1 area above pixel threshold" in line and "(100 px), not marked: not defects" in line
    assert seen["mask"] is None and not seen["regions"]
    render.render_detection(dataclasses.replace(bad, label="normal", threshold=1e9, regions=[],
                                                anomaly_map=np.zeros((40, 40), np.float32)), rgb, s)
    assert "passed: no pixel above pixel threshold" in seen["caption_lines"][1]
    render.render_detection(dataclasses.replace(bad, label=None, threshold=None), rgb, s)
    assert "1 region > " in seen["caption_lines"][1] and "no image label" in seen["caption_lines"][1]
    assert seen["mask"] is not None and seen["regions"]
