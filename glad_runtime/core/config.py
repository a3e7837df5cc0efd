"""GLAD configuration and the named presets (spec Appendix A), as plain data.

A :class:`GladConfig` holds everything the runtime needs to reproduce a detector: the model architecture name,
resolutions, noise schedule, ADS / SAFF parameters and scoring options. It is stored as ``config.json`` in the
model bundle. Presets are selected explicitly by name (project decision 9), never by matching substrings of data
paths.

Preset names:

* ``tiny``: the CPU model the project trains itself (small UNet2DConditionModel / AutoencoderKL, 128 px, a ViT
  feature extractor); used by tests and the offline demo.
* ``sd14-dino-vitb8``: Stable Diffusion v1-4 UNet and VAE with DINO ViT-B/8, the MVTec-AD defaults.
* ``mvtec-<class>``, ``mpdd-<class>``, ``visa-<class>``, ``pcbbank-<class>``: the official single-class settings.
* ``multi-mvtec``, ``multi-mpdd``, ``multi-visa``, ``multi-pcbbank``: the official multi-class settings of a
  dataset (one UNet for all its classes; training), and ``multi-<dataset>-<class>`` for testing one class with it
  (per-class prompt, bidirectional term and foreground mask).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Sequence

from glad_runtime.errors import ConfigError, UnknownPresetError

__all__ = ["GladConfig", "PRESETS", "FIELD_CHOICES", "get_preset", "preset_names", "parse_overrides", "parse_value"]

ARCHITECTURES = ("tiny", "sd14-dino-vitb8")

#: The fields that take one of a few literal values (checked by :meth:`GladConfig.validate` and
#: :func:`parse_overrides`).
FIELD_CHOICES: dict[str, tuple] = {
    "architecture": ARCHITECTURES,
    "noise_at": ("t_max", "first_timestep"),
    "bidirectional": ("none", "sum", "mean"),
    "score_reference": ("input", "vae_roundtrip"),
    "foreground_mode": (1, 2, 3),
}


def _choice_text(choices: Sequence) -> str:
    return ", ".join(repr(c) for c in choices)


@dataclass(frozen=True)
class GladConfig:
    """All runtime settings of one GLAD detector (one category).

    Attributes (units and sources):
        preset: the preset name this config came from (informational).
        architecture: ``"sd14-dino-vitb8"`` or ``"tiny"``; selects the networks (export/models.py).
        resolution: square input size in pixels the VAE sees (512 official).
        latent_channels, latent_downsample: latent is ``[latent_channels, res/latent_downsample, ...]``.
        scaling_factor: VAE latent scaling (0.18215 for SD v1).
        beta_start, beta_end, num_train_timesteps: the scaled-linear schedule (spec section 1).
        t_max: ``denoise_step``, the maximum noise level T_max.
        num_inference_steps: DDIM steps n (25 MVTec/MPDD, 15 VisA/PCB-Bank).
        noise_at: ``"t_max"`` (official) or ``"first_timestep"`` (see ``schedule.noising_timestep``).
        noise_offset: added to T_max for the noising step (-1 for VisA/PCB-Bank, official ``randint(T-1, T)``).
        guidance_scale: classifier-free guidance, baked into the UNet graph (9 official; 1 disables CFG).
        ads_enabled: run the ADS check (spec section 2); False gives plain DDIM reconstruction.
        tau: ADS threshold on the top-10 mean distance (``input_threshold``).
        min_step: latest step of the ADS decision; at ``t < min_step`` the decision is forced.
        ads_top_k: 10 (official).
        ads_layer: index into ``feature_layers`` of the layer used by ADS and SAFF (-1 = last).
        ads_imagenet_norm: False reproduces the official code (raw [-1, 1] decodes fed to DINO).
        saff_enabled: fuse with the sigmoid mask at a triggered step (spec section 3); False uses x~0 only.
        dino_resolution: square size the scoring features are computed at (512 MVTec, 256 VisA).
        patch_size: feature extractor patch size (8 for DINO ViT-B/8, 14 for ViT-S/14).
        feature_layers: 0-indexed transformer blocks whose pre-norm tokens are scored ([2, 5, 8, 11] official).
        pixel_weight: v of the pixel term (0 MVTec/MPDD, 1-7 VisA/PCB-Bank).
        bidirectional: ``"none"``, ``"sum"`` (single-class transistor, pcb1, pcb4) or ``"mean"`` (multi-class).
        blur_sigma: Gaussian sigma in pixels at dino_resolution (6).
        foreground_mode: 1 dark object, 2 bright object, 3 none (spec section 5).
        top_k: image score = mean of the top-K map values (250).
        score_reference: ``"input"`` (official) or ``"vae_roundtrip"`` (score the reconstruction against
            decode(encode(x)) so that VAE blur is not counted as anomaly; data.md measurements).
        num_seeds: average the anomaly maps over this many noise seeds (seed, seed+1, ...).
        seed: base noise seed; every image uses the same seeds, so results do not depend on batch mates.
        ads_resolution: square size of the decoded images fed to the feature extractor by ADS; None means
            ``resolution`` (official: 512, a 64x64 grid equal to the latent grid). The distance map is resized to
            the latent grid for SAFF when the grids differ (patch-14 extractors).
        ads_check_every: check-cost control (not in the official code, which checks at every step): run the ADS
            check only at every m-th DDIM step of an undecided image (step indices 0, m, 2m, ...) and at every step
            where the decision is forced (``t < min_step``, where SAFF-or-replace still needs the score). 1 is the
            official behaviour; m > 1 cuts the check cost about m-fold and coarsens the adaptive step.
        ads_reuse_final_decode: check-cost control: when an image is checked at the last DDIM step and not
            triggered there, its reconstruction is the check's decode of the post-check x0 estimate (x0_hat, or
            the input-anchored x~0 when forced) instead of a decode of the final DDIM latents: one decode fewer per
            image, an approximation (the last DDIM step adds sqrt(1 - alphas_cumprod[0]) = 0.029 of noise
            prediction). False is the official behaviour.
        chunk_size: query tokens per chunk in nearest-neighbour distances.
        conditioning: names the baked text conditioning ("a photo of sks" / ""; multi-class per-class presets:
            "a photo of sks<class>", no space, the official test prompt).
        load_resolution: multi-class presets (``main_multi.py``): images are prepared at this square size (256)
            and upsampled bilinearly (``align_corners=True``) to ``resolution`` before VAE encoding, in training and
            test; None (single-class) prepares straight at ``resolution``.
        class_name: the category (``"carpet"``, ``"pcb1"`` ...) when the preset is for one class; selects the
            training foreground mode (:func:`training_foreground_mode`); None for dataset-level presets.
        max_image_pixels: the pixel limit per image (width x height read from the file's header before decoding;
            :func:`glad_runtime.core.images.load_image`): a larger image is refused with ``ImageTooLargeError``
            and costs nothing (decompression bombs). Default 100 MP (10000 x 10000): one image at the limit peaks
            near 1.7 GB in ``glad detect`` (measured; README), so the default batch fits a 24 GB machine.
            ``glad detect`` / ``glad serve --max-image-pixels`` override it. A deployment setting: it does not
            change any result of an image within it.
    """

    preset: str = "sd14-dino-vitb8"
    architecture: str = "sd14-dino-vitb8"
    resolution: int = 512
    latent_channels: int = 4
    latent_downsample: int = 8
    scaling_factor: float = 0.18215
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    t_max: int = 750
    num_inference_steps: int = 25
    noise_at: str = "t_max"
    noise_offset: int = 0
    guidance_scale: float = 9.0
    ads_enabled: bool = True
    tau: float = 0.35
    min_step: int = 350
    ads_top_k: int = 10
    ads_layer: int = -1
    ads_imagenet_norm: bool = False
    saff_enabled: bool = True
    dino_resolution: int = 512
    patch_size: int = 8
    feature_layers: tuple[int, ...] = (2, 5, 8, 11)
    pixel_weight: float = 0.0
    bidirectional: str = "none"
    blur_sigma: float = 6.0
    foreground_mode: int = 3
    top_k: int = 250
    score_reference: str = "input"
    num_seeds: int = 1
    seed: int = 0
    ads_resolution: int | None = None
    ads_check_every: int = 1
    ads_reuse_final_decode: bool = False
    chunk_size: int = 1024
    conditioning: dict[str, str] = field(default_factory=lambda: {"prompt": "a photo of sks", "negative": ""})
    load_resolution: int | None = None
    class_name: str | None = None
    max_image_pixels: int = 100_000_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "feature_layers", tuple(int(x) for x in self.feature_layers))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigError: (a ``ValueError``) naming the field for any inconsistent value.
        """
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid GLAD config ({self.preset}): {msg}")

        for name, choices in FIELD_CHOICES.items():
            need(getattr(self, name) in choices, f"{name} must be one of {_choice_text(choices)}, got "
                                                 f"{getattr(self, name)!r}")
        need(self.resolution > 0 and self.resolution % self.latent_downsample == 0,
             "resolution must be a positive multiple of latent_downsample")
        need(self.dino_resolution % self.patch_size == 0, "dino_resolution must be a multiple of patch_size")
        need(self.ads_size % self.patch_size == 0, "ads_resolution must be a multiple of patch_size")
        need(1 <= self.num_inference_steps <= self.t_max <= 999, "need 1 <= num_inference_steps <= t_max <= 999")
        need(0 <= self.min_step <= 1000, "min_step must be in [0, 1000]")
        need(len(self.feature_layers) > 0, "feature_layers must not be empty")
        need(-len(self.feature_layers) <= self.ads_layer < len(self.feature_layers), "ads_layer out of range")
        need(self.num_seeds >= 1 and self.top_k >= 1 and self.ads_top_k >= 1 and self.chunk_size >= 1,
             "num_seeds, top_k, ads_top_k and chunk_size must be >= 1")
        need(self.guidance_scale >= 0, "guidance_scale must be >= 0")
        need(self.ads_check_every >= 1, "ads_check_every must be >= 1")
        need(self.load_resolution is None or 0 < self.load_resolution <= self.resolution,
             "load_resolution must be None or in (0, resolution]")
        need(self.max_image_pixels >= 1, "max_image_pixels must be >= 1")

    # ------------------------------------------------------------------ derived
    @property
    def latent_size(self) -> int:
        """Latent height and width ``resolution // latent_downsample``."""
        return self.resolution // self.latent_downsample

    @property
    def ads_size(self) -> int:
        """Square input size of the ADS feature check (``ads_resolution`` or ``resolution``)."""
        return self.ads_resolution or self.resolution

    def replace(self, **changes: Any) -> "GladConfig":
        """A copy with fields changed; unknown fields raise ``TypeError``."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["feature_layers"] = list(self.feature_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GladConfig":
        """Build from a dict (e.g. ``config.json``).

        Raises:
            ConfigError: (a ``ValueError``) unknown keys, or a value :meth:`validate` refuses.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown GLAD config keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- presets
