"""The GLAD pipeline: encode, noise, DDIM with ADS/SAFF, decode, score. Drives any :class:`Engines` backend.

Spec section 2.3 (full test-time reconstruction), 2.1-2.2 (ADS), 3 (SAFF), 5 (scoring). Per-image state is
explicit (:class:`_Track`), every image uses the same seeded noise, and the ADS decode/feature work is spent only on
undecided images, so an image's result does not depend on its batch mates (project decision 2).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from glad_runtime.core.ads import ads_decision, raw_feature_input, saff_fuse, saff_mask
from glad_runtime.core.scoring import anomaly_map, foreground_mask, nn_cosine_distance, resize_bilinear, topk_mean
from glad_runtime.core.config import GladConfig
from glad_runtime.core.images import Preprocessor
from glad_runtime.engines import EngineError, Engines, check_output
from glad_runtime.core.schedule import NoiseSchedule
from glad_runtime.errors import InvalidInputError  # noqa: F401 (re-exported)
from glad_runtime.errors import RequestCancelledError

__all__ = ["GladPipeline", "PipelineOutput", "InvalidInputError", "INPUT_RANGE_TOLERANCE"]

#: How far outside [-1, 1] a preprocessed value may lie (float rounding of other clients' preprocessing).
INPUT_RANGE_TOLERANCE = 1e-3


@dataclass
class PipelineOutput:
    """Results for a batch of ``B`` images.

    Attributes:
        scores: float32 ``[B]``, the top-K mean of the anomaly map (uncalibrated, >= 0).
        anomaly_maps: float32 ``[B, D, D]`` at ``dino_resolution``.
        adaptive_steps: int64 ``[B]``: DDIM timestep where ADS decided (first seed); -1 when ADS is disabled or
            the sample was never decided (only possible with ``min_step`` <= 1).
        ads_scores: float32 ``[B]``: the top-10 distance at the decision (NaN when never decided).
        saff_triggered: bool ``[B]``: True when the decision was a SAFF trigger (score > tau), False when forced.
        reconstructions: float32 ``[B, 3, R, R]`` in about [-1, 1] (first seed).
        timings: seconds per stage for the whole batch (``encode``, ``unet``, ``ads_decode``, ``ads_features``,
            ``decode``, ``features``, ``scoring``, ``total``).
    """

    scores: np.ndarray
    anomaly_maps: np.ndarray
    adaptive_steps: np.ndarray
    ads_scores: np.ndarray
    saff_triggered: np.ndarray
    reconstructions: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Track:
    """Per-image ADS state through one reconstruction (explicit so a step-level scheduler stays a small step)."""

    decided: bool = False
    adaptive_step: int = -1
    ads_score: float = float("nan")
    triggered: bool = False


class GladPipeline:
    """Runs GLAD over batches of preprocessed images against an :class:`Engines` backend.

    Args:
        engines: the four networks (PyTorch, ONNX Runtime or Triton).
        config: the detector's :class:`GladConfig`.
        check_decided: reproduce the official code's cost (spec 2.2: "DINO and VAE decodes stop only when *all*
            samples in the batch are decided"): while any image of the batch is undecided, the check runs on every
            image; decided images ignore its result, so results are unchanged. For benchmarks (``bench.run``).
    """

    def __init__(self, engines: Engines, config: GladConfig, *, check_decided: bool = False):
        self.engines = engines
        self.config = config
        self.check_decided = bool(check_decided)
        self.schedule = NoiseSchedule.create(
            config.t_max, config.num_inference_steps, beta_start=config.beta_start, beta_end=config.beta_end,
            num_train_timesteps=config.num_train_timesteps, noise_at=config.noise_at,
            noise_offset=config.noise_offset)
        self._timings: dict[str, float] = defaultdict(float)
        self._timings_lock = threading.Lock()
        #: Optional ``() -> falsy | str`` checked before every DDIM step; a truthy answer (the reason) makes
        #: :meth:`reconstruct` raise :class:`~glad_runtime.errors.RequestCancelledError` (the served BLS model
        #: sets it from the request's cancellation and timeout, so abandoned work stops).
        self.should_stop = None

    @property
    def preprocessor(self) -> Preprocessor:
        """The preprocessing of this pipeline's config (:meth:`Preprocessor.from_config`): what turns images
        into the ``[B, 3, R, R]`` batches it takes, and :meth:`Preprocessor.scoring_images` for its scoring."""
        return Preprocessor.from_config(self.config)

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._timings_lock:  # the step scheduler may run stages in two threads (overlap)
                self._timings[stage] += time.perf_counter() - start

    def _latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        c = self.config
        return batch, c.latent_channels, c.latent_size, c.latent_size

    def noise(self, batch: int, seed: int) -> np.ndarray:
        """``eps0`` float32 ``[B, C, h, w]``: the same seeded standard-normal draw for every image."""
        c = self.config
        one = np.random.default_rng(seed).standard_normal((c.latent_channels, c.latent_size, c.latent_size),
                                                          dtype=np.float32)
        return np.broadcast_to(one, self._latent_shape(batch)).copy()

    def encode(self, images: np.ndarray) -> np.ndarray:
        with self._timed("encode"):
            return check_output("encode", self.engines.encode(images), self._latent_shape(len(images)))

    def decode(self, latents: np.ndarray, stage: str = "decode") -> np.ndarray:
        r = self.config.resolution
        with self._timed(stage):
            return check_output("decode", self.engines.decode(latents), (len(latents), 3, r, r))

    def features(self, images: np.ndarray, stage: str = "features") -> list[np.ndarray]:
        c = self.config
        g = images.shape[-1] // c.patch_size
        with self._timed(stage):
            feats = self.engines.features(images)
        if len(feats) != len(c.feature_layers):
            raise EngineError(f"features: {len(feats)} layers returned, config has {len(c.feature_layers)}")
        return [check_output("features", f, (len(images), g, g, f.shape[-1])) for f in feats]

    # ------------------------------------------------------------------ ADS check
    def ads_check(self, x0: np.ndarray, eps: np.ndarray, latents: np.ndarray, eps0: np.ndarray,
                  t: int | np.ndarray, keep_decodes: bool = False) -> tuple:
        """One batched ADS check of undecided images (spec 2.1-2.2, section 3), shared by this pipeline and the
        step scheduler (where the images may be at different timesteps).

        Args:
            x0: model estimates ``[U, C, h, w]``; eps: noise predictions; latents: clean ``z0``; eps0: the initial
                noise; t: timestep, scalar or int ``[U]``.
            keep_decodes: also return the decodes of the post-check estimates (``ads_reuse_final_decode``).
        Returns:
            ``(x0, scores, trigger, forced)``: the estimates after SAFF fusion (triggered) or replacement by the
            input-anchored estimate (forced), the top-k check scores float ``[U]`` and the two bool ``[U]`` masks.
            With ``keep_decodes`` a fifth item: float32 ``[U, 3, R, R]``, the decode of each returned estimate, NaN
            for the triggered (fused, never decoded) ones.
        """
        c, s = self.config, self.schedule
        n = len(x0)
        anchored = s.input_anchored_sample(latents, eps0, eps, t)
        fused = getattr(self.engines, "ads_distance", None)
        dist = None
        if callable(fused) and not keep_decodes:  # decode, features and distance on the engine's device
            with self._timed("ads_fused"):
                dist = fused(x0, anchored, c)
            if dist is not None:
                g = c.ads_size // c.patch_size
                dist = check_output("ads_distance", dist, (n, g, g))
        if dist is None:
            # decode both estimates of the undecided images in one call
            imgs = raw = self.decode(np.concatenate([x0, anchored]), stage="ads_decode")
            if c.ads_size != c.resolution:
                imgs = resize_bilinear(imgs, (c.ads_size, c.ads_size))
            if not c.ads_imagenet_norm:
                imgs = raw_feature_input(imgs)
            feats = self.features(imgs, stage="ads_features")[c.ads_layer]
            with self._timed("ads_distance"):
                dist = nn_cosine_distance(feats[n:], feats[:n], c.chunk_size)  # i: anchored, j: model (spec 2.1)
        with self._timed("ads_distance"):
            scores = topk_mean(dist, c.ads_top_k)
        trigger, forced = ads_decision(scores, t, c.tau, c.min_step)
        x0 = x0.copy()
        if trigger.any() and c.saff_enabled:
            m = saff_mask(dist[trigger], (c.latent_size, c.latent_size))
            x0[trigger] = saff_fuse(x0[trigger], anchored[trigger], m)
        elif trigger.any():
            x0[trigger] = anchored[trigger]
        x0[forced] = anchored[forced]
        if not keep_decodes:
            return x0, scores, trigger, forced
        decodes = np.where(forced[:, None, None, None], raw[n:], raw[:n])
        decodes[trigger] = np.nan
        return x0, scores, trigger, forced, decodes

    # ------------------------------------------------------------------ reconstruction
    def check_due(self, step_index: int, t: int) -> bool:
        """Whether an undecided image at DDIM step ``step_index`` (timestep ``t``) is checked: every
        ``ads_check_every``-th step, and every step where the decision is forced (``t < min_step``)."""
        c = self.config
        return step_index % c.ads_check_every == 0 or t < c.min_step

    def reconstruct(self, latents: np.ndarray, seed: int) -> tuple[np.ndarray, list[_Track], dict[int, np.ndarray]]:
        """DDIM reconstruction of clean input latents with ADS/SAFF (spec 2.3 steps 3-7).

        Args:
            latents: ``z0`` float32 ``[B, C, h, w]`` (scaled VAE latents).
            seed: noise seed for ``eps0``.
        Returns:
            ``(x0_latents [B, C, h, w], tracks, reused)``: the final latents (decode them for the reconstruction),
            the per-image ADS record, and ``{image index: reconstruction [3, R, R]}`` for the images whose
            reconstruction is the last-step check's decode (``ads_reuse_final_decode``; empty otherwise).
        """
        c, s = self.config, self.schedule
        b = len(latents)
        eps0 = self.noise(b, seed)
        x = s.add_noise(latents, eps0, s.noise_timestep)
        tracks = [_Track() for _ in range(b)]
        reused: dict[int, np.ndarray] = {}
        last = len(s.timesteps) - 1
        for k, t in enumerate(s.timesteps):
            t = int(t)
            stop = self.should_stop() if self.should_stop is not None else None  # hook: an abandoned request
            if stop:
                raise RequestCancelledError(f"stopped before DDIM step {k + 1}/{last + 1}: {stop}")
            with self._timed("unet"):
                eps = check_output("unet", self.engines.unet(x, np.full(b, t, dtype=np.int64)), x.shape)
            x0 = s.pred_original_sample(x, eps, t)
            undecided = [i for i, tr in enumerate(tracks) if not tr.decided]
            checked = undecided if c.ads_enabled and self.check_due(k, t) else []
            if checked and self.check_decided:  # official cost: the whole batch is checked while any is undecided
                checked = list(range(b))
            if checked:
                u = np.asarray(checked)
                keep = c.ads_reuse_final_decode and k == last
                x0_checked, scores, trigger, forced, *decodes = self.ads_check(
                    x0[u], eps[u], latents[u], eps0[u], t, keep_decodes=keep)
                for j, i in enumerate(checked):
                    if tracks[i].decided:
                        continue
                    x0[i] = x0_checked[j]
                    if trigger[j] or forced[j]:
                        tracks[i] = _Track(True, t, float(scores[j]), bool(trigger[j]))
                    if keep and not trigger[j]:
                        reused[i] = decodes[0][j]
            x = s.ddim_step(x0, eps, t)
        return x, tracks, reused

    def final_decode(self, final: np.ndarray, reused: dict[int, np.ndarray]) -> np.ndarray:
        """Reconstructions ``[B, 3, R, R]``: the decode of the final latents, except where a last-step check's
        decode is reused (those images are not decoded again)."""
        todo = [i for i in range(len(final)) if i not in reused]
        out = np.empty((len(final), 3, self.config.resolution, self.config.resolution), np.float32)
        if todo:
            out[todo] = self.decode(final[todo])
        for i, img in reused.items():
            out[i] = img
        return out

    # ------------------------------------------------------------------ full run
    def validate_batch(self, images: np.ndarray) -> np.ndarray:
        """Check a preprocessed batch: float ``[B, 3, R, R]``, finite, in [-1, 1] (within
        :data:`INPUT_RANGE_TOLERANCE`). Returns it as contiguous float32.

        Out-of-range input is refused, never scored: 0..255 floats would score as "anomalous" and all-5.0 input as
        anything at all (anomalib #3726 is the same trap). 0..1 floats lie inside the range and cannot be told
        from a dark image: send encoded files (``image_files``) or use :attr:`preprocessor`.

        Raises:
            InvalidInputError: wrong rank, channel count or size, a non-float dtype, non-finite values, or values
                outside [-1, 1] (the message names the range and the batch's min and max).
        """
        r = self.config.resolution
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (3, r, r) or images.shape[0] < 1:
            raise InvalidInputError(f"expected images float32 [B, 3, {r}, {r}] in [-1, 1], got {list(images.shape)}")
        if not np.issubdtype(images.dtype, np.floating):
            raise InvalidInputError(f"expected float32 images in [-1, 1], got dtype {images.dtype}")
        if not np.isfinite(images).all():
            raise InvalidInputError("images contain NaN or Inf (expected finite float32 in [-1, 1])")
        lo, hi = float(images.min()), float(images.max())
        if lo < -1.0 - INPUT_RANGE_TOLERANCE or hi > 1.0 + INPUT_RANGE_TOLERANCE:
            raise InvalidInputError(f"images must lie in [-1, 1] (x / 255 * 2 - 1 for 8-bit pixels), got values in "
                                    f"[{lo:.4g}, {hi:.4g}]")
        return np.ascontiguousarray(images, dtype=np.float32)

    def __call__(self, images: np.ndarray) -> PipelineOutput:
        """Run GLAD on a batch of preprocessed images.

        Args:
            images: float32 ``[B, 3, R, R]`` in [-1, 1] (``GladPipeline.preprocessor``).
        Returns:
            :class:`PipelineOutput`.
        Raises:
            InvalidInputError: bad batch. EngineError: a network returned a wrong shape or non-finite values.
        """
        c = self.config
        images = self.validate_batch(images)
        self._timings = defaultdict(float)
        start = time.perf_counter()
        latents = self.encode(images)
        d = (c.dino_resolution, c.dino_resolution)
        source = self.preprocessor.scoring_images(images)  # multi-class presets: the load-size image
        reference = self.decode(latents) if c.score_reference == "vae_roundtrip" else source
        ref_small = resize_bilinear(reference, d)
        feats_in = self.features(ref_small)
        with self._timed("scoring"):
            fg = None if c.foreground_mode == 3 else foreground_mask(source, c.foreground_mode, d)
        maps = []
        recon0, tracks0 = None, None
        for k in range(c.num_seeds):
            final, tracks, reused = self.reconstruct(latents, c.seed + k)
            recon = self.final_decode(final, reused)
            rec_small = resize_bilinear(recon, d)
            feats_rec = self.features(rec_small)
            with self._timed("scoring"):
                maps.append(anomaly_map(feats_in, feats_rec, d, images_input=ref_small, images_recon=rec_small,
                                        pixel_weight=c.pixel_weight, bidirectional=c.bidirectional,
                                        blur_sigma=c.blur_sigma, fg_mask=fg, chunk_size=c.chunk_size))
            if recon0 is None:
                recon0, tracks0 = recon, tracks
        amap = maps[0] if len(maps) == 1 else np.mean(maps, axis=0).astype(np.float32)
        if not np.isfinite(amap).all():
            raise EngineError("anomaly map contains non-finite values")
        scores = topk_mean(amap, c.top_k)
        self._timings["total"] = time.perf_counter() - start
        return PipelineOutput(
            scores=scores,
            anomaly_maps=amap,
            adaptive_steps=np.array([t.adaptive_step for t in tracks0], dtype=np.int64),
            ads_scores=np.array([t.ads_score for t in tracks0], dtype=np.float32),
            saff_triggered=np.array([t.triggered for t in tracks0], dtype=bool),
            reconstructions=recon0,
            timings=dict(self._timings),
        )
