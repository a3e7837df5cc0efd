"""What ``glad detect`` writes and prints: per image ``<name>.json``, the anomaly map, the overlay and the defect
mask, then ``results.jsonl`` and the run's summary.

Kept out of the facade (:mod:`glad_runtime.detector`) so that scoring, the served models
(``triton_models/python``) and the step scheduler import neither the renderer (:mod:`glad_runtime.render`) nor
anything it may draw with; ``glad detect`` (in process and ``--server --stream``), ``glad eval`` and the benchmarks
import it. Needs numpy and Pillow only (a client-only install writes served results with it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image

from glad_runtime.core.detection import Detection
from glad_runtime.core.images import LoadedImage, Preprocessor, load_image
from glad_runtime.core.regions import defect_mask
from glad_runtime.errors import UsageError
from glad_runtime.render import MapScale, map_to_png16, render_detection

if TYPE_CHECKING:
    from glad_runtime.detector import Detector

__all__ = ["detect_files", "write_detections", "write_outputs", "summarize", "UNCALIBRATED_NOTE",
           "OVERLAY_MAX_SIDE"]


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
        UsageError: unknown ``map_format`` (a ``ValueError``).
    """
    if map_format not in ("png16", "npy"):
        raise UsageError(f"map_format must be 'png16' or 'npy', got {map_format!r}")
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
            amap = Preprocessor.map_to_original(rec.anomaly_map, img.original_size)
            write_outputs(rec, amap, img, out, names[i], map_format, scale)
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
        small = Preprocessor.map_to_original(amap, rgb.shape[:2])
        render_detection(shown, rgb, scale, amap=small).save(out / rec.overlay_file)
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
