"""GLAD runtime: run a trained GLAD bundle and get one :class:`Detection` per image; importing it never imports torch.

The public names below load lazily (PEP 562): ``import glad_runtime`` costs nothing, and the client SDK
(``glad_runtime.serving.client``) pulls neither scipy nor the pipeline. The map of the packages, their layers and
an image's path: ARCHITECTURE.md at the repository root.
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
