"""Adaptive Denoising Steps (ADS) and Spatial-Adaptive Feature Fusion (SAFF): the pure parts (numpy only).

Spec sections 2.1-2.2 and 3. The pipeline (``glad_runtime.pipeline.batch``) calls the networks; these functions take
their outputs and decide.
"""

from __future__ import annotations

import numpy as np

from glad_runtime.core.scoring import IMAGENET_MEAN, IMAGENET_STD, resize_bilinear
from glad_runtime.errors import EngineError

__all__ = ["ads_decision", "saff_mask", "saff_fuse", "raw_feature_input"]


def ads_decision(scores: np.ndarray, t: int, tau: float, min_step: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-sample ADS decision at DDIM timestep ``t`` (spec 2.2), for samples still undecided.

    * ``trigger = score > tau``: the sample is decided here and its x0 estimate is fused by SAFF;
    * ``forced = not trigger and t < min_step``: decided here, x0 replaced by the input-anchored x~0.

    Args:
        scores: float ``[U]`` top-10 mean distances of the undecided samples (non-finite scores raise).
        t: the current DDIM timestep.
        tau: ``input_threshold``.
        min_step: ``min_step``.
    Returns:
        ``(trigger, forced)``, two bool ``[U]`` arrays, never both true for a sample.
    Raises:
        EngineError: a non-finite score (never decided silently).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise EngineError("non-finite ADS score")
    trigger = scores > tau
    forced = ~trigger & (t < min_step)
    return trigger, forced


def saff_mask(distance_map: np.ndarray, latent_size: tuple[int, int]) -> np.ndarray:
    """SAFF fusion weight ``m = sigmoid(A)`` at latent resolution (spec section 3).

    ``A`` is the ADS nearest-neighbour cosine distance map at feature-grid resolution. With DINO ViT-B/8 at 512 px
    the grid (64x64) equals the latent grid and no resize happens; otherwise (e.g. a patch-14 extractor) ``A`` is
    resized bilinearly (align_corners) before the sigmoid. No normalisation, threshold or smoothing.

    Args:
        distance_map: float ``[B, gh, gw]``, values in [0, 2].
        latent_size: ``(h, w)``.
    Returns:
        float32 ``[B, 1, h, w]`` in [0.5, 0.881], broadcasting over the latent channels.
    """
    a = resize_bilinear(distance_map, latent_size)
    return (1.0 / (1.0 + np.exp(-a)))[:, None].astype(np.float32)


def saff_fuse(pred_original_sample: np.ndarray, input_anchored: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``x0* = m * x0_hat + (1 - m) * x~0`` (spec section 3): the model estimate where the mask is high.

    Args:
        pred_original_sample: model estimate ``x0_hat`` float32 ``[B, C, h, w]``.
        input_anchored: ``x~0`` float32 ``[B, C, h, w]``.
        mask: float32 ``[B, 1, h, w]`` from :func:`saff_mask`.
    """
    return (mask * pred_original_sample + (1.0 - mask) * input_anchored).astype(np.float32)


def raw_feature_input(images: np.ndarray) -> np.ndarray:
    """Pre-map images so that a feature extractor that ImageNet-normalises inside sees the raw values.

    The official ADS check feeds VAE decodes in [-1, 1] to DINO **without** ImageNet normalisation (spec 2.1
    item 3). Our feature graphs normalise inside (``((x+1)/2 - mean)/std``); feeding
    ``x' = 2 * (x * std + mean) - 1`` makes the network see exactly ``x``. Float32 ``[B, 3, H, W]`` in and out.
    """
    return (2.0 * (images * IMAGENET_STD[:, None, None] + IMAGENET_MEAN[:, None, None]) - 1.0).astype(np.float32)
