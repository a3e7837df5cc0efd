"""GLAD runtime: the numpy-only core of the GLAD deployment toolkit.

Importing this package never imports torch. It holds the noise schedule and DDIM math (``schedule``), ADS and SAFF
(``ads``), anomaly maps and scores (``anomaly``), image I/O (``images``), configuration and presets (``config``),
the model bundle (``bundle``), the ``Engines`` interface (``engines``) and the pipeline (``pipeline``). Backends:
``torch_engine`` (PyTorch reference, imports torch).
"""

from .bundle import Bundle, BundleError
from .config import GladConfig, get_preset, preset_names
from .engines import EngineError, Engines
from .images import ImageLoadError, UnsupportedImageError, load_image, preprocess
from .pipeline import GladPipeline, InvalidInputError, PipelineOutput
from .schedule import NoiseSchedule, ddim_timesteps, scaled_linear_alphas_cumprod

__version__ = "0.1.0"

__all__ = [
    "Bundle", "BundleError", "GladConfig", "get_preset", "preset_names", "EngineError", "Engines",
    "ImageLoadError", "UnsupportedImageError", "load_image", "preprocess", "GladPipeline", "InvalidInputError",
    "PipelineOutput", "NoiseSchedule", "ddim_timesteps", "scaled_linear_alphas_cumprod",
]
