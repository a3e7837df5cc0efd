"""``glad eval``: image and pixel metrics on a category's test split, with the kNN baseline, and a report that
opens with the operating point of the bundle's calibration (or of ``--threshold``)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from glad_cli.options import bundle_argument, engine_options, open_detector, set_option


@click.command("eval")
@bundle_argument()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default BUNDLE/eval/<data name>).")
@click.option("--baseline", type=click.Choice(["knn", "none"]), default="knn", show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-test", default=0, show_default=True, help="Use at most this many test images (0 = all).")
@click.option("--threshold", type=float, default=None,
              help="Raw image threshold for this run, overriding the bundle's calibration (labels: score > X), as "
                   "`glad detect --threshold` does.")
@engine_options
@set_option(help="Override a config field.")
def eval_cmd(bundle: Path, data: Path, out_dir, baseline: str, batch_size: int, max_test: int,
             threshold: float | None, engine, overrides: dict) -> None:
    """I-AUROC / I-AP / I-F1max (and P-AUROC / P-AP / P-F1max / AUPRO with masks) plus a report with the
    kNN baseline beside GLAD.

    The bundle's calibration (`glad calibrate`) labels the test images, as in `glad detect`: the report
    (report.md, and report.html with every image inline) opens with the operating point, i.e. the threshold and
    its source, misses and false rejects (counts and rates) and, where the data has masks, the pixel operating
    point; every overlay uses the bundle's one colour scale. --threshold overrides the image threshold for this
    run. An uncalibrated bundle without --threshold gets metrics and raw scores only.
    """
    from training.evaluate import evaluate

    if threshold is not None and not math.isfinite(threshold):
        raise click.BadParameter("must be a finite number", param_hint="--threshold")
    _, detector = open_detector(bundle, engine, batch_size, overrides, threshold=threshold)
    calibration = detector.calibration
    changed = sorted(k for k in overrides if k != "max_image_pixels")
    if calibration is not None and threshold is None and changed:
        click.echo(f"note: calibrated with the bundle's config, run with --set {', '.join(changed)}: the thresholds "
                   "may not apply (recalibrate, or pass --threshold)", err=True)
    out = out_dir or (bundle / "eval" / data.name)
    evaluate(detector, data, out, baseline=None if baseline == "none" else baseline,
             batch_size=batch_size, max_test=max_test, title=f"GLAD on {data.name}", log=click.echo)
    click.echo(f"report: {out / 'report.md'}")
