"""GLAD runtime: run a trained GLAD bundle and get one :class:`Detection` per image. Never imports torch.

Layers (each a folder; a layer imports only the ones above it)::

    errors.py        GladError and its typed subclasses (one place)
    core/            the pure math and data: schedule (noise schedule, DDIM), ads (ADS, SAFF), scoring (anomaly
                     maps, scores), images (decode, Preprocessor), config (GladConfig, presets), bundle (files,
                     checksums), calibration (thresholds, normalisation, the one labelling rule), detection
                     (the one per-image result type)
    engines/         the Engines interface (base), EngineSpec and the backend table (registry), one module
                     per backend
    pipeline/        orchestration: batch (GladPipeline, one call per batch) and stream (StepScheduler, in-flight
                     batching across images at different steps)
    detector.py      the facade: Detector(bundle, engines, calibration).detect(images) -> [Detection]
    output.py        what `glad detect` writes (maps, overlays via render.py, masks, JSON); not the facade's
    serving/         protocol (the served contract: names, dtypes, shapes) and client (the SDK, no torch/ORT)

Names are resolved lazily (PEP 562), so ``import glad_runtime`` costs nothing and importing the client SDK pulls
neither scipy nor the pipeline.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Bundle": "glad_runtime.core.bundle", "GladConfig": "glad_runtime.core.config",
    "get_preset": "glad_runtime.core.config", "preset_names": "glad_runtime.core.config",
    "Calibration": "glad_runtime.core.calibration", "label": "glad_runtime.core.calibration",
    "Detection": "glad_runtime.core.detection",
    "load_image": "glad_runtime.core.images", "preprocess": "glad_runtime.core.images",
    "Preprocessor": "glad_runtime.core.images",
    "NoiseSchedule": "glad_runtime.core.schedule", "ddim_timesteps": "glad_runtime.core.schedule",
    "scaled_linear_alphas_cumprod": "glad_runtime.core.schedule",
    "Engines": "glad_runtime.engines", "load_engines": "glad_runtime.engines",
    "EngineSpec": "glad_runtime.engines", "open_engines": "glad_runtime.engines",
    "GladPipeline": "glad_runtime.pipeline.batch", "PipelineOutput": "glad_runtime.pipeline.batch",
    "StepScheduler": "glad_runtime.pipeline.stream",
    "Detector": "glad_runtime.detector",
    "GladError": "glad_runtime.errors", "UsageError": "glad_runtime.errors", "ConfigError": "glad_runtime.errors",
    "BundleError": "glad_runtime.errors", "EngineError": "glad_runtime.errors",
    "ImageLoadError": "glad_runtime.errors", "UnsupportedImageError": "glad_runtime.errors",
    "InvalidInputError": "glad_runtime.errors", "CalibrationError": "glad_runtime.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'glad_runtime' has no attribute {name!r}")
