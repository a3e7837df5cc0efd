"""``glad presets``: list the named presets or print one as JSON."""

from __future__ import annotations

import click

from glad_runtime.core.config import get_preset, preset_names


@click.command("presets")
@click.option("--show", metavar="NAME", help="Print one preset's full config as JSON.")
def presets_cmd(show: str | None) -> None:
    """List the named presets (tiny, sd14-dino-vitb8 and the official per-category settings)."""
    if show:
        click.echo(get_preset(show).to_json())  # an unknown name: UnknownPresetError (exit 2, the known names)
        return
    for name in preset_names():
        c = get_preset(name)
        click.echo(f"{name:28s} T_max={c.t_max:<4d} steps={c.num_inference_steps:<3d} tau={c.tau:<5} "
                   f"min_step={c.min_step:<4d} v={c.pixel_weight:g} dino_res={c.dino_resolution}")
