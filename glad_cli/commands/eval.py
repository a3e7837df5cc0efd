"""``glad eval``: image and pixel metrics on a category's test split, with the kNN baseline."""

from __future__ import annotations

from pathlib import Path

import click

from glad_cli.options import bundle_argument, engine_options, engine_settings, open_detector, set_option


@click.command("eval")
@bundle_argument()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default BUNDLE/eval/<data name>).")
@click.option("--baseline", type=click.Choice(["knn", "none"]), default="knn", show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-test", default=0, show_default=True, help="Use at most this many test images (0 = all).")
@engine_options
@set_option(help="Override a config field.")
def eval_cmd(bundle: Path, data: Path, out_dir, baseline: str, batch_size: int, max_test: int, backend: str,
             device: str, precision: str, provider: str, threads: int, server, model_prefix, overrides: dict) -> None:
    """I-AUROC / I-AP / I-F1max (and P-AUROC / P-AP / P-F1max / AUPRO with masks) plus a report with the
    kNN baseline beside GLAD."""
    from training.evaluate import evaluate

    engine = engine_settings(backend, device, precision, provider, threads, server, model_prefix)
    _, detector = open_detector(bundle, engine, batch_size, overrides)
    out = out_dir or (bundle / "eval" / data.name)
    evaluate(detector, data, out, baseline=None if baseline == "none" else baseline,
             batch_size=batch_size, max_test=max_test, title=f"GLAD on {data.name}", log=click.echo)
    click.echo(f"report: {out / 'report.md'}")
