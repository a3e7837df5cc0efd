"""Step-level scheduler: in-flight batching across images that are at different denoising steps.

ADS gives every image its own work: the check (decode two x0 estimates, features, distances) runs at every step
until the image decides, and images decide at different steps. :class:`GladPipeline` runs a fixed batch through
all steps together; a production line, though, sends a stream. :class:`StepScheduler` keeps a pool of in-flight
images, each at its own DDIM step, seed and ADS state. Each :meth:`~StepScheduler.tick`:

1. admits queued images into free pool slots (one batched encode, reference decode and input features for them);
2. makes **one** UNet call for every active image, each at its own timestep (per-sample ``timesteps``);
3. makes **one** batched ADS check for the images still undecided, whatever step they are at;
4. finishes the images that completed their last step (one batched decode, features and anomaly map), starting
   the next noise seed where ``num_seeds > 1``, and returns finished results.

With ``overlap=True`` a tick does the work that only the final scoring needs beside its denoising step: new images
are encoded and join this tick's UNet call at once, while worker threads compute their reference decode and input
features and finish the images that ran their last step in an earlier tick (decode, features, anomaly map). Where
the networks run in other processes (the served in-flight model: each network model is its own python-backend
process) or on another device, these then share the machine instead of queuing behind the loop: a tick costs about
its longest part, not their sum. An image then takes one tick more per seed (its steps, then finished), each
shorter.

Per image the arithmetic is the pipeline's (same seeded noise, same schedule, same decision rule, same scoring), so
results equal :class:`GladPipeline`'s within float tolerance and do not depend on which images shared a tick
(tested). Back-pressure: the queue is bounded; :meth:`~StepScheduler.submit` raises :class:`QueueFullError`
instead of growing without bound, and :meth:`~StepScheduler.stream` pulls from its input only when there is room.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from glad_runtime.core.scoring import anomaly_map, foreground_mask, resize_bilinear, topk_mean
from glad_runtime.core.config import GladConfig
from glad_runtime.core.detection import Detection
from glad_runtime.engines import EngineError, Engines, check_output
from glad_runtime.pipeline.batch import GladPipeline
from glad_runtime.errors import QueueFullError, UsageError  # noqa: F401 (re-exported)

__all__ = ["StepScheduler", "QueueFullError"]



@dataclass
class _Slot:
    key: Any
    image: np.ndarray
    latents: np.ndarray = None
    ref_small: np.ndarray = None
    feats_in: list = None
    fg: np.ndarray | None = None
    seed_index: int = 0
    step: int = 0
    x: np.ndarray = None
    eps0: np.ndarray = None
    decided: bool = False
    adaptive_step: int = -1
    ads_score: float = float("nan")
    triggered: bool = False
    first: tuple | None = None  # (adaptive_step, ads_score, triggered) of seed 0
    maps: list = field(default_factory=list)
    reused: np.ndarray | None = None  # last-step check decode used as the reconstruction (ads_reuse_final_decode)
    ticks: int = 0
    finished: bool = False  # set by _finish on the last seed; tick then drops the slot from the pool


class StepScheduler:
    """In-flight batching of GLAD over a stream of images.

    Args:
        engines: any :class:`~glad_runtime.engines.Engines` (per-sample ``timesteps`` are required, as all ours do).
        config: the detector's :class:`GladConfig`.
        max_active: images in flight (the UNet batch of a full tick).
        max_queue: images waiting for a slot; :meth:`submit` beyond it raises :class:`QueueFullError`.
        overlap: run a tick's admission and finishing in worker threads beside its denoising step (module
            docstring); the engines must accept concurrent calls (ours do: ONNX Runtime sessions, BLS requests,
            Triton clients). Results are unchanged.
    Raises:
        UsageError: ``max_active`` or ``max_queue`` < 1.
    """

    def __init__(self, engines: Engines, config: GladConfig, *, max_active: int = 8, max_queue: int = 64,
                 overlap: bool = False):
        if max_active < 1 or max_queue < 1:
            raise UsageError(f"max_active and max_queue must be >= 1, got {max_active}, {max_queue}")
        self.pipeline = GladPipeline(engines, config)  # the same helpers, noise and schedule as the batch pipeline
        self.config, self.schedule = config, self.pipeline.schedule
        self.max_active, self.max_queue = int(max_active), int(max_queue)
        self._queue: deque[_Slot] = deque()
        self._active: list[_Slot] = []
        self._count = 0
        self.stats = {"ticks": 0, "unet_calls": 0, "unet_images": 0, "check_calls": 0, "check_images": 0}
        self.overlap = bool(overlap)
        self._workers = ThreadPoolExecutor(2, thread_name_prefix="glad-tick") if self.overlap else None

    # ------------------------------------------------------------------ submission
    @property
    def pending(self) -> int:
        """Images queued or in flight."""
        return len(self._queue) + len(self._active)

    def submit(self, image: np.ndarray, key: Any = None) -> Any:
        """Queue one preprocessed image ``float32 [3, R, R]`` in [-1, 1]; returns its key.

        Raises:
            QueueFullError: ``max_queue`` images are already waiting.
            InvalidInputError: wrong shape, dtype or non-finite values (nothing is queued).
        """
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"{len(self._queue)} images queued (max_queue={self.max_queue}); retry later")
        img = self.pipeline.validate_batch(np.asarray(image)[None])[0]
        key = self._count if key is None else key
        self._count += 1
        self._queue.append(_Slot(key=key, image=img))
        return key

    def cancel(self, keys: Iterable[Any]) -> int:
        """Drop the queued or in-flight images with these keys (an abandoned request); returns how many were
        dropped. The others are unaffected: a result does not depend on which images shared its ticks."""
        drop = set(keys)
        before = self.pending
        self._queue = deque(s for s in self._queue if s.key not in drop)
        self._active = [s for s in self._active if s.key not in drop]
        return before - self.pending

    def clear(self) -> list[Any]:
        """Drop every queued and in-flight image; returns their keys (after a failed :meth:`tick`, whose images
        are in an unknown state; images that tick had taken from the queue are dropped too, and not among the
        keys: callers track their own requests)."""
        keys = [s.key for s in self._active] + [s.key for s in self._queue]
        self._queue.clear()
        self._active = []
        return keys

    # ------------------------------------------------------------------ the tick
    def tick(self) -> list[Detection]:
        """One scheduling step (admit, one UNet call, one ADS check, finish); returns the images finished by it."""
        if not self._queue and not self._active:
            return []
        last = len(self.schedule.timesteps)
        new = self._take()
        if self.overlap:  # the scoring-only work of new and of finished images beside the denoising step
            fin = [s for s in self._active if s.step >= last]
            self._admit_latents(new)
            act = [s for s in self._active + new if s.step < last]  # before _finish may restart a seed (step 0)
            jobs = [self._workers.submit(self._admit_reference, new) if new else None,
                    self._workers.submit(self._finish, fin) if fin else None]
            try:
                self._denoise(act)
            finally:
                results = [None if j is None else j.exception() or j.result() for j in jobs]
            for r in results:
                if isinstance(r, BaseException):
                    raise r
            done = results[1] or []
        else:
            self._admit(new)
            self._denoise([s for s in self._active + new if s.step < last])
            done = self._finish([s for s in self._active + new if s.step >= last])
        self._active.extend(new)
        self._active = [s for s in self._active if not s.finished]
        for s in self._active:
            s.ticks += 1
        self.stats["ticks"] += 1
        return done

    def drain(self) -> Iterator[Detection]:
        """Tick until every submitted image has finished, yielding results as they finish."""
        while self.pending:
            yield from self.tick()

    def stream(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[Detection]:
        """Results for a stream of ``(key, image)``, yielded as each finishes (not in input order).

        The input is pulled only while there is room in the pool, so an endless stream runs in bounded memory.
        """
        it = iter(items)
        exhausted = False
        while True:
            while not exhausted and len(self._queue) < min(self.max_queue, self.max_active):
                try:
                    key, image = next(it)
                except StopIteration:
                    exhausted = True
                    break
                self.submit(image, key)
            if not self.pending:
                return
            yield from self.tick()

    # ------------------------------------------------------------------ stages
    def _take(self) -> list[_Slot]:
        """Queued images for the free pool slots (removed from the queue)."""
        new = []
        while self._queue and len(self._active) + len(new) < self.max_active:
            new.append(self._queue.popleft())
        return new

    def _admit(self, new: list[_Slot]) -> None:
        """Admission of ``new``: :meth:`_admit_latents` then :meth:`_admit_reference`."""
        self._admit_latents(new)
        self._admit_reference(new)

    def _admit_latents(self, new: list[_Slot]) -> None:
        """One batched encode of ``new`` and the start of their first seed: all the denoising loop needs."""
        if not new:
            return
        latents = self.pipeline.encode(np.stack([s.image for s in new]))
        for i, s in enumerate(new):
            s.latents = latents[i]
            self._start_seed(s, 0)

    def _admit_reference(self, new: list[_Slot]) -> None:
        """What only the final scoring needs: the reference decode (``vae_roundtrip``), its features at the scoring
        size and the foreground mask of ``new`` (after :meth:`_admit_latents`)."""
        if not new:
            return
        c, p = self.config, self.pipeline
        images = np.stack([s.image for s in new])
        d = (c.dino_resolution, c.dino_resolution)
        source = p.preprocessor.scoring_images(images)  # multi-class presets: the load-size image
        reference = p.decode(np.stack([s.latents for s in new])) if c.score_reference == "vae_roundtrip" else source
        ref_small = resize_bilinear(reference, d)
        feats_in = p.features(ref_small)
        fg = None if c.foreground_mode == 3 else foreground_mask(source, c.foreground_mode, d)
        for i, s in enumerate(new):
            s.ref_small = ref_small[i]
            s.feats_in = [f[i] for f in feats_in]
            s.fg = None if fg is None else fg[i]

    def _start_seed(self, s: _Slot, k: int) -> None:
        sch = self.schedule
        s.seed_index, s.step = k, 0
        s.eps0 = self.pipeline.noise(1, self.config.seed + k)[0]
        s.x = sch.add_noise(s.latents[None], s.eps0[None], sch.noise_timestep)[0]
        s.decided, s.adaptive_step, s.ads_score, s.triggered = False, -1, float("nan"), False
        s.reused = None

    def _denoise(self, act: list[_Slot]) -> None:
        """One UNet call for ``act`` (each at its own step), one ADS check for its undecided images, the DDIM
        update."""
        c, p, sch = self.config, self.pipeline, self.schedule
        if not act:
            return
        t = np.array([int(sch.timesteps[s.step]) for s in act], dtype=np.int64)
        x = np.stack([s.x for s in act])
        with p._timed("unet"):
            eps = p.engines.unet(x, t)
        eps = check_output("unet", eps, x.shape)
        self.stats["unet_calls"] += 1
        self.stats["unet_images"] += len(act)
        x0 = sch.pred_original_sample(x, eps, t)
        und = np.array([i for i, s in enumerate(act) if not s.decided and p.check_due(s.step, int(t[i]))],
                       dtype=np.int64)
        if c.ads_enabled and len(und):
            lat = np.stack([act[i].latents for i in und])
            e0 = np.stack([act[i].eps0 for i in und])
            keep = c.ads_reuse_final_decode
            x0[und], scores, trigger, forced, *decodes = p.ads_check(x0[und], eps[und], lat, e0, t[und],
                                                                     keep_decodes=keep)
            self.stats["check_calls"] += 1
            self.stats["check_images"] += len(und)
            last = len(sch.timesteps) - 1
            for k, i in enumerate(und):
                s = act[i]
                if trigger[k] or forced[k]:
                    s.decided, s.adaptive_step, s.ads_score = True, int(t[i]), float(scores[k])
                    s.triggered = bool(trigger[k])
                if keep and s.step == last and not trigger[k]:
                    s.reused = decodes[0][k]
        x_next = sch.ddim_step(x0, eps, t)
        for i, s in enumerate(act):
            s.x = x_next[i]
            s.step += 1

    def _finish(self, fin: list[_Slot]) -> list[Detection]:
        """One batched decode, features and anomaly map for ``fin`` (images past their last step); returns the
        finished Detections (their slots marked ``finished``) and restarts the others' next seed."""
        c, p = self.config, self.pipeline
        if not fin:
            return []
        d = (c.dino_resolution, c.dino_resolution)
        recon = p.final_decode(np.stack([s.x for s in fin]),
                               {i: s.reused for i, s in enumerate(fin) if s.reused is not None})
        rec_small = resize_bilinear(recon, d)
        feats_rec = p.features(rec_small)
        feats_in = [np.stack([s.feats_in[layer] for s in fin]) for layer in range(len(c.feature_layers))]
        fg = None if c.foreground_mode == 3 else np.stack([s.fg for s in fin])
        with p._timed("scoring"):
            maps = anomaly_map(feats_in, feats_rec, d, images_input=np.stack([s.ref_small for s in fin]),
                               images_recon=rec_small, pixel_weight=c.pixel_weight, bidirectional=c.bidirectional,
                               blur_sigma=c.blur_sigma, fg_mask=fg, chunk_size=c.chunk_size)
        done = []
        for i, s in enumerate(fin):
            s.maps.append(maps[i])
            if s.seed_index == 0:
                s.first = (s.adaptive_step, s.ads_score, s.triggered)
            if s.seed_index + 1 < c.num_seeds:
                self._start_seed(s, s.seed_index + 1)
                continue
            amap = s.maps[0] if len(s.maps) == 1 else np.mean(s.maps, axis=0).astype(np.float32)
            if not np.isfinite(amap).all():
                raise EngineError(f"anomaly map of {s.key!r} contains non-finite values")
            s.finished = True
            step, ads_score, trig = s.first
            done.append(Detection(source=s.key, score=float(topk_mean(amap[None], c.top_k)[0]), anomaly_map=amap,
                                  adaptive_step=step, ads_score=None if np.isnan(ads_score) else float(ads_score),
                                  saff_triggered=bool(trig), ticks=s.ticks + 1))
        return done