_SD = GladConfig()

#: The tiny CPU preset (data.md "a measured starting point"): 128 px, 4x32x32 latents, DDIM 5 steps over T=300,
#: a ViT-S/14 stand-in at 224 px, layer 7 for scoring against the VAE round trip. ADS ships OFF here: on ELPV mono
#: (200 held-out cells) it lowered image AUROC (0.89 -> 0.85 with tau 0.05 / min_step 0; forced re-anchoring at
#: min_step 150 also lowered it) and cost 2.4x the time. Turn it on with ads_enabled=True; its check then runs
#: at 112 px (8x8 grid, resized to the 32x32 latent grid for SAFF).
TINY = GladConfig(
    preset="tiny", architecture="tiny", resolution=128, latent_downsample=4, scaling_factor=1.0,
    t_max=300, num_inference_steps=5, guidance_scale=1.0, ads_enabled=False, tau=0.05, min_step=0,
    dino_resolution=224, ads_resolution=112, patch_size=14, feature_layers=(7,), blur_sigma=4.0, top_k=250,
    score_reference="vae_roundtrip", chunk_size=1024,
)

# Appendix A, single class: (T_max, tau, v, min_step); bidirectional and foreground modes in the sets below
_MVTEC = {
    "carpet": (750, 0.32, 0, 350), "grid": (750, 0.47, 0, 350), "leather": (750, 0.35, 0, 350),
    "tile": (750, 0.35, 0, 350), "wood": (750, 0.37, 0, 350), "bottle": (750, 0.32, 0, 350),
    "cable": (750, 0.40, 0, 350), "capsule": (600, 0.40, 0, 350), "hazelnut": (750, 0.50, 0, 350),
    "metal_nut": (750, 0.40, 0, 350), "pill": (750, 0.35, 0, 350), "screw": (750, 0.32, 0, 350),
    "toothbrush": (750, 0.50, 0, 350), "transistor": (850, 0.50, 0, 350), "zipper": (750, 0.35, 0, 350),
}
_MPDD = {
    "bracket_black": (500, 0.35, 0, 350), "bracket_brown": (500, 0.35, 0, 350),
    "bracket_white": (450, 0.35, 0, 200), "connector": (500, 0.35, 0, 350),
    "metal_plate": (500, 0.35, 0, 350), "tubes": (500, 0.10, 0, 350),
}
_VISA = {
    "candle": (450, 0.45, 7, 200), "capsules": (450, 0.40, 7, 200), "cashew": (450, 0.40, 1, 200),
    "chewinggum": (450, 0.45, 1, 200), "fryum": (450, 0.35, 2, 200), "macaroni1": (450, 0.45, 7, 200),
    "macaroni2": (450, 0.45, 7, 200), "pcb1": (450, 0.30, 1, 200), "pcb2": (450, 0.30, 2, 200),
    "pcb3": (450, 0.30, 2, 200), "pcb4": (450, 0.30, 2, 200), "pipe_fryum": (450, 0.45, 2, 200),
}
_PCBBANK = {
    "pcb1": (450, 0.30, 1, 200), "pcb2": (450, 0.30, 2, 200), "pcb3": (450, 0.30, 2, 200),
    "pcb4": (450, 0.30, 2, 200), "pcb5": (450, 0.40, 2, 200), "pcb6": (450, 0.45, 1, 200),
    "pcb7": (450, 0.30, 2, 200),
}
_BIDIRECTIONAL = {"mvtec-transistor", "visa-pcb1", "visa-pcb4", "pcbbank-pcb1", "pcbbank-pcb4"}  # spec section 5
#: Single-class test-time foreground modes (spec section 5): mode 1 for these, mode 2 for bracket_white.
_FG_MODE = {"mvtec-screw": 1, "mvtec-capsule": 1, "mpdd-bracket_black": 1, "mpdd-bracket_brown": 1,
            "mpdd-bracket_white": 2}


