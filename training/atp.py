"""ATP training (Anomaly-oriented Training Paradigm, spec section 4) and the tiny preset's VAE training.

``glad train --preset P DATA OUT_BUNDLE``:

1. read ``DATA/train/good`` (an MVTec-format category) at the preset's resolution;
2. ``tiny`` only: train the VAE on those normal images (no pretrained VAE exists offline), L1 + 1e-6 KL, then set
   ``scaling_factor = 1 / std(latents)`` so the latents have unit variance like SD's 0.18215 does;
3. make synthetic anomalies (``training.synth``, spec 4.2; about half untouched), encode normal and anomalous images
   once with the frozen VAE (posterior mean), with horizontal/vertical flips as augmentation;
4. train the UNet with the ATP loss, target (A) (project decision 1)::

       lambda = t / 1000,  z_s = lambda * z_a + (1 - lambda) * z_n,  x_t = sqrt(a_t) z_s + sqrt(1 - a_t) eps
       eps_target = eps + sqrt(a_t / (1 - a_t)) * lambda * (z_a - z_n)      (float64)
       loss = MSE(eps_theta(x_t, t, c), eps_target)

   so the x0 formula maps an anomalous noisy latent back to the *normal* latent ``z_n``.

Runs under ``accelerate`` (mixed precision: fp16 on GPU, fp32 on CPU; several GPUs via ``accelerate launch``),
with seeded sampling, a progress bar showing the loss, and checkpoints that ``--resume`` continues from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from glad_runtime.core.bundle import Bundle
from glad_runtime.core.config import GladConfig, training_foreground_mode
from glad_runtime.core.images import Preprocessor, load_image
from glad_runtime.core.schedule import scaled_linear_alphas_cumprod
from glad_runtime.errors import UsageError

__all__ = ["TrainConfig", "atp_target", "atp_loss", "train_bundle", "load_train_images", "train_vae", "train_unet"]


@dataclass
class TrainConfig:
    """Training settings (defaults sized for the tiny preset on a 2-core CPU; sd14 uses the official values).

    Attributes:
        vae_steps, vae_batch, vae_lr, vae_kl_weight: tiny VAE training (data.md: L1 + 1e-6 KL, batch 8).
        vae_crop: train the (fully convolutional) VAE on random crops of this size (0 = full images, default).
            64 px crops of 128 px ELPV cells are 2.5x faster per step but reached only 21.4 dB PSNR in 400 steps
            against 27.9 dB for 300 full-image steps, and the detector's AUROC fell with it.
        unet_steps, unet_batch, unet_lr, weight_decay, grad_clip: UNet training (official: lr 5e-6, wd 1e-2,
            clip 1.0, batch 32, constant schedule; the tiny from-scratch UNet uses lr 1e-3).
        variants: synthetic-anomaly draws per training image (each about half untouched, spec 4.2 step 7).
        mixed_precision: "auto" (fp16 on CUDA, none on CPU), "no", "bf16" or "fp16".
        checkpoint_every: steps between checkpoints (UNet and VAE).
        seed: everything random derives from it.
        max_train_images: use at most this many training images (0 = all).
    """

    vae_steps: int = 250
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_crop: int = 0
    unet_steps: int = 300
    unet_batch: int = 32
    unet_lr: float = 1e-3
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    variants: int = 3
    mixed_precision: str = "auto"
    checkpoint_every: int = 250
    seed: int = 0
    max_train_images: int = 0


    @classmethod
    def for_architecture(cls, architecture: str, **overrides) -> "TrainConfig":
        """Defaults per architecture: the tiny CPU values above, or the official sd14 fine-tuning values
        (spec 4.3: lr 5e-6, weight decay 1e-2, grad clip 1.0, batch 32, constant schedule, 4000 steps; plain
        AdamW instead of bitsandbytes' AdamW8bit, which is a memory optimisation, not a different optimiser).
        """
        if architecture == "sd14-dino-vitb8":
            base = cls(unet_steps=4000, unet_batch=32, unet_lr=5e-6, weight_decay=1e-2, checkpoint_every=500,
                       vae_steps=0)
        else:
            base = cls()
        for k, v in overrides.items():
            setattr(base, k, v)
        return base


# ------------------------------------------------------------------------------------------------- ATP loss
def atp_target(noise: torch.Tensor, z_normal: torch.Tensor, z_anomaly: torch.Tensor,
               alphas_cumprod_t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """ATP target (A): ``eps + sqrt(a_t / (1 - a_t)) * lambda * (z_a - z_n)``, computed in float64 (spec 4.1).

    Args:
        noise: ``eps`` ``[B, C, h, w]``.
        z_normal, z_anomaly: latents of the normal and the augmented image ``[B, C, h, w]``.
        alphas_cumprod_t: ``a_t`` ``[B]``. lam: ``lambda = t / 1000`` ``[B]``.
    Returns:
        float32 ``[B, C, h, w]``. Equals ``(x_t - sqrt(a_t) z_n) / sqrt(1 - a_t)`` for
        ``x_t = sqrt(a_t) z_s + sqrt(1 - a_t) eps``, ``z_s = lambda z_a + (1 - lambda) z_n``.
    """
    a = alphas_cumprod_t.double().view(-1, 1, 1, 1)
    lam = lam.double().view(-1, 1, 1, 1)
    return (noise.double() + torch.sqrt(a / (1 - a)) * lam * (z_anomaly.double() - z_normal.double())).float()


def atp_loss(unet: nn.Module, cond: torch.Tensor, z_normal: torch.Tensor, z_anomaly: torch.Tensor,
             alphas_cumprod: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One ATP loss evaluation (spec 4.1): sample t and eps, blend, predict, MSE against :func:`atp_target`.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        cond: ``[1, L, D]`` conditioning ("a photo of sks"); no CFG dropout, as upstream.
        alphas_cumprod: float64 ``[1000]`` on the latents' device.
        generator: torch generator (CPU) for t and eps.
    Returns:
        the scalar loss (fp32 MSE, mean over all elements).
    """
    b = z_normal.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (b,), generator=generator)
    noise = torch.randn(z_normal.shape, generator=generator).to(z_normal.device)
    t = t.to(z_normal.device)
    a = alphas_cumprod[t]
    lam = t.double() / 1000.0
    lv = lam.view(-1, 1, 1, 1)
    z_s = (lv * z_anomaly.double() + (1 - lv) * z_normal.double())
    x_t = (a.sqrt().view(-1, 1, 1, 1) * z_s + (1 - a).sqrt().view(-1, 1, 1, 1) * noise.double()).float()
    target = atp_target(noise, z_normal, z_anomaly, a, lam)
    pred = unet(x_t, t, cond.expand(b, -1, -1)).sample
    return nn.functional.mse_loss(pred.float(), target)


