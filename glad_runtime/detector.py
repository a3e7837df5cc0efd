"""Batch detection over image files: load, preprocess, run the pipeline, write per-image results.

Engine-agnostic (any :class:`~glad_runtime.engines.Engines`); used by ``glad detect``. A file that cannot be read
gets an error record and the rest of its batch completes.

Labels: with a calibration (``calibration.json`` of the bundle, ``glad_runtime.core.calibration.Calibration``) every record gets
``normalized_score`` (threshold at 0.5), ``label`` (``"normal"`` / ``"anomalous"``: anomalous when the raw score is
strictly above the threshold), ``threshold`` (the raw image threshold used) and ``threshold_source``
(``"calibration"`` or ``"override"``). A per-run / per-request ``threshold=`` overrides the raw image threshold;
without a calibration it still gives labels (but no ``normalized_score``, which needs the calibration's score span).
Without either, records carry the raw score only and :func:`summarize` adds a note that the bundle is uncalibrated.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from glad_runtime.core.calibration import Calibration, label_for

from glad_runtime.core.images import ImageLoadError, LoadedImage, load_image, preprocess, resize_map
from glad_runtime.engines import EngineError
from glad_runtime.pipeline.batch import GladPipeline, InvalidInputError

__all__ = ["DetectionRecord", "apply_threshold", "detect_files", "heatmap_overlay", "summarize", "write_outputs"]


@dataclass
class DetectionRecord:
    """The JSON record written per image.

    ``score`` is the raw (uncalibrated) top-K mean anomaly score; ``normalized_score`` the calibrated score in
    [0, 1] with the threshold at 0.5; ``label`` ``"anomalous"`` when ``score > threshold`` else ``"normal"``;
    ``threshold`` the raw image threshold used and ``threshold_source`` ``"calibration"`` or ``"override"`` (all
    four None when the bundle is uncalibrated and no threshold was given; ``normalized_score`` None without a
    calibration). ``adaptive_step`` is the DDIM timestep where ADS decided (-1: ADS off); ``timings_s`` the batch's
    stage times divided by the batch size (seconds per image). On failure only ``source`` and ``error`` are set.
    """

    source: str
    score: float | None = None
    normalized_score: float | None = None
    label: str | None = None
    threshold: float | None = None
    threshold_source: str | None = None
    adaptive_step: int | None = None
    ads_score: float | None = None
    saff_triggered: bool | None = None
    original_size: tuple[int, int] | None = None
    image_mode: str | None = None
    map_file: str | None = None
    overlay_file: str | None = None
    map_png_scale: float | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None


def _batches(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start:start + size]


def detect_files(pipeline: GladPipeline, paths: Iterable[str | Path], out_dir: str | Path, *, batch_size: int = 4,
                 map_format: str = "png16", progress: bool = True, calibration: Calibration | None = None,
                 threshold: float | None = None) -> list[DetectionRecord]:
    """Run GLAD on image files and write, per image, ``<name>.json``, the map and ``<name>_overlay.png``.

    Args:
        pipeline: a configured :class:`GladPipeline`.
        paths: image files.
        out_dir: output folder (created).
        batch_size: images per pipeline call.
        map_format: ``"png16"`` (16-bit PNG, value = png / ``map_png_scale``) or ``"npy"`` (float32).
        progress: show a tqdm progress bar on stderr.
        calibration: the bundle's calibration (``Bundle.calibration()``), or None (uncalibrated: raw scores only).
        threshold: raw image threshold for this call, overriding the calibration's (finite float), or None.
    Returns:
        One :class:`DetectionRecord` per input path, in order; also written to ``out_dir/results.jsonl``.
    Raises:
        ValueError: unknown ``map_format`` or a non-finite ``threshold``.
    """
    from tqdm import tqdm

    if map_format not in ("png16", "npy"):
        raise ValueError(f"map_format must be 'png16' or 'npy', got {map_format!r}")
    if threshold is not None and not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in paths]
    names = _unique_names(paths)
    records: list[DetectionRecord] = []
    res = pipeline.config.resolution
    with tqdm(total=len(paths), desc="detect", unit="img", disable=not progress) as bar:
        for chunk in _batches(list(range(len(paths))), batch_size):
            loaded: list[tuple[int, LoadedImage]] = []
            by_index: dict[int, DetectionRecord] = {}
            for i in chunk:
                try:
                    loaded.append((i, load_image(paths[i])))
                except ImageLoadError as e:
                    by_index[i] = DetectionRecord(source=str(paths[i]), error=str(e), error_type=type(e).__name__)
            if loaded:
                batch = np.stack([preprocess(img.rgb, res) for _, img in loaded])
                results = _run_isolated(pipeline, batch)
                for k, (i, img) in enumerate(loaded):
                    result = results[k]
                    if isinstance(result, Exception):
                        by_index[i] = DetectionRecord(source=str(paths[i]), error=str(result),
                                                      error_type=type(result).__name__)
                        continue
                    result, j = result
                    per_image = {k2: v / len(result.scores) for k2, v in result.timings.items()}
                    amap = resize_map(result.anomaly_maps[j], img.original_size)
                    rec = DetectionRecord(
                        source=str(paths[i]), score=float(result.scores[j]),
                        adaptive_step=int(result.adaptive_steps[j]),
                        ads_score=None if np.isnan(result.ads_scores[j]) else float(result.ads_scores[j]),
                        saff_triggered=bool(result.triggered[j]), original_size=img.original_size,
                        image_mode=img.mode, timings_s={k2: round(v, 5) for k2, v in per_image.items()})
                    apply_threshold(rec, calibration, threshold)
                    write_outputs(rec, amap, img.rgb, out, names[i], map_format)
                    by_index[i] = rec
            for i in chunk:
                records.append(by_index[i])
                (out / f"{names[i]}.json").write_text(json.dumps(asdict(by_index[i]), indent=2))
            bar.update(len(chunk))
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    return records


def apply_threshold(rec: DetectionRecord, calibration: Calibration | None, threshold: float | None = None) -> None:
    """Fill ``normalized_score`` / ``label`` / ``threshold`` / ``threshold_source`` of a scored record in place.

    The raw image threshold is ``threshold`` when given (``"override"``), else the calibration's
    (``"calibration"``); with neither the record stays unlabelled. ``normalized_score`` needs a calibration.
    """
    if rec.score is None or (calibration is None and threshold is None):
        return
    t = float(threshold) if threshold is not None else calibration.image_threshold
    rec.threshold = t
    rec.threshold_source = "override" if threshold is not None else "calibration"
    rec.label = label_for(rec.score, t)
    if calibration is not None:
        rec.normalized_score = calibration.normalize(rec.score, threshold=t)


UNCALIBRATED_NOTE = ("the bundle is uncalibrated: records carry raw scores only, no labels; run `glad calibrate` "
                     "or pass a threshold")


def _run_isolated(pipeline: GladPipeline, batch: np.ndarray) -> list:
    """Run a batch; if it fails, rerun its images one at a time so one bad image loses nothing else.

    Returns, per image, ``(PipelineOutput, index into that output)`` or the exception raised for that image.
    """
    try:
        out = pipeline(batch)
        return [(out, k) for k in range(len(batch))]
    except (EngineError, InvalidInputError) as e:
        if len(batch) == 1:
            return [e]
    results: list = []
    for k in range(len(batch)):
        try:
            results.append((pipeline(batch[k:k + 1]), 0))
        except (EngineError, InvalidInputError) as e:
            results.append(e)
    return results


def _unique_names(paths: list[Path]) -> list[str]:
    seen: dict[str, int] = {}
    names = []
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n}")
    return names


def write_outputs(rec: DetectionRecord, amap: np.ndarray, rgb: np.ndarray, out: Path, name: str,
                  map_format: str) -> None:
    """Write the map (original size) and the overlay, filling ``rec.map_file`` / ``overlay_file`` / scale."""
    if map_format == "npy":
        rec.map_file = f"{name}_map.npy"
        np.save(out / rec.map_file, amap.astype(np.float32))
    else:
        peak = float(amap.max())
        scale = 65535.0 / peak if peak > 0 else 1.0
        rec.map_file, rec.map_png_scale = f"{name}_map.png", scale
        Image.fromarray(np.round(amap * scale).clip(0, 65535).astype(np.uint16)).save(out / rec.map_file)
    rec.overlay_file = f"{name}_overlay.png"
    heatmap_overlay(rgb, amap).save(out / rec.overlay_file)


# A perceptually ordered colormap (matplotlib "inferno" anchors) so the runtime needs no matplotlib.
_CMAP = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                  [250, 193, 39], [252, 255, 164]], dtype=np.float32)


def heatmap_overlay(rgb: np.ndarray, amap: np.ndarray, vmax: float | None = None, alpha: float = 0.5) -> Image.Image:
    """Blend a colour-mapped anomaly map over the image.

    Args:
        rgb: float32 ``[H, W, 3]`` in [0, 1].
        amap: float32 ``[H, W]`` (same size).
        vmax: map value shown as the hottest colour (default: the map's maximum).
        alpha: heatmap opacity in [0, 1].
    Returns:
        an RGB Pillow image ``W x H``.
    """
    vmax = float(amap.max()) if vmax is None else float(vmax)
    v = np.clip(amap / vmax, 0, 1) if vmax > 0 else np.zeros_like(amap)
    pos = v * (len(_CMAP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_CMAP) - 2)
    frac = (pos - lo)[..., None]
    colour = _CMAP[lo] * (1 - frac) + _CMAP[lo + 1] * frac
    blend = (1 - alpha) * rgb * 255.0 + alpha * colour
    return Image.fromarray(blend.clip(0, 255).astype(np.uint8))


def summarize(records: list[DetectionRecord]) -> dict:
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