def _single_class_presets() -> dict[str, GladConfig]:
    out: dict[str, GladConfig] = {}
    for dataset, table in (("mvtec", _MVTEC), ("mpdd", _MPDD), ("visa", _VISA), ("pcbbank", _PCBBANK)):
        visa_like = dataset in ("visa", "pcbbank")
        for cls, (t_max, tau, v, min_step) in table.items():
            name = f"{dataset}-{cls}"
            out[name] = _SD.replace(
                preset=name, t_max=t_max, tau=tau, pixel_weight=float(v), min_step=min_step,
                num_inference_steps=15 if visa_like else 25, noise_offset=-1 if visa_like else 0,
                dino_resolution=256 if visa_like else 512,
                bidirectional="sum" if name in _BIDIRECTIONAL else "none",
                foreground_mode=_FG_MODE.get(name, 3), class_name=cls,
            )
    return out


#: Training foreground modes of the anomaly synthesis (spec 4.2 step 5; ``dataset.py`` / ``dataset_multiclass.py``).
#: Multi-class test-time foreground masks use these same lists (spec section 5, ``dataset_multiclass.py``
#: L153-171); single-class test masks use ``_FG_MODE`` above. Every other class is mode 3 (no restriction).
TRAINING_FOREGROUND_MODES: dict[str, int] = {
    **{c: 1 for c in ("screw", "bottle", "capsule", "zipper", "bracket_black", "bracket_brown", "metal_plate")},
    **{c: 2 for c in ("hazelnut", "pill", "metal_nut", "toothbrush", "candle", "cashew", "chewinggum", "fryum",
                      "macaroni1", "macaroni2", "pipe_fryum", "bracket_white")},
}
#: Classes scored with the bidirectional term (spec section 5): summed single-class, averaged multi-class.
BIDIRECTIONAL_CLASSES = ("transistor", "pcb1", "pcb4")
#: The official data paths that noise at T_max - 1 (``reconstruction()``: ``randint(T-1, T)`` outside MVTec-AD /
#: MPDD); ``main_multi.py`` calls the same function, so the multi-class VisA / PCB-Bank presets do too.
NOISE_AT_T_MINUS_ONE = ("visa", "pcbbank")
MULTI_CLASS_LOAD_RESOLUTION = 256


