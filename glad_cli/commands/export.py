"""``glad export``: a bundle's networks to ONNX, checked against torch on real images."""

from __future__ import annotations

import time
from pathlib import Path

import click

from glad_cli.options import bundle_argument


@click.command("export")
@bundle_argument()
@click.option("--opset", default=21, show_default=True, type=click.IntRange(17, 25),
              help="ONNX opset (21 keeps GroupNormalization one op; 17 + --exporter torchscript for old parsers).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True)
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16"]),
              default=("fp32", "fp16"), show_default=True, help="Repeat for several.")
@click.option("--graph", "graphs", multiple=True, help="Only these graphs (unet, vae_encoder, vae_decoder, dino, "
              "dino_ads, ads_check); default all the bundle needs.")
@click.option("--images", "image_dir", type=click.Path(exists=True, path_type=Path),
              help="Real images (a folder or file) for the parity and NaN checks; default scikit-image photos.")
def export_cmd(bundle: Path, opset: int, exporter: str, precisions, graphs, image_dir) -> None:
    """Export a BUNDLE's networks to ONNX (BUNDLE/onnx/) and check each graph against torch on real images.

    Writes unet, vae_encoder, vae_decoder, dino (dino_ads when ADS runs at another size) and ads_check (the whole
    ADS check in one graph) graphs (dynamic batch, fixed image size) in fp32 and fp16, runs
    each in ONNX Runtime on real inputs, refuses any graph with NaN/Inf outputs, and records per-graph errors,
    sizes and times in BUNDLE/onnx/export.json. Then `glad detect --engine ort` runs without torch.
    """
    from export.onnx_export import export_bundle
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.images import list_images

    b = Bundle(bundle)
    images = list_images([image_dir])[:4] if image_dir else None
    start = time.perf_counter()
    reports = export_bundle(b, opset=opset, exporter=exporter, precisions=precisions, graphs=graphs or None,
                            images=images, progress=lambda m: click.echo(f"  {m}", err=True))  # ExportError: exit 1
    click.echo(f"{'graph':<12} {'prec':<5} {'MB':>8} {'export s':>9} {'max abs err':>12} {'max rel err':>12}")
    for r in reports:
        click.echo(f"{r.graph:<12} {r.precision:<5} {r.bytes / 1e6:8.2f} {r.export_s:9.1f} {r.max_abs_err:12.2e} "
                   f"{r.max_rel_err:12.2e}")
    click.echo(f"exported to {b.file('onnx')} in {time.perf_counter() - start:.1f} s (checksum {b.checksum()})")
