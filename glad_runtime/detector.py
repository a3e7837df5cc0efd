"""The facade: ``Detector(bundle, engines, calibration).detect(images) -> [Detection]``; what ``glad detect``
writes per image is :mod:`glad_runtime.output` (this module imports neither the renderer nor the writer, so the
served models load neither).

Every caller that scores images goes through :class:`Detector`: ``glad detect``, evaluation (``training.evaluate``),
calibration (``calib.collect``), the quantisation gate (``calib.quantize``) and the benchmarks. One batch of images
runs as one :class:`~glad_runtime.pipeline.batch.GladPipeline` call; a file that cannot be read, or an image whose
pipeline call fails (``EngineError``, ``InvalidInputError``, any :class:`~glad_runtime.errors.GladError`), gets a
:class:`Detection` with ``error`` set and the rest of its batch completes. Labels come from the one labelling rule
(:func:`glad_runtime.core.calibration.label`): anomalous when ``score > threshold``, the threshold being the
per-run override when given, else the calibration's; ``normalized_score`` centres on the threshold in force.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from glad_runtime.core.bundle import Bundle
from glad_runtime.core.calibration import Calibration, label
from glad_runtime.core.config import GladConfig
from glad_runtime.core.detection import Detection, ads_state
from glad_runtime.core.images import LoadedImage, load_image
from glad_runtime.core.regions import find_regions
from glad_runtime.errors import CalibrationError, ConfigError, GladError

if TYPE_CHECKING:
    from glad_runtime.engines import EngineSpec

__all__ = ["Detector"]


class Detector:
    """A bundle's detector: engines + pipeline + calibration -> one :class:`Detection` per image.

    Args:
        engines: the four networks on any backend (:func:`glad_runtime.engines.open_engines`; or use :meth:`open`).
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
        # imported here, not with the module: the pipeline needs the runtime extra (scipy); importing the facade
        # (labelling, regions) does not
        from glad_runtime.pipeline.batch import GladPipeline

        self.pipeline = GladPipeline(engines, config, **pipeline_options)

    @classmethod
    def open(cls, bundle: Bundle | str | Path, spec: EngineSpec | str = "torch", *,
             config_changes: dict | None = None, threshold: float | None = None,
             calibrated: bool = True) -> "Detector":
        """The one way to open a bundle's engines: a bundle folder on ``spec``
        (:func:`glad_runtime.engines.open_engines`) with its calibration (``calibrated=False``: none) and
        ``config_changes`` applied to its config.

        Args:
            bundle: a :class:`Bundle` or its folder.
            spec: an :class:`~glad_runtime.engines.EngineSpec`, or a backend name (its defaults).
            config_changes: config fields replaced for this run (``--set`` values, ``seed``).
            threshold: a raw image threshold overriding the calibration's. calibrated: load ``calibration.json``.
        Raises:
            BundleError: not a bundle folder (or an invalid ``calibration.json``: CalibrationError).
            ConfigError: a config change the config refuses (unknown field, value out of range).
            EngineSpecError: a spec the backend cannot honour. MissingExtraError: its extra is not installed.
            EngineFilesError: the files the backend loads are missing or modified (a BundleError and a
                UsageError). EngineError / TensorRTUnavailable: the backend's own failures (server, GPU).
            CalibrationError: a non-finite ``threshold``.
            All are :class:`~glad_runtime.errors.GladError` s; ModuleNotFoundError only when the runtime extra
            (scipy, scikit-image) is missing, before any engine is opened.
        """
        from glad_runtime.engines import EngineSpec, open_engines
        from glad_runtime.pipeline.batch import GladPipeline  # noqa: F401 (the runtime extra, before the engines)

        spec = spec if isinstance(spec, EngineSpec) else EngineSpec(spec)
        b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        try:
            cfg = b.config.replace(**config_changes) if config_changes else b.config
        except GladError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config change refused: {e}") from e
        calibration = b.calibration() if calibrated else None
        return cls(open_engines(b, spec), cfg, calibration, threshold, bundle=b)

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
            images: float32 ``[B, 3, R, R]`` in [-1, 1] (``Detector.pipeline.preprocessor``).
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
        pre = self.pipeline.preprocessor
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
                    batch = np.stack([pre.image(img) for _, img in loaded])
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