# ------------------------------------------------------------------------------------------------- data
def load_train_images(paths: list[Path], preprocessor: Preprocessor) -> np.ndarray:
    """Read training images with the runtime's loader and resize them as detection does: uint8 ``[N, L, L, 3]``.

    ``preprocessor.resize_rgb8`` of :func:`~glad_runtime.core.images.load_image` (L = ``preprocessor.load_size``:
    256 for multi-class presets, else the resolution): 8-bit sources resized as 8-bit images, so training sees what
    serving sees; the anomaly synthesis works on these 8-bit images (spec 4.2) and :func:`_to_tensor` makes the
    network inputs of both.

    Raises:
        ImageLoadError, UnsupportedImageError: a file that cannot be used.
    """
    return np.stack([preprocessor.resize_rgb8(load_image(p).pixels) for p in paths])


def _to_tensor(images_uint8: np.ndarray, preprocessor: Preprocessor) -> torch.Tensor:
    """uint8 ``[N, L, L, 3]`` -> float32 ``[N, 3, R, R]`` in [-1, 1]: ``preprocessor.to_tensor`` of each (the
    align_corners upsample of multi-class presets included, ``main_multi.py`` L207-211)."""
    r = preprocessor.resolution
    return torch.from_numpy(np.stack([preprocessor.to_tensor(a) for a in images_uint8]) if len(images_uint8)
                            else np.zeros((0, 3, r, r), np.float32))


