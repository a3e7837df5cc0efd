"""``glad train``: train a detector on a category's normal images and write the bundle."""

from __future__ import annotations

from pathlib import Path

import click

from glad_cli.options import set_option
from glad_runtime.core.config import preset_names


@click.command("train")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(preset_names()), metavar="PRESET")
@click.option("--init", "init_bundle", type=click.Path(exists=True, file_okay=False),
              help="Start from this bundle's weights (sd14 presets: made by `glad init`).")
@click.option("--features", type=click.Choice(["dinov2-like", "random"]), default="dinov2-like", show_default=True)
@click.option("--anomaly-source", type=click.Path(exists=True, file_okay=False),
              help="Folder of texture images for synthetic anomalies (DTD images/); default: real textures.")
@click.option("--vae-steps", default=None, type=int, help="tiny: VAE training steps.")
@click.option("--unet-steps", default=None, type=int, help="UNet (ATP) training steps.")
@click.option("--batch-size", default=None, type=int, help="UNet batch size.")
@click.option("--lr", default=None, type=float, help="UNet learning rate.")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "fp16", "bf16"]), default="auto",
              show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--resume/--no-resume", default=True, show_default=True, help="Continue from BUNDLE/checkpoints.")
@set_option(help="Override a config field of the preset, e.g. --set t_max=250 (repeatable).")
def train_cmd(data: Path, bundle: Path, preset: str, init_bundle, features: str, anomaly_source, vae_steps,
              unet_steps, batch_size, lr, mixed_precision: str, seed: int, resume: bool, overrides: dict) -> None:
    """Train a detector on DATA/train/good with the ATP loss and write BUNDLE.

    The UNet is trained, the VAE frozen; for the tiny preset the VAE is first trained on the normal images.
    Several GPUs: `accelerate launch -m glad_cli.main train ...`.
    """
    from glad_runtime.core.config import get_preset
    from glad_runtime.errors import ConfigError

    try:
        cfg = get_preset(preset, **overrides)  # before torch is imported: a bad --set fails fast
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from e

    from training.atp import TrainConfig, train_bundle

    tc = TrainConfig.for_architecture(cfg.architecture, seed=seed, mixed_precision=mixed_precision)
    for name, value in (("vae_steps", vae_steps), ("unet_steps", unet_steps), ("unet_batch", batch_size),
                        ("unet_lr", lr)):
        if value is not None:
            setattr(tc, name, value)
    train_bundle(data, bundle, cfg, tc, features=features, source_dir=anomaly_source, resume=resume,
                 init_bundle=init_bundle, log=click.echo)
