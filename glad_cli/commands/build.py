"""``glad build``: TensorRT engines for this GPU from a bundle's ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import click

from glad_cli.options import bundle_argument


@click.command("build")
@bundle_argument()
@click.option("--precision", type=click.Choice(["fp16", "fp32", "int8", "fp8"]), default="fp16", show_default=True,
              help="fp16/fp32 from `glad export` graphs; int8/fp8 from quantised Q/DQ graphs.")
@click.option("--batch", default="1", show_default=True,
              help="N for a static batch (fastest), or MIN:OPT:MAX for a dynamic-batch profile, e.g. 1:4:16.")
@click.option("--graph", "graphs", multiple=True, help="Only these graphs (default: all exported).")
@click.option("--refittable/--no-refittable", default=True, show_default=True,
              help="Build with REFIT so another category's weights can refit the engine.")
@click.option("--refit-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Another bundle of the same architecture whose matching engines are refitted instead of rebuilt.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Timing cache file (default BUNDLE/engines/timing-<gpu>-trt<version>.cache).")
@click.option("--workspace-gb", default=8.0, show_default=True)
@click.option("--gpu", "gpu_index", default=0, show_default=True, help="GPU index (nvidia-smi numbering).")
@click.option("--force", is_flag=True, help="Rebuild even when an engine with the same key exists.")
def build_cmd(bundle: Path, precision: str, batch: str, graphs, refittable: bool, refit_from, timing_cache,
              workspace_gb: float, gpu_index: int, force: bool) -> None:
    """Build TensorRT engines for this GPU from a BUNDLE's ONNX graphs (run `glad export` first).

    Engines are stored in BUNDLE/engines/ under a key of GPU model, TensorRT version, precision and shapes, and are
    refused on any other GPU or TensorRT version. Needs a CUDA GPU and `pip install -e .[tensorrt]`; without them
    it stops with a message (use `--engine ort` on CPU).
    """
    from export.tensorrt_build import build_bundle, parse_batch
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.errors import TensorRTUnavailable

    batch_range = parse_batch(batch)  # a UsageError (exit 2) names the malformed value
    b = Bundle(bundle)
    try:
        results = build_bundle(b, precision, batch=batch_range, graphs=graphs or None, refittable=refittable,
                               timing_cache=timing_cache, workspace_gb=workspace_gb, gpu_index=gpu_index,
                               force=force, refit_from=Bundle(refit_from) if refit_from else None,
                               progress=lambda m: click.echo(f"  {m}", err=True))
    except TensorRTUnavailable as e:
        raise TensorRTUnavailable(f"cannot build TensorRT engines here: {e}") from e
    for r in results:
        click.echo(f"{r.graph:<12} {r.path.name}  {'reused' if r.reused else f'{r.seconds:.1f} s'}")
