"""Pictures a person reads: anomaly-map overlays and 16-bit map PNGs on **one scale per bundle**.

Colours and stored map values mean the same thing for every image of a bundle, so a good cell's faint map looks
faint and a defect's looks hot. :meth:`MapScale.for_bundle` chooses the scale from the bundle's calibration
(all values in raw anomaly-map units):

* **calibrated with a pixel threshold** ``t`` (``source="calibration"``): the colour bar spans
  ``[0, vmax]`` with ``vmax = 2 t``, so ``t`` (the defect-mask boundary) sits at the middle of the bar; the
  16-bit PNG stores ``round(value * png_scale)`` with ``png_scale = 65535 / (8 * max(pixel_max, t))``;
* **calibrated with an image threshold only** ``T`` (no maps; ``source="calibration (image threshold)"``):
  ``vmax = 2 T`` and ``png_scale = 65535 / (8 * max(image_stats["max"], T))``;
* **uncalibrated, or a threshold <= 0 (the fallback;** ``source="per-image (uncalibrated)"``): colours span each
  map's own ``[0, max]`` and ``png_scale = 65535 / peak`` per image (1.0 for an all-zero map), as before.

* ``pixel_max`` is the hottest *normal* pixel seen in calibration, so the PNG keeps defects up to 8 times that
  before clipping (:data:`PNG_HEADROOM`); a stored value of 65535 means "at or above the ceiling"
  (:attr:`MapScale.png_ceiling`). A map is read back as ``png / map_png_scale``, to within ``0.5 / png_scale``.
* The image-threshold rule works because the image score is the top-K mean of the same map (spec section 5), so
  it is in map units and sits where the hottest pixels of a borderline image sit.
* In the fallback the colours are **not comparable across images** (a good cell's hotspot is as bright as a
  defect's); the caption of every overlay says so, and each record's ``map_png_scale`` then differs.

**The overlay** (:func:`overlay`, :func:`render_detection`) is the image with the colour-mapped map blended over it
(matplotlib's *inferno* anchors, :data:`_CMAP`; no matplotlib needed), the defect-mask contour in cyan, the regions'
bounding boxes in red (white-edged, so they show on dark and hot colours alike) numbered in the regions' order
(highest peak first), a caption band above the image (score against threshold, label, ADS outcome, region count,
the scale's meaning) and a colour bar on the right labelled 0, the threshold (cyan, marked) and ``vmax``. Images
whose shorter side is under :data:`MIN_SIDE` pixels are first enlarged by an integer factor with nearest-neighbour
resampling, so text drawn at a legible size does not dwarf them and each map cell stays a crisp block; text size
grows with the image (about 1/22 of its shorter side).

**What the marks mean** (:func:`render_detection`): contour and boxes are drawn **only on an image labelled
anomalous**, where they are its defects. An image labelled **normal** (its score is not above the image threshold)
gets neither, even where some pixels exceed the pixel threshold: the image decision says it has no defect, and a
person reads any outline or box as one (issue 32: boxes on passed cells were read as defects). Its hot spots stay
visible in the colours, on the same scale as every other image (the pixel threshold is mid-bar, so above-threshold
pixels are the orange-to-yellow half), and the caption says how many areas are above the pixel threshold and that
they are not marked. Choosing "not drawn" over "drawn differently" (dashed, grey): any second outline style needs a
legend to be read right, and the colours already show the same pixels without suggesting a finding. A detection
without an image label (a pixel threshold but no image threshold) keeps the marks: the pixel rule is then the only
decision there is, and the caption says the image has no label.

numpy and Pillow only (Pillow >= 10.1 for scalable text; older Pillow falls back to its small bitmap font).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from glad_runtime.core.regions import MAX_REGIONS, defect_mask  # a Detection's region list is capped at MAX_REGIONS
from glad_runtime.errors import InvalidInputError

__all__ = ["MapScale", "colorize", "contour", "overlay", "render_detection", "map_to_png16", "png16_to_map",
           "MIN_SIDE", "PNG_HEADROOM"]

#: matplotlib "inferno" anchors (uint8 RGB, low to high), interpolated linearly by :func:`colorize`.
_CMAP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float32)
#: Shorter image side (pixels) below which the overlay is enlarged (nearest neighbour, integer factor) first.
MIN_SIDE = 320
#: The 16-bit PNG's ceiling as a multiple of the calibration's hottest normal value (or its threshold if larger).
PNG_HEADROOM = 8.0
#: Colour of the defect-mask contour and of the threshold mark on the colour bar.
CONTOUR_RGB = (0, 255, 255)
#: Colour of the regions' bounding boxes (red: a defect), drawn over a white edge (:data:`BOX_EDGE_RGB`).
BOX_RGB = (235, 20, 20)
BOX_EDGE_RGB = (255, 255, 255)
#: At most this many bounding boxes are drawn and numbered (the regions come highest peak first); the contour still
#: outlines every region.
MAX_BOXES = 10

SOURCE_CALIBRATION = "calibration"
SOURCE_IMAGE_THRESHOLD = "calibration (image threshold)"
SOURCE_PER_IMAGE = "per-image (uncalibrated)"


@dataclass(frozen=True)
class MapScale:
    """The display and storage scale of one bundle's anomaly maps (raw map units); see the module table.

    Attributes:
        vmax: map value drawn as the hottest colour (> 0), or None in the per-image fallback (each map's maximum).
        source: ``"calibration"``, ``"calibration (image threshold)"`` or ``"per-image (uncalibrated)"``.
        threshold: the value marked on the colour bar (pixel threshold, else image threshold), or None.
        png_scale: 16-bit PNG levels per map unit (> 0), or None in the per-image fallback.
    """

    vmax: float | None
    source: str
    threshold: float | None = None
    png_scale: float | None = None

    @classmethod
    def for_bundle(cls, calibration: Any = None, config: Any = None) -> "MapScale":
        """The bundle's one scale from its :class:`~glad_runtime.core.calibration.Calibration`.

        Args:
            calibration: the bundle's calibration, or None (the documented per-image fallback).
            config: the run's config; accepted for callers that have it, not used by the current rules.
        Returns:
            the :class:`MapScale` of the module table. Never raises: a threshold ``<= 0`` (a degenerate
            calibration) also gives the per-image fallback, keeping the threshold for the caption.
        """
        if calibration is None:
            return cls(None, SOURCE_PER_IMAGE)
        if calibration.pixel_threshold is not None:
            t, hottest, source = calibration.pixel_threshold, calibration.pixel_max, SOURCE_CALIBRATION
        else:
            stats = calibration.image_stats or {}
            t, hottest, source = (calibration.image_threshold, stats.get("max", calibration.image_max),
                                  SOURCE_IMAGE_THRESHOLD)
        t = float(t)
        ceiling = PNG_HEADROOM * max(float(hottest or 0.0), t)
        if not (np.isfinite(t) and t > 0 and np.isfinite(ceiling)):
            return cls(None, SOURCE_PER_IMAGE, t if np.isfinite(t) else None)
        return cls(2.0 * t, source, t, 65535.0 / ceiling)

    @property
    def per_image(self) -> bool:
        """True in the fallback: colours and PNG values are scaled to each image's own maximum."""
        return self.vmax is None

    @property
    def png_ceiling(self) -> float | None:
        """The largest map value the 16-bit PNG stores unclipped (``65535 / png_scale``), None per image."""
        return None if self.png_scale is None else 65535.0 / self.png_scale

    @property
    def caption(self) -> str:
        """One line saying what the colours mean (drawn under the score in every overlay)."""
        if self.per_image:
            return "colours: this image's own max (uncalibrated): not comparable across images"
        what = "pixel threshold" if self.source == SOURCE_CALIBRATION else "image threshold"
        return f"colours: one scale per bundle, {what} at mid-bar"

    def vmax_for(self, amap: np.ndarray) -> float:
        """The colour ceiling for one map: :attr:`vmax`, or the map's own maximum in the fallback."""
        return self.vmax if self.vmax is not None else float(np.max(amap))

    def png_scale_for(self, amap: np.ndarray) -> float:
        """The PNG scale for one map: :attr:`png_scale` (the same for every map of the bundle), or ``65535 / peak``
        in the fallback (1.0 for a map whose peak is <= 0)."""
        if self.png_scale is not None:
            return self.png_scale
        peak = float(np.max(amap))
        return 65535.0 / peak if peak > 0 else 1.0


def map_to_png16(amap: np.ndarray, png_scale: float) -> np.ndarray:
    """Encode a raw map for a 16-bit PNG.

    Args:
        amap: float ``[H, W]`` raw anomaly map (>= 0). png_scale: levels per map unit (> 0).
    Returns:
        uint16 ``[H, W]``: ``round(amap * png_scale)`` clipped to [0, 65535] (65535 = at or above the ceiling).
        The inverse is :func:`png16_to_map` (``png / png_scale``).
    """
    a = np.asarray(amap)
    out = np.empty(a.shape, np.uint16)
    rows = max(1, (1 << 20) // max(1, a.shape[-1] if a.ndim else 1))  # ~8 MB of float64 at a time (issue 27)
    for s in range(0, a.shape[0] if a.ndim else 1, rows):
        part = a[s:s + rows] if a.ndim else a
        out[s:s + rows] = np.round(np.asarray(part, np.float64) * png_scale).clip(0, 65535)
    return out


def png16_to_map(png: np.ndarray, png_scale: float) -> np.ndarray:
    """Decode a stored map: float32 ``png / png_scale`` (``png_scale`` = the record's ``map_png_scale``)."""
    return (np.asarray(png, np.float64) / png_scale).astype(np.float32)


def colorize(amap: np.ndarray, vmax: float) -> np.ndarray:
    """Colour-map values on the inferno anchors.

    Args:
        amap: float array, any shape. vmax: the value drawn brightest (``<= 0``: everything darkest).
    Returns:
        uint8 ``[..., 3]``: 0 (and below) -> ``_CMAP[0]``, ``vmax`` (and above) -> ``_CMAP[-1]``, linear between
        anchors in between (``vmax / 2`` lies exactly halfway along the anchors).
    """
    a = np.asarray(amap, np.float32)
    v = np.clip(a / vmax, 0, 1) if vmax > 0 else np.zeros(a.shape, np.float32)
    pos = v * (len(_CMAP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_CMAP) - 2)
    frac = (pos - lo)[..., None]
    return (_CMAP[lo] * (1 - frac) + _CMAP[lo + 1] * frac).round().astype(np.uint8)


def contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask ``[H, W]``: mask pixels with at least one 4-neighbour outside the mask (the
    image border counts as outside); ``mask & ~binary_erosion(mask)`` with a cross, in numpy."""
    m = np.asarray(mask, bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels in ``font`` (a longer word stays whole;
    a unit ``px`` stays with its number)."""
    words: list[str] = []
    for word in text.split(" "):
        if words and word.startswith("px"):
            words[-1] += " " + word
        else:
            words.append(word)
    out, line = [], ""
    for word in words:
        trial = f"{line} {word}" if line else word
        if line and font.getlength(trial) > width:
            out.append(line.rstrip())
            line = word
        else:
            line = trial
    return out + [line]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def overlay(rgb: np.ndarray, amap: np.ndarray, *, scale: MapScale, mask: np.ndarray | None = None,
            regions: Sequence[Any] = (), caption_lines: Sequence[str | tuple[str, tuple[int, int, int]]] = (),
            alpha: float = 0.5, threshold: float | None = None) -> Image.Image:
    """The colour-mapped anomaly map over the image, with the mask contour, region boxes, caption band and bar.

    Args:
        rgb: float ``[H, W, 3]`` in [0, 1] (the decoded image at its original size).
        amap: float ``[H, W]`` raw anomaly map at the same size.
        scale: the bundle's :class:`MapScale` (the same for every image of a bundle).
        mask: optional bool ``[H, W]`` defect mask; its boundary (:func:`contour`) is drawn in cyan,
            ``max(2, min side / 200)`` px wide, inside the mask.
        regions: :class:`~glad_runtime.core.regions.Region`-like objects (``x, y, width, height`` in original
            pixels); the first :data:`MAX_BOXES` are drawn as red, white-edged boxes numbered 1, 2, ... (pass
            none for an image whose regions are not defects: :func:`render_detection` decides).
        caption_lines: text lines for the band above the image, each a string or ``(text, (r, g, b))``;
            :attr:`MapScale.caption` is appended in grey.
        alpha: map opacity in [0, 1].
        threshold: the value marked on the colour bar (default ``scale.threshold``; not drawn when None or
            outside ``[0, vmax]``).
    Returns:
        an RGB Pillow image: the image (enlarged by ``ceil(MIN_SIDE / min(H, W))`` with nearest neighbour when its
        shorter side is under :data:`MIN_SIDE`), a white caption band above it and a colour bar with tick labels
        to its right; so it is always taller and wider than ``W x H``. ``image.info["layout"]`` gives the
        boxes ``(left, top, right, bottom)`` (right/bottom exclusive) of ``"caption_band"``, ``"image"`` and
        ``"bar"`` (value ``vmax`` in the bar's first row, 0 in its last) and the ``"enlarge"`` factor. Caption
        lines wider than the picture and its bar are wrapped at spaces.
    Raises:
        InvalidInputError: ``rgb`` is not ``[H, W, 3]`` of ``amap``'s size, or ``mask`` has another size.
    """
    rgb, amap = np.asarray(rgb, np.float32), np.asarray(amap, np.float32)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[:2] != amap.shape:
        raise InvalidInputError(f"rgb [H, W, 3] and amap [H, W] must match, got {rgb.shape} and {amap.shape}")
    if mask is not None and np.shape(mask) != amap.shape:
        raise InvalidInputError(f"mask {np.shape(mask)} must match amap {amap.shape}")
    threshold = scale.threshold if threshold is None else float(threshold)
    vmax = scale.vmax_for(amap)
    blend = (1 - alpha) * rgb * 255.0 + alpha * colorize(amap, vmax).astype(np.float32)
    img = Image.fromarray(blend.clip(0, 255).astype(np.uint8))
    h, w = amap.shape
    k = max(1, int(np.ceil(MIN_SIDE / min(h, w))))
    if k > 1:
        img = img.resize((w * k, h * k), Image.Resampling.NEAREST)
    W, H = img.size
    lw = max(2, min(W, H) // 200)  # line width of contours and boxes
    if mask is not None and np.any(mask):
        big = np.asarray(mask, bool)
        if k > 1:
            big = big.repeat(k, 0).repeat(k, 1)
        edge = contour(big)
        grown = edge.copy()
        for _ in range(lw - 1):  # thicken inwards so the outline stays on the defect
            grown |= contour(big & ~grown)
        px = np.asarray(img).copy()
        px[grown] = CONTOUR_RGB
        img = Image.fromarray(px)

    fs = max(16, min(W, H) // 22)
    font, small = _font(fs), _font(max(13, fs * 4 // 5))
    draw = ImageDraw.Draw(img)
    for n, r in enumerate(list(regions)[:MAX_BOXES], 1):
        x0, y0 = r.x * k - lw, r.y * k - lw
        x1, y1 = (r.x + r.width) * k + lw - 1, (r.y + r.height) * k + lw - 1
        draw.rectangle([x0 - 2, y0 - 2, x1 + 2, y1 + 2], outline=BOX_EDGE_RGB, width=2)  # a white edge outside
        draw.rectangle([x0, y0, x1, y1], outline=BOX_RGB, width=lw)
        tx, ty = max(0, x0), y0 - fs - 4 if y0 - fs - 4 >= 0 else y1 + 4
        draw.text((tx, ty), str(n), fill=BOX_RGB, font=small, stroke_width=2, stroke_fill=BOX_EDGE_RGB)

    bar_w, gap = max(16, W // 18), max(10, fs // 2)
    bar_x, pad = W + gap, fs // 2 + 2  # pad: room for the top and bottom tick labels
    ticks = [(0.0, "0", (0, 0, 0)), (vmax, _fmt(vmax) + ("+" if not scale.per_image else ""), (0, 0, 0))]
    if threshold is not None and vmax > 0 and 0 <= threshold <= vmax:
        ticks.append((threshold, f"{_fmt(threshold)} thr", (0, 150, 170)))
    label_w = max(int(small.getlength(t)) for _, t, _ in ticks) + fs
    width = bar_x + bar_w + label_w  # the picture and its bar: captions wrap to it, so text never widens the canvas
    given = [(c, (0, 0, 0)) if isinstance(c, str) else (c[0], tuple(c[1])) for c in caption_lines]
    lines, fonts = [], []
    for (text, colour), f in zip(given + [(scale.caption, (95, 95, 95))], [font] * len(given) + [small]):
        for part in _wrap(text, f, width - 8):
            lines.append((part, colour))
            fonts.append(f)
    line_h = [int(f.getbbox("Ag")[3]) + fs // 3 for f in fonts]
    band = sum(line_h) + fs // 2
    text_w = max(int(f.getlength(t)) for f, (t, _) in zip(fonts, lines)) + 8  # > width only for one unbreakable word
    canvas = Image.new("RGB", (max(width, text_w), band + H + pad), "white")
    canvas.paste(img, (0, band))
    draw = ImageDraw.Draw(canvas)
    y = fs // 4
    for f, (text, colour), dy in zip(fonts, lines, line_h):
        draw.text((4, y), text, fill=colour, font=f)
        y += dy
    ramp = colorize(np.linspace(vmax, 0, H, dtype=np.float32)[:, None].repeat(bar_w, 1), vmax)
    canvas.paste(Image.fromarray(ramp), (bar_x, band))
    draw.rectangle([bar_x - 1, band - 1, bar_x + bar_w, band + H], outline=(0, 0, 0))
    for value, text, colour in ticks:
        ty = band + int(round((1 - min(max(value / vmax, 0.0), 1.0)) * (H - 1))) if vmax > 0 else band + H - 1
        if text.endswith("thr"):  # the threshold: a white-edged line across the bar, visible on any colour
            draw.line([bar_x - gap // 2, ty, bar_x + bar_w + 4, ty], fill=(255, 255, 255), width=max(5, lw + 3))
            draw.line([bar_x - gap // 2, ty, bar_x + bar_w + 4, ty], fill=colour, width=max(3, lw + 1))
        else:
            draw.line([bar_x - gap // 2, ty, bar_x + bar_w + 4, ty], fill=colour, width=2)
        draw.text((bar_x + bar_w + 7, ty), text, fill=colour, font=small, anchor="lm")
    canvas.info["layout"] = {"enlarge": k, "caption_band": (0, 0, canvas.width, band),
                             "image": (0, band, W, band + H), "bar": (bar_x, band, bar_x + bar_w, band + H)}
    return canvas


def render_detection(detection: Any, rgb: np.ndarray, scale: MapScale, *, amap: np.ndarray | None = None,
                     alpha: float = 0.5) -> Image.Image:
    """:func:`overlay` of one :class:`~glad_runtime.core.detection.Detection` with its caption drawn on.

    Caption: ``score 0.0153 <= 0.0201  normal`` / ``score 0.0512 > 0.0201  ANOMALOUS`` (red), with the threshold's
    source when it is an override; ``score 0.0153  uncalibrated: no label`` without a threshold. Second line: the
    ADS outcome (and step) and, with a pixel threshold, what the pixel threshold found. The colour bar marks the
    detection's pixel threshold.

    Marks (the module's "What the marks mean"): an image labelled **anomalous** gets its defect-mask contour and
    numbered region boxes (``2 defect regions > 0.031 (412 px)``); an image labelled **normal** gets neither, and
    its caption says what was left unmarked (``passed: 2 areas above pixel threshold 0.031 (87 px), not marked:
    not defects``); an unlabelled one keeps the marks (``2 regions > 0.031 (412 px), no image label``).

    Args:
        detection: a scored Detection with its map (``anomaly_map`` and ``original_size``), or pass ``amap``.
        rgb: float ``[H, W, 3]`` in [0, 1] at the original size. scale: the bundle's :class:`MapScale`.
        amap: optional float ``[H, W]`` map at the original size (default ``detection.map_at_original_size()``).
        alpha: map opacity.
    Raises:
        UsageError: the detection has no map and none is given. InvalidInputError: the sizes do not match.
    """
    d = detection
    amap = d.map_at_original_size() if amap is None else np.asarray(amap, np.float32)
    if d.label is not None and d.threshold is not None:
        rel = ">" if d.score > d.threshold else "<="
        bad = d.label == "anomalous"
        src = "" if d.threshold_source in (None, "calibration") else f" ({d.threshold_source})"
        head = (f"score {_fmt(d.score)} {rel} {_fmt(d.threshold)}{src}  {'ANOMALOUS' if bad else 'normal'}",
                (200, 0, 0) if bad else (0, 120, 0))
    else:
        head = f"score {_fmt(d.score)}  uncalibrated: no label"
    detail = []
    if d.ads_state is not None:
        step = f" at t={d.adaptive_step}" if d.adaptive_step is not None and d.adaptive_step >= 0 else ""
        detail.append(f"ADS {d.ads_state}{step}")
    mask, regions = None, ()
    if d.pixel_threshold is not None:
        found = defect_mask(amap, d.pixel_threshold)  # the one pixel rule (regions, mask files, the server)
        n = len(d.regions) if d.regions is not None else None
        count = "?" if n is None else f"{n}{'+' if n >= MAX_REGIONS else ''}"
        px, t = int(found.sum()), _fmt(d.pixel_threshold)
        if d.label == "normal":  # passed: above-threshold pixels are not defects; said, never outlined
            if px:
                detail.append(f"passed: {count} area{'s' if n != 1 else ''} above pixel threshold {t} ({px} px), "
                              "not marked: not defects")
            else:
                detail.append(f"passed: no pixel above pixel threshold {t}")
        else:
            mask, regions = found, d.regions or ()
            boxed = f", {MAX_BOXES} boxed" if n is not None and n > MAX_BOXES else ""
            what = "defect region" if d.label == "anomalous" else "region"
            detail.append(f"{count} {what}{'s' if n != 1 else ''} > {t} ({px} px{boxed})"
                          + ("" if d.label == "anomalous" else ", no image label"))
    else:
        detail.append("no pixel threshold: no regions")
    return overlay(rgb, amap, scale=scale, mask=mask, regions=regions, alpha=alpha,
                   caption_lines=[head, "   ".join(detail)], threshold=d.pixel_threshold)
