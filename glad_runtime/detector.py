"""The facade: ``Detector(bundle, engines, calibration).detect(images) -> [Detection]``, and what ``glad detect``
writes per image.

Every caller that scores images goes through :class:`Detector`: ``glad detect``, evaluation (``training.evaluate``),
calibration (``calib.collect``), the quantisation gate (``calib.quantize``) and the benchmarks. One batch of images
runs as one :class:`~glad_runtime.pipeline.batch.GladPipeline` call; a file that cannot be read, or an image whose
pipeline call fails (``EngineError``, ``InvalidInputError``, any :class:`~glad_runtime.errors.GladError`), gets a
:class:`Detection` with ``error`` set and the rest of its batch completes. Labels come from the one labelling rule
(:func:`glad_runtime.core.calibration.label`): anomalous when ``score > threshold``, the threshold being the
per-run override when given, else the calibration's; ``normalized_score`` centres on the threshold in force.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from glad_runtime.core.bundle import Bundle
from glad_runtime.core.calibration import Calibration, label
from glad_runtime.core.config import GladConfig
from glad_runtime.core.detection import Detection, ads_state
from glad_runtime.core.images import LoadedImage, load_image, prepare, resize_map
from glad_runtime.core.regions import defect_mask, find_regions
from glad_runtime.errors import CalibrationError, GladError
from glad_runtime.render import MapScale, map_to_png16, render_detection

__all__ = ["Detector", "detect_files", "write_detections", "summarize", "write_outputs", "UNCALIBRATED_NOTE"]


class Detector:
    """A bundle's detector: engines + pipeline + calibration -> one :class:`Detection` per image.

    Args:
        engines: the four networks on any backend (:func:`glad_runtime.engines.load_engines`).
        config: the :class:`GladConfig` to run (the bundle's, possibly with ``--set`` changes).
        calibration: thresholds and normalisation, or None (uncalibrated: raw scores, no labels, no regions).
        threshold: optional finite raw image threshold overriding the calibration's for every image.
        pixel_threshold: optional finite raw pixel threshold for the defect regions (default: the calibration's
            ``pixel_threshold``; None without one: regions are not computed).
        bundle: the :class:`Bundle` the engines came from (kept for callers; optional).
    Raises:
        CalibrationError: a non-finite ``threshold``.
    """

    def __init__(self, engines, config: GladConfig, calibration: Calibration | None = None,
                 threshold: float | None = None, bundle: Bundle | None = None, *,
                 pixel_threshold: float | None = None, **pipeline_options: Any):
        for name, t in (("threshold", threshold), ("pixel_threshold", pixel_threshold)):
            if t is not None and not np.isfinite(float(t)):
                raise CalibrationError(f"{name} must be a finite number, got {t}")
        self.engines, self.config, self.calibration, self.threshold = engines, config, calibration, threshold
        if pixel_threshold is None and calibration is not None:
            pixel_threshold = calibration.pixel_threshold
        self.pixel_threshold = None if pixel_threshold is None else float(pixel_threshold)
        self.bundle = bundle
        # imported here, not with the module: a client-only install (no scipy) imports this module for
        # write_detections and summarize (`glad detect --server HOST:PORT --stream`)
        from glad_runtime.pipeline.batch import GladPipeline

        self.pipeline = GladPipeline(engines, config, **pipeline_options)

    @classmethod
    def open(cls, bundle: Bundle | str | Path, backend: str = "torch", *, config_changes: dict | None = None,
             threshold: float | None = None, calibrated: bool = True, **engine_options: Any) -> "Detector":
        """Open a bundle folder on one backend (``load_engines(bundle, backend, **engine_options)``) with its
        calibration (``calibrated=False``: none) and ``config_changes`` applied to its config.

        Raises:
            BundleError: missing or modified files. ConfigError / ValueError: a bad config change or option.
        """
        from glad_runtime.engines import load_engines

        b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        cfg = b.config.replace(**config_changes) if config_changes else b.config
        engines = load_engines(b, backend, **engine_options)
        return cls(engines, cfg, b.calibration() if calibrated else None, threshold, bundle=b)

    # ------------------------------------------------------------------ scoring
    def _detection(self, out, j: int, source: str, n: int, keep_map: bool) -> Detection:
        ads = float(out.ads_scores[j])
        return self.labelled(Detection(source=source, score=float(out.scores[j]),
                                       adaptive_step=int(out.adaptive_steps[j]),
                                       ads_score=ads if np.isfinite(ads) else None,
                                       saff_triggered=bool(out.saff_triggered[j]),
                                       anomaly_map=out.anomaly_maps[j] if keep_map else None,
                                       timings_s={k: round(t / n, 5) for k, t in out.timings.items()}))

    def labelled(self, d: Detection) -> Detection:
        """Set ``label``, ``normalized_score``, ``threshold``, ``threshold_source`` (the one labelling rule,
        :func:`glad_runtime.core.calibration.label`) and ``ads_state`` on a scored Detection, in place, from its
        ``score``, ``adaptive_step`` and ``saff_triggered``; returns it. Used for the pipeline's results and for
        the step scheduler's (:class:`~glad_runtime.pipeline.stream.StepScheduler`), so both label alike. Failed
        detections are returned unchanged."""
        if not d.ok:
            return d
        v = label(d.score, self.calibration, self.threshold)
        d.normalized_score, d.label, d.threshold, d.threshold_source = (v.normalized_score, v.label, v.threshold,
                                                                        v.threshold_source)
        d.ads_state = ads_state(self.config.ads_enabled, int(d.adaptive_step), bool(d.saff_triggered))
        return d

    def locate(self, d: Detection, img: LoadedImage | None = None) -> Detection:
        """Finish one scored Detection: the decoded image's ``original_size`` and ``image_mode`` (a preprocessed
        tensor's original size is its own ``R x R``), then, with a pixel threshold, the defect ``regions`` at
        that size (:func:`glad_runtime.core.regions.find_regions`). Shared by :meth:`detect` and the BLS model,
        so served regions equal in-process ones. Failed detections are returned unchanged."""
        if not d.ok:
            return d
        if img is not None:
            d.original_size, d.image_mode = img.original_size, img.mode
        elif d.original_size is None:
            d.original_size = (self.config.resolution, self.config.resolution)
        if self.pixel_threshold is not None and d.anomaly_map is not None:
            d.pixel_threshold = self.pixel_threshold
            d.regions = find_regions(d.map_at_original_size(), self.pixel_threshold)[1]
        return d

    def detect_arrays(self, images: np.ndarray, sources: Sequence[str] | None = None, *,
                      keep_maps: bool = True, keep_reconstructions: bool = False) -> list[Detection]:
        """Score a preprocessed batch, isolating failures per image.

        Args:
            images: float32 ``[B, 3, R, R]`` in [-1, 1] (:func:`glad_runtime.core.images.preprocess`).
            sources: B names (default ``"#<index>"``).
            keep_maps: keep each ``anomaly_map [D, D]`` (``dino_resolution``) on its Detection.
            keep_reconstructions: also keep ``reconstruction`` (float32 ``[3, R, R]``).
        Returns:
            B Detections in order. If the joint call fails, every image is rerun alone, so only the failing ones
            carry ``error`` (the ``GladError`` raised for them).
        """
        sources = [f"#{i}" for i in range(len(images))] if sources is None else list(sources)
        try:
            joint = self.pipeline(images)  # one call for the whole batch
            outs = [(joint, k) for k in range(len(images))]
        except GladError as e:
            if len(images) == 1:
                return [Detection(source=sources[0], error=e)]
            outs = []
            for k in range(len(images)):
                try:
                    outs.append((self.pipeline(images[k:k + 1]), 0))
                except GladError as e1:
                    outs.append(e1)
        dets = []
        for src, r in zip(sources, outs):
            if isinstance(r, Exception):
                dets.append(Detection(source=src, error=r))
                continue
            out, j = r
            d = self._detection(out, j, src, len(out.scores), keep_maps)
            if keep_reconstructions:
                d.reconstruction = out.reconstructions[j]
            dets.append(d)
        return dets

    def detect(self, images: Iterable[Any], *, batch_size: int = 4, progress: bool = False,
               desc: str = "detect", keep_maps: bool = True, keep_reconstructions: bool = False,
               ) -> Iterator[tuple[Detection, LoadedImage | None]]:
        """Score image files (or encoded bytes), ``batch_size`` per pipeline call, in order.

        Yields:
            ``(Detection, LoadedImage or None)`` per input: the decoded image (``rgb``, ``original_size``,
            ``mode``) for the caller's outputs; None when the file could not be read (``error`` is then an
            :class:`~glad_runtime.errors.ImageLoadError`).
        """
        from tqdm import tqdm

        items = list(images)
        sources = [f"#{i}" if isinstance(x, (bytes, bytearray)) else str(x) for i, x in enumerate(items)]
        res = self.config.resolution
        with tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, len(items), batch_size):
                chunk = range(start, min(start + batch_size, len(items)))
                slots: dict[int, tuple[Detection, LoadedImage | None]] = {}
                loaded: list[tuple[int, LoadedImage]] = []
                for i in chunk:
                    try:
                        loaded.append((i, load_image(items[i], self.config.max_image_pixels, sources[i])))
                    except GladError as e:
                        slots[i] = (Detection(source=sources[i], error=e), None)
                if loaded:
                    batch = np.stack([prepare(img, res, self.config.load_resolution) for _, img in loaded])
                    dets = self.detect_arrays(batch, [sources[i] for i, _ in loaded], keep_maps=True,
                                              keep_reconstructions=keep_reconstructions)
                    for (i, img), d in zip(loaded, dets):
                        slots[i] = (self.locate(d, img), img)
                        if not keep_maps:
                            d.anomaly_map = None
                yield from (slots[i] for i in chunk)
                bar.update(len(chunk))

    def score_files(self, paths: Sequence[str | Path], *, batch_size: int = 4, progress: bool = False,
                    desc: str = "score", strict: bool = True, keep_reconstructions: bool = False
                    ) -> list[Detection]:
        """"Score these files": the one loop behind evaluation, calibration, the quantisation gate and benchmarks.

        Args:
            paths: image files. strict: raise the first per-image error (evaluation and calibration data must be
                clean) instead of returning it on the Detection.
        Returns:
            one Detection per path, in order, each with its ``anomaly_map [D, D]``.
        Raises:
            GladError: with ``strict``, the first image that failed (its message names the file).
        """
        out = []
        for d, _ in self.detect(paths, batch_size=batch_size, progress=progress, desc=desc,
                                keep_reconstructions=keep_reconstructions):
            if strict and d.error is not None:
                raise type(d.error)(f"{d.source}: {d.error}") from d.error
            out.append(d)
        return out


def detect_files(detector: Detector, paths: Iterable[str | Path], out_dir: str | Path, *, batch_size: int = 4,
                 map_format: str = "png16", progress: bool = True) -> list[Detection]:
    """``glad detect``: score image files and write, per image, ``<name>.json``, the map and
    ``<name>_overlay.png`` and, with a pixel threshold, ``<name>_mask.png`` (at the image's original size, maps
    and overlays on the bundle's one :class:`~glad_runtime.render.MapScale`), plus ``results.jsonl``.

    Args:
        detector: the :class:`Detector` (its calibration and threshold label the records).
        paths: image files. out_dir: output folder (created). batch_size: images per pipeline call.
        map_format: ``"png16"`` (16-bit PNG, value = png / ``map_png_scale``) or ``"npy"`` (float32).
        progress: a tqdm progress bar on stderr.
    Returns:
        One :class:`Detection` per input path, in order (maps dropped after writing).
    Raises:
        ValueError: unknown ``map_format``.
    """
    if map_format not in ("png16", "npy"):
        raise ValueError(f"map_format must be 'png16' or 'npy', got {map_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    scale = MapScale.for_bundle(detector.calibration, detector.config)
    pairs = enumerate(detector.detect(paths, batch_size=batch_size, progress=progress))
    return write_detections(((i, rec, img) for i, (rec, img) in pairs), paths, out, scale, map_format,
                            max_pixels=detector.config.max_image_pixels)


def write_detections(results: Iterable[tuple[int, Detection, LoadedImage | None]], paths: Sequence[Path],
                     out: Path, scale: MapScale, map_format: str = "png16",
                     max_pixels: int | None = None) -> list[Detection]:
    """Write ``glad detect``'s files (:func:`write_outputs`, ``<name>.json``, ``results.jsonl``) for results that
    arrive in any order: ``(index in paths, Detection, decoded image or None)``; the image is decoded here when
    None (a served result; ``max_pixels`` its limit). Returns the Detections in ``paths`` order (maps dropped
    after writing)."""
    names = _unique_names(list(paths))
    records: list[Detection | None] = [None] * len(paths)
    for i, rec, img in results:
        if rec.ok:
            if img is None:
                img = load_image(paths[i], max_pixels)
            write_outputs(rec, resize_map(rec.anomaly_map, img.original_size), img, out, names[i], map_format,
                          scale)
            rec.anomaly_map = None
        (out / f"{names[i]}.json").write_text(json.dumps(rec.to_dict(), indent=2))
        records[i] = rec
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")
    return records  # type: ignore[return-value]


UNCALIBRATED_NOTE = ("the bundle is uncalibrated: records carry raw scores only, no labels; run `glad calibrate` "
                     "or pass a threshold")


def _unique_names(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


#: Longer side of an overlay picture at most (pixels): a person reads a 2048 px overlay of a 9000 px image as well
#: as a full-size one, and it costs 20x less memory (issue 27). Maps and masks stay at the original size.
OVERLAY_MAX_SIDE = 2048


def write_outputs(rec: Detection, amap: np.ndarray, image: LoadedImage | np.ndarray, out: Path, name: str,
                  map_format: str, scale: MapScale | None = None) -> None:
    """Write one record's pictures and fill the record's file fields: the map and mask at the image's original
    size, the overlay at most :data:`OVERLAY_MAX_SIDE` on its longer side (regions drawn scaled).

    Args:
        rec: the scored Detection (``map_file``, ``map_png_scale``, ``overlay_file``, ``mask_file`` are set).
        amap: float32 ``[H, W]`` raw map at the original size. image: the decoded :class:`LoadedImage`, or float32
            ``[H, W, 3]`` in [0, 1] at the original size.
        out, name: folder and file stem. map_format: ``"png16"`` or ``"npy"``.
        scale: the bundle's :class:`~glad_runtime.render.MapScale` (default: the per-image fallback).

    Files:
        ``<name>_map.png``: uint16, value = png / ``map_png_scale``; calibrated, ``map_png_scale`` is the bundle's
        one :attr:`~glad_runtime.render.MapScale.png_scale` (the same for every image of the bundle) and a stored
        65535 means "at or above the ceiling" ``65535 / map_png_scale`` (clipped); uncalibrated, it is
        ``65535 / peak`` of this map. Or ``<name>_map.npy`` (float32, exact).
        ``<name>_overlay.png``: :func:`glad_runtime.render.render_detection` (score, label, threshold, contour,
        boxes, colour bar on the bundle's scale).
        ``<name>_mask.png`` (only with a pixel threshold): uint8 ``[H, W]`` at the original size, 255 where
        ``amap > pixel_threshold`` (the pixels the regions were found in), else 0.
    """
    scale = scale or MapScale.for_bundle(None)
    if map_format == "npy":
        rec.map_file = f"{name}_map.npy"
        np.save(out / rec.map_file, amap.astype(np.float32))
    else:
        rec.map_file, rec.map_png_scale = f"{name}_map.png", scale.png_scale_for(amap)
        Image.fromarray(map_to_png16(amap, rec.map_png_scale)).save(out / rec.map_file)
    rec.overlay_file = f"{name}_overlay.png"
    if isinstance(image, LoadedImage):
        rgb, f = image.display_rgb(OVERLAY_MAX_SIDE)
    else:
        rgb, f = image, 1.0
    if f < 1.0:  # draw on the shrunk picture: map resized to it, boxes scaled
        shown = dataclasses.replace(rec, regions=None if rec.regions is None else [
            dataclasses.replace(r, x=int(r.x * f), y=int(r.y * f), width=max(1, round(r.width * f)),
                                height=max(1, round(r.height * f))) for r in rec.regions])
        render_detection(shown, rgb, scale, amap=resize_map(amap, rgb.shape[:2])).save(out / rec.overlay_file)
    else:
        render_detection(rec, rgb, scale, amap=amap).save(out / rec.overlay_file)
    if rec.pixel_threshold is not None:
        rec.mask_file = f"{name}_mask.png"
        Image.fromarray(defect_mask(amap, rec.pixel_threshold).astype(np.uint8) * 255).save(out / rec.mask_file)


def summarize(records: list[Detection]) -> dict:
    """Counts of processed and failed images, the mean per-image total time and the labels.

    Labelled records add ``anomalous`` / ``normal`` counts, ``threshold`` and ``threshold_source``; when scored
    records carry no label, ``note`` says that the bundle is uncalibrated.
    """
    ok = [r for r in records if r.error is None]
    total = [r.timings_s.get("total", 0.0) for r in ok]
    out = {"images": len(records), "ok": len(ok), "failed": len(records) - len(ok),
           "mean_s_per_image": float(np.mean(total)) if total else None, "time": time.strftime("%H:%M:%S")}
    labelled = [r for r in ok if r.label is not None]
    if labelled:
        out |= {"anomalous": sum(r.label == "anomalous" for r in labelled),
                "normal": sum(r.label == "normal" for r in labelled),
                "threshold": labelled[0].threshold, "threshold_source": labelled[0].threshold_source}
    elif ok:
        out["note"] = UNCALIBRATED_NOTE
    return out