def training_foreground_mode(class_name: str | None) -> int:
    """The anomaly-synthesis foreground mode of a class (spec 4.2 step 5): 1 dark object, 2 bright object, 3 none.

    Unknown or missing class names (custom data) get 3, the official default.
    """
    return TRAINING_FOREGROUND_MODES.get(class_name or "", 3)


def _multi_class_presets() -> dict[str, GladConfig]:
    """Multi-class presets (``main_multi.py`` L529-629, spec "Multi-class"): one dataset-level preset per dataset
    (``multi-visa``: training, and the dataset's shared settings) and one per class (``multi-visa-pcb1``: the test
    settings of that class: prompt "a photo of sks<class>", averaged bidirectional maps for transistor / pcb1 /
    pcb4, the training foreground mode as the test mask). All: data at 256 upsampled to 512, dino_res 256,
    25 steps; VisA / PCB-Bank noise at T_max - 1."""
    # (tau, T_max, min_step, v) from main_multi.py
    table = {"mvtec": (0.45, 650, 350, 0), "mpdd": (0.35, 500, 350, 0), "visa": (0.15, 500, 250, 2),
             "pcbbank": (0.20, 500, 250, 1)}
    classes = {"mvtec": _MVTEC, "mpdd": _MPDD, "visa": _VISA, "pcbbank": _PCBBANK}
    out: dict[str, GladConfig] = {}
    for d, (tau, t, m, v) in table.items():
        base = _SD.replace(preset=f"multi-{d}", tau=tau, t_max=t, min_step=m, pixel_weight=float(v),
                           dino_resolution=256, num_inference_steps=25,
                           noise_offset=-1 if d in NOISE_AT_T_MINUS_ONE else 0,
                           load_resolution=MULTI_CLASS_LOAD_RESOLUTION)
        out[base.preset] = base
        for cls in classes[d]:
            out[f"multi-{d}-{cls}"] = base.replace(
                preset=f"multi-{d}-{cls}", class_name=cls,
                conditioning={"prompt": "a photo of sks" + cls, "negative": ""},
                bidirectional="mean" if cls in BIDIRECTIONAL_CLASSES else "none",
                foreground_mode=training_foreground_mode(cls))
    return out


