"""``glad demo``: the main job on real images (data, training, evaluation with the kNN baseline)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from glad_cli.commands.eval import eval_cmd
from glad_cli.commands.train import train_cmd

DEMO_TEXTURE = "grass"


@click.command("demo")
@click.option("--workdir", default="runs/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Data, bundles and reports go here; trained bundles are reused on later runs.")
@click.option("--textures/--no-textures", default=True, show_default=True,
              help="Also train and evaluate one texture category with pixel masks (P-AUROC, AUPRO).")
def demo_cmd(workdir: Path, textures: bool) -> None:
    """The main job on real images: ELPV mono solar cells, the tiny preset, GLAD beside the kNN baseline.

    Prepares the data (elpv-dataset package), trains the tiny preset (cached after the first run), evaluates on the
    held-out split with the kNN baseline and writes the report; with --textures, the same for one real texture
    category with synthetic defects and exact masks.
    """
    from training.data import prepare_elpv, prepare_textures

    start = time.perf_counter()
    ctx = click.get_current_context()
    jobs = [("elpv_mono", workdir / "data" / "elpv_mono", {})]
    if not (jobs[0][1] / "dataset.json").is_file():
        click.echo("[demo] preparing ELPV mono ...")
        prepare_elpv(jobs[0][1], cell_type="mono", seed=0, overwrite=True)
    if textures:
        tex = workdir / "data" / "textures"
        if not (tex / DEMO_TEXTURE).is_dir():
            click.echo("[demo] preparing the texture category ...")
            prepare_textures(tex, categories=(DEMO_TEXTURE,), seed=0, size=128, overwrite=True)
        jobs.append((DEMO_TEXTURE, tex / DEMO_TEXTURE, {"vae_steps": 150, "unet_steps": 150}))
    reports = []
    for name, data, steps in jobs:
        bundle = workdir / "bundles" / name
        if not (bundle / "manifest.json").is_file() or not (bundle / "weights" / "unet.safetensors").is_file():
            click.echo(f"[demo] training the tiny preset on {name} ...")
            ctx.invoke(train_cmd, data=data, bundle=bundle, preset="tiny", init_bundle=None, features="dinov2-like",
                       anomaly_source=None, vae_steps=steps.get("vae_steps"), unet_steps=steps.get("unet_steps"),
                       batch_size=None, lr=None, mixed_precision="auto", seed=0, resume=True, overrides={})
        else:
            click.echo(f"[demo] reusing the trained bundle {bundle}")
        out = workdir / "reports" / name
        ctx.invoke(eval_cmd, bundle=bundle, data=data, out_dir=out, baseline="knn", batch_size=8, max_test=0,
                   threshold=None, overrides={})  # the engine options' defaults: torch on the CPU
        reports.append(out / "report.md")
    click.echo(f"[demo] done in {time.perf_counter() - start:.0f} s; reports: " + ", ".join(map(str, reports)))