def synthesize_pairs(images: np.ndarray, variants: int, seed: int, source_dir: Path | None,
                     foreground_mode: int = 3, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``variants`` synthetic-anomaly draws per image (spec 4.2): returns (normal index ``[M]``, aug uint8 ``[M,...]``).

    Texture sources: ``source_dir`` if given (e.g. DTD ``images/``), else the real textures of
    ``training.synth.texture_sources`` (scikit-image, disjoint from the test-defect sources).
    """
    import tempfile

    from .synth import AnomalySynthesizer, texture_sources

    size = images.shape[1:3]
    with tempfile.TemporaryDirectory() as tmp:
        if source_dir is None:
            source_dir = Path(tmp)
            texture_sources(source_dir)
        synth = AnomalySynthesizer(size, source_dir=source_dir, foreground_mode=foreground_mode, seed=seed)
        return _draw(synth, images, variants, seed, progress)


def _draw(synth, images: np.ndarray, variants: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    idx, augs = [], []
    for i in tqdm(range(len(images)), desc="synthetic anomalies", unit="img", disable=not progress):
        for _ in range(variants):
            aug, _ = synth(images[i], rng)
            idx.append(i)
            augs.append(aug)
    return np.asarray(idx), np.stack(augs)


# ------------------------------------------------------------------------------------------------- loops
def _accelerator(mixed_precision: str):
    from accelerate import Accelerator

    if mixed_precision == "auto":
        # bf16 autocast on CPUs without native bf16 is ~15x slower than fp32 (measured on the 2-core CI machine)
        mixed_precision = "fp16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mixed_precision)


def _save_ckpt(path: Path, model: nn.Module, opt, step: int, gen: torch.Generator) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                "generator": gen.get_state()}, tmp)
    tmp.replace(path)


def _load_ckpt(path: Path, model: nn.Module, opt, gen: torch.Generator) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    return int(state["step"])


def _run_loop(name: str, module: nn.Module, lr: float, weight_decay: float, steps: int, ckpt: Path,
              cfg: TrainConfig, seed_offset: int, resume: bool, progress: bool, loss_fn) -> list[float]:
    """The shared optimisation loop: AdamW, accelerate (mixed precision, devices), grad clipping, a tqdm bar with the
    running loss, checkpoints every ``cfg.checkpoint_every`` steps and at the end, and resume from ``ckpt``.

    ``loss_fn(model, generator, device)`` returns the scalar loss of one freshly sampled batch.
    """
    from tqdm import tqdm

    from glad_runtime.core.cpus import usable_cores

    torch.set_num_threads(usable_cores())  # the cores this process may use (affinity, cgroup quota), not the machine's
    acc = _accelerator(cfg.mixed_precision)
    gen = torch.Generator().manual_seed(cfg.seed + seed_offset + acc.process_index)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    step = _load_ckpt(ckpt, module, opt, gen) if resume and ckpt.is_file() else 0
    module.train().requires_grad_(True)
    model, opt = acc.prepare(module, opt)
    losses: list[float] = []
    bar = tqdm(total=steps, initial=step, desc=name, unit="step", disable=not progress)
    while step < steps:
        with acc.autocast():
            loss = loss_fn(model, gen, acc.device)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == steps:
            _save_ckpt(ckpt, acc.unwrap_model(model), opt, step, gen)
    bar.close()
    module.eval().requires_grad_(False)
    return losses


def train_vae(vae: nn.Module, images: torch.Tensor, cfg: TrainConfig, ckpt_dir: Path, resume: bool = True,
              progress: bool = True) -> list[float]:
    """Train a diffusers ``AutoencoderKL`` on normal images: L1 reconstruction + ``vae_kl_weight`` * KL (data.md).

    Args:
        images: float32 ``[N, 3, H, W]`` in [-1, 1]; random flips and ``vae_crop`` crops are applied per batch.
    Returns:
        the loss per step (for this call).
    """
    def loss_fn(model, gen, device):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=gen)
        x = _random_crop(_random_flip(images[idx], gen), cfg.vae_crop, gen).to(device)
        post = model.encode(x).latent_dist
        rec = model.decode(post.sample()).sample
        return (rec.float() - x).abs().mean() + cfg.vae_kl_weight * post.kl().mean() / x[0].numel()

    return _run_loop("train VAE", vae, cfg.vae_lr, 0.0, cfg.vae_steps, ckpt_dir / "vae_last.pt", cfg, 1, resume,
                     progress, loss_fn)


def _random_crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` crop per image (the VAE is convolutional); ``size`` 0 keeps full images."""
    h, w = x.shape[-2:]
    if not size or size >= min(h, w):
        return x
    ys = torch.randint(0, h - size + 1, (len(x),), generator=gen)
    xs = torch.randint(0, w - size + 1, (len(x),), generator=gen)
    return torch.stack([img[:, y:y + size, x0:x0 + size] for img, y, x0 in zip(x, ys.tolist(), xs.tolist())])


def _random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip_h = torch.rand(len(x), generator=gen) < 0.5
    flip_v = torch.rand(len(x), generator=gen) < 0.5
    x = x.clone()
    x[flip_h] = x[flip_h].flip(-1)
    x[flip_v] = x[flip_v].flip(-2)
    return x


@torch.no_grad()
def encode_latents(encoder: nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Posterior-mean latents of ``images`` with the (frozen) encoder wrapper, float32, in chunks."""
    return torch.cat([encoder(images[i:i + batch]).float() for i in range(0, len(images), batch)])


def train_unet(unet: nn.Module, cond: torch.Tensor, z_normal: torch.Tensor, z_anomaly: torch.Tensor,
               cfg: TrainConfig, ckpt_dir: Path, resume: bool = True, progress: bool = True) -> list[float]:
    """Train the UNet with the ATP loss on precomputed latent pairs (spec 4.1 / 4.3).

    Args:
        unet: diffusers ``UNet2DConditionModel`` (trained in place).
        cond: ``[1, L, D]`` conditioning.
        z_normal, z_anomaly: float32 ``[M, C, h, w]`` pairs (equal for untouched draws).
    Returns:
        the loss per step (for this call).
    """
    alphas = torch.from_numpy(scaled_linear_alphas_cumprod())

    def loss_fn(model, gen, device):
        idx = torch.randint(0, len(z_normal), (cfg.unet_batch,), generator=gen)
        zn, za = z_normal[idx], z_anomaly[idx]
        both = _random_flip(torch.cat([zn, za], dim=1), gen)  # joint flips keep the pair's correspondence
        zn, za = both[:, :zn.shape[1]].to(device), both[:, zn.shape[1]:].to(device)
        return atp_loss(model, cond.to(device), zn, za, alphas.to(device), gen)

    return _run_loop("train UNet (ATP)", unet, cfg.unet_lr, cfg.weight_decay, cfg.unet_steps,
                     ckpt_dir / "unet_last.pt", cfg, 2, resume, progress, loss_fn)


# ------------------------------------------------------------------------------------------------- driver
def train_bundle(data_root: str | Path, out: str | Path, config: GladConfig, cfg: TrainConfig, *,
                 features: str = "dinov2-like", source_dir: str | Path | None = None, resume: bool = True,
                 init_bundle: str | Path | None = None, progress: bool = True, log=print) -> Bundle:
    """Train a detector for one MVTec-format category and write the bundle (see module doc for the steps).

    Args:
        data_root: category folder with ``train/good``.
        out: bundle folder (checkpoints go to ``out/checkpoints``; re-running with ``resume`` continues).
        config: the preset's :class:`GladConfig`.
        features: tiny feature extractor (``"dinov2-like"`` or ``"random"``).
        source_dir: texture anomaly sources (e.g. DTD ``images/``); default: real scikit-image textures.
        init_bundle: start from this bundle's weights (sd14 presets: made by ``glad init``).
    Returns:
        the written :class:`Bundle`.
    Raises:
        PathNotFoundError: no training images. UsageError: an sd14 preset without ``init_bundle``.
    """
    from export.models import build_tiny_modules, load_bundle_modules, save_bundle_modules

    from .data import MVTecCategory

    start = time.perf_counter()
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    paths = MVTecCategory(data_root).train_images()
    if cfg.max_train_images:
        paths = paths[:cfg.max_train_images]
    log(f"training on {len(paths)} normal images from {data_root}")
    pre = Preprocessor.from_config(config)
    images = load_train_images(paths, pre)
    x = _to_tensor(images, pre)

    if init_bundle:
        modules = load_bundle_modules(Bundle(init_bundle))
    elif config.architecture == "tiny":
        modules = build_tiny_modules(config, seed=cfg.seed, features=features)
    else:
        raise UsageError("sd14 presets train from an initial bundle: run `glad init` first and pass --init")
    stats: dict = {"train_images": len(paths)}
    if config.architecture == "tiny" and not init_bundle:
        vae = modules.encoder.vae
        stats["vae_loss"] = train_vae(vae, x, cfg, ckpt_dir, resume=resume, progress=progress)[-1:] or None
        with torch.no_grad():
            modules.encoder.scaling_factor = modules.decoder.scaling_factor = 1.0
            z = encode_latents(modules.encoder, x)
        scaling = float(1.0 / z.std())
        config = config.replace(scaling_factor=round(scaling, 6))
        modules.encoder.scaling_factor = modules.decoder.scaling_factor = config.scaling_factor
        with torch.no_grad():
            rec = torch.cat([modules.decoder(modules.encoder(x[i:i + 32])) for i in range(0, len(x), 32)])
        mse = float(((rec.clamp(-1, 1) - x) ** 2).mean() / 4.0)  # images in [0, 1]
        stats["vae_psnr_db"] = round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)
        log(f"VAE: scaling_factor={config.scaling_factor:.4f}, train PSNR {stats['vae_psnr_db']} dB")

    fg_mode = training_foreground_mode(config.class_name)  # spec 4.2 step 5
    idx, augs = synthesize_pairs(images, cfg.variants, cfg.seed, Path(source_dir) if source_dir else None,
                                 foreground_mode=fg_mode, progress=progress)
    z_n = encode_latents(modules.encoder, x)
    z_a = encode_latents(modules.encoder, _to_tensor(augs, pre))
    z_n_pairs = z_n[torch.from_numpy(idx)]
    stats["pairs"] = len(idx)
    stats["anomalous_pairs"] = int((np.abs(augs.astype(int) - images[idx].astype(int)).sum((1, 2, 3)) > 0).sum())
    losses = train_unet(modules.unet.unet, modules.unet.cond, z_n_pairs, z_a, cfg, ckpt_dir, resume=resume,
                        progress=progress)
    stats["unet_loss_last100"] = float(np.mean(losses[-100:])) if losses else None
    stats["train_seconds"] = round(time.perf_counter() - start, 1)

    bundle = Bundle.create(out, config)
    save_bundle_modules(modules, bundle)
    (out / "training.json").write_text(json.dumps({"train_config": asdict(cfg), "stats": stats,
                                                   "data": str(Path(data_root).resolve())}, indent=2))
    bundle.write_manifest()
    log(f"bundle written to {out} in {stats['train_seconds']} s")
    return bundle