PRESETS: dict[str, GladConfig] = {
    "tiny": TINY,
    "sd14-dino-vitb8": _SD.replace(preset="sd14-dino-vitb8"),
    **_single_class_presets(),
    **_multi_class_presets(),
}


def preset_names() -> list[str]:
    """All preset names, sorted."""
    return sorted(PRESETS)


def get_preset(name: str, **overrides: Any) -> GladConfig:
    """The named preset, optionally with fields overridden.

    Args:
        name: a name of :func:`preset_names`.
        overrides: typed field values (e.g. from :func:`parse_overrides`), validated by :class:`GladConfig`.
    Raises:
        UnknownPresetError: (a :class:`ConfigError` and a ``KeyError``) unknown preset; the message gives the close
            matches and every known name.
        ConfigError: an override value :meth:`GladConfig.validate` refuses.
        TypeError: an override that is not a field.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UnknownPresetError(f"unknown preset {name!r}; {hint}known presets: {', '.join(preset_names())}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------------------------------- typed --set
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null")


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(GladConfig)


def _describe(hint: Any) -> str:
    """The expected type of a field in words (for error messages)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or none"
    if hint is bool:
        return "a bool (true/false, yes/no, on/off, 1/0)"
    if hint is int:
        return "an int"
    if hint is float:
        return "a finite float"
    if hint is str:
        return "a string"
    origin = typing.get_origin(hint)
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).split(' ', 1)[-1]}s (e.g. 2,5,8 or [2,5,8])"
    if origin is dict:
        return "a JSON object of strings (e.g. {\"prompt\": \"a photo of sks\"})"
    return str(hint)


