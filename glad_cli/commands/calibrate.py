"""``glad calibrate``: thresholds and score normalisation from held-out images (calib/labelled.py), or with
``--quantize`` quantisation calibration and the accuracy gate (calib/quantize.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from glad_cli.options import bundle_argument, engine_options, open_detector


@click.command("calibrate")
@bundle_argument()
@click.argument("normal_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--labelled", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Labelled images: an MVTec-format category (test/good, test/<defect>, ground_truth/) or a folder "
                   "with good/ and one folder per defect. Then the image threshold maximises F1 on them.")
@click.option("--target-fpr", default=0.01, show_default=True, type=click.FloatRange(0, 1, min_open=True,
                                                                                     max_open=True),
              help="Normal rule: fraction of normal images (and pixels) flagged.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, 256))
@engine_options
@click.option("--pixels-per-image", default=16384, show_default=True, type=click.IntRange(1),
              help="Anomaly-map pixels sampled per image for the pixel threshold (seeded).")
@click.option("--seed", default=0, show_default=True, help="Pixel sampling seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--quantize", "quantize_mode", type=click.Choice(["int8", "fp8"]), default=None,
              help="Quantisation calibration instead of thresholds: record the loop's network inputs on NORMAL_DIR "
                   "and write Q/DQ graphs onnx/<graph>.int8.onnx (fp8: --quant-tool modelopt, GPU).")
@click.option("--graph", "quant_graphs", multiple=True,
              help="--quantize: only these graphs (unet, vae_encoder, vae_decoder, dino, dino_ads); others stay fp32.")
@click.option("--calib-images", default=16, show_default=True, type=click.IntRange(1),
              help="--quantize: normal images recorded (the first N of NORMAL_DIR, sorted).")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile",
              show_default=True, help="--quantize: activation-range calibrator (ONNX Runtime).")
@click.option("--quant-tool", type=click.Choice(["ort", "modelopt"]), default="ort", show_default=True,
              help="--quantize: ONNX Runtime quantize_static, or NVIDIA ModelOpt (GPU machine; int8 and fp8).")
@click.option("--keep-first-last/--exclude-first-last", default=False, show_default=True,
              help="--quantize: quantise the first and last Conv/MatMul of each graph too.")
@click.option("--eval-data", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="--quantize: MVTec-format category whose test split gates the result (fp32 vs quantised).")
@click.option("--max-delta", default=0.02, show_default=True, type=click.FloatRange(0),
              help="--quantize: the largest allowed drop of I-AUROC (and AUPRO with masks) below fp32.")
@click.option("--eval-max", default=0, show_default=True, type=click.IntRange(0),
              help="--quantize: at most this many test images for the gate, spread over the list (0 = all).")
@click.option("--save-calib", type=click.Path(file_okay=False, path_type=Path),
              help="--quantize: also write the recorded inputs as <graph>.npz here (ModelOpt reads them).")
def calibrate_cmd(bundle: Path, normal_dir: Path, labelled: Path | None, target_fpr: float, batch_size: int,
                  engine, pixels_per_image: int, seed: int, quiet: bool, quantize_mode: str | None, quant_graphs,
                  calib_images: int, calib_method: str, quant_tool: str, keep_first_last: bool,
                  eval_data: Path | None, max_delta: float, eval_max: int, save_calib: Path | None) -> None:
    """Compute thresholds and score normalisation for BUNDLE from held-out images; store BUNDLE/calibration.json.

    NORMAL_DIR holds normal images the model was not trained on (files or folders, searched recursively). Without
    --labelled the image threshold is their (1 - target FPR) quantile; with --labelled it is the F1-optimal
    threshold on the labelled set, whose normals are pooled with NORMAL_DIR. Pixel thresholds: F1-optimal over the
    masks when the labelled set has them, else the (1 - target FPR) quantile over the normal images' pixels.
    The manifest records calibration.json, so `verify` keeps covering it.

    With --quantize int8 this is quantisation calibration instead (see calib/quantize.py): the fp32 ONNX graphs
    (`glad export`) run the pipeline on --calib-images normal images while every network's inputs are recorded;
    each chosen graph becomes a Q/DQ graph onnx/<graph>.int8.onnx (used by `--engine ort --precision int8` and by
    `glad build --precision int8`). With --eval-data the whole pipeline is evaluated fp32 vs int8 on that test split;
    when I-AUROC (or AUPRO) drops by more than --max-delta the int8 files are removed and the exit code is 1.
    Thresholds for the int8 engine: run `glad calibrate` again with `--engine ort --precision int8`.
    """
    import warnings

    if quantize_mode is not None:
        _quantize(bundle, normal_dir, quantize_mode, quant_graphs, calib_images, calib_method, quant_tool,
                  keep_first_last, eval_data, max_delta, eval_max, save_calib, batch_size, engine.threads, quiet)
        return

    from calib.labelled import calibrate_images
    from glad_runtime.core.images import list_images

    normal_paths = list_images([normal_dir])
    if not normal_paths:
        raise click.BadParameter("no images found", param_hint="NORMAL_DIR")
    b, detector = open_detector(bundle, engine, batch_size, calibrated=False)
    extra = {"pipeline_seed": detector.config.seed, "normal_dir": str(normal_dir.resolve())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cal = calibrate_images(detector, normal_paths, labelled=labelled, target_fpr=target_fpr, seed=seed,
                               batch_size=batch_size, pixels_per_image=pixels_per_image, progress=not quiet,
                               model_checksum=b.model_checksum(), extra_params=extra)
        path = b.write_calibration(cal)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    for line in cal.summary_lines():
        click.echo(line)
    click.echo(f"calibration written: {path} (bundle checksum {b.checksum()})")


def _quantize(bundle: Path, normal_dir: Path, mode: str, graphs, n_images: int, method: str, tool: str,
              keep_first_last: bool, eval_data: Path | None, max_delta: float, eval_max: int, save_calib,
              batch_size: int, threads: int, quiet: bool) -> None:
    """`glad calibrate --quantize`: record, quantise, gate; prints the table, writes onnx/quantize.json; exit
    code 1 when the gate rejects."""
    from calib.quantize import QuantSettings, format_gate_table, quantize_bundle
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.images import Preprocessor, list_images

    paths = list_images([normal_dir])[:n_images]
    if not paths:
        raise click.BadParameter("no images found", param_hint="NORMAL_DIR")
    b = Bundle(bundle)
    say = (lambda m: None) if quiet else (lambda m: click.echo(f"  {m}", err=True))
    settings = QuantSettings(method=method, exclude_first_last=not keep_first_last)
    batches = Preprocessor.from_config(b.config).batches(paths, batch_size)
    report = quantize_bundle(b, batches, names=[str(p) for p in paths],
                             graphs=list(graphs) or None, mode=mode, tool=tool, settings=settings,
                             eval_data=eval_data, max_delta=max_delta, eval_max=eval_max, batch_size=batch_size,
                             threads=threads, save_calibration=save_calib, progress=say)
    for line in format_gate_table(report):
        click.echo(line)
    gate = report.get("gate")
    kept = [] if gate and not gate["accepted"] else [r["file"] for r in report["graphs"].values()]
    click.echo(f"quantised graphs kept: {kept or 'none'}; report {b.file('onnx/quantize.json')}")
    if gate and not gate["accepted"]:
        sys.exit(1)