def _convert(hint: Any, text: str) -> Any:
    """``text`` as a value of type ``hint``; raises ``ConfigError`` (or the builtin's ``ValueError``)
    when it does not parse; :func:`parse_value` words the message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in _NONE:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _convert(a, text)
            except ValueError:
                pass
        raise ConfigError(text)
    t = text.strip()
    if hint is bool:
        low = t.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(text)
    if hint is int:
        return int(t)
    if hint is float:
        v = float(t)
        if not math.isfinite(v):
            raise ConfigError(text)
        return v
    if hint is str:
        return text
    if origin in (tuple, list):
        if t.startswith("[") or t.startswith("("):
            t = t[1:-1] if t[-1:] in ("]", ")") else t
        items = [x for x in (p.strip() for p in t.split(",")) if x]
        vals = [_convert(args[0], x) for x in items]
        return tuple(vals) if origin is tuple else vals
    if origin is dict:
        v = json.loads(t)
        if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
            raise ConfigError(text)
        return v
    raise ConfigError(f"no parser for {hint}")


def _unknown_field(key: str, names: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; fields: {', '.join(names)}"
    return ConfigError(f"{key!r} is not a GladConfig field{hint}")


def parse_value(key: str, text: str) -> Any:
    """One config field's value from its text, typed as the :class:`GladConfig` field.

    Bools accept true/false, yes/no, on/off, 1/0 (any case); ints and floats (finite) as Python reads them;
    strings as given; ``feature_layers`` as ``2,5,8`` or ``[2,5,8]``; optional fields (``ads_resolution``) also
    ``none`` / ``null``; ``conditioning`` as a JSON object of strings. Literal-choice fields
    (:data:`FIELD_CHOICES`, e.g. ``bidirectional``) must be one of their values.

    Raises:
        ConfigError: ``key`` is not a field (close names suggested), or ``text`` does not parse to its type or
            is not one of its choices (the message names the field and the expected type).
    """
    hints = _field_types()
    if key not in hints:
        raise _unknown_field(key, list(hints))
    hint = hints[key]
    try:
        value = _convert(hint, text)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"{key}={text!r}: expected {_describe(hint)}") from None
    choices = FIELD_CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={text!r}: expected one of {_choice_text(choices)}")
    return value


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts (``glad ... --set KEY=VALUE``) -> ``{field: typed value}`` for :meth:`GladConfig.replace`.

    Each value is typed by :func:`parse_value`; a key given twice keeps its last value. Cross-field rules
    (e.g. ``num_inference_steps <= t_max``) are checked when the config is built (:meth:`GladConfig.validate`).

    Raises:
        ConfigError: an item without ``=``, an unknown key (close names suggested), or a value that does not parse
            to the field's type or choices (the field and the expected type are named).
    """
    out: dict[str, Any] = {}
    for item in pairs:
        if "=" not in item:
            raise ConfigError(f"expected KEY=VALUE, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        out[key] = parse_value(key, text)
    return out
