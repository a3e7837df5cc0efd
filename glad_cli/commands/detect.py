"""``glad detect``: score image files with a bundle; one record, map and overlay per image."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

from glad_cli.options import bundle_argument, engine_options, open_detector, set_option


@click.command("detect")
@bundle_argument()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <name>.json, <name>_map.png|.npy, <name>_overlay.png (score, label, threshold, "
                   "defect contours, colour bar), <name>_mask.png (with a pixel threshold), results.jsonl.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, 256), help="Images per call.")
@click.option("--seed", default=None, type=int, help="Noise seed (default: the bundle's config seed).")
@engine_options
@click.option("--map-format", type=click.Choice(["png16", "npy"]), default="png16", show_default=True,
              help="Anomaly map file: 16-bit PNG (value = png / map_png_scale in the JSON; calibrated, one scale "
                   "for the whole bundle, 65535 = clipped at the ceiling) or float32 .npy.")
@click.option("--stream", is_flag=True,
              help="With --server: send the images to the served in-flight model (P_glad_inflight: the whole loop "
                   "on the server, each image joining the running denoising loop; results written as they "
                   "finish) instead of running the loop here against the network models.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--max-image-pixels", type=click.IntRange(1), default=None,
              help="Pixel limit per image (width x height from the header, checked before decoding; default the "
                   "bundle's max_image_pixels, 100000000): a larger file gets ImageTooLargeError in its record and "
                   "the others complete.")
@click.option("--threshold", type=float, default=None,
              help="Raw image threshold for this run, overriding the bundle's calibration (labels: score > X).")
@set_option(help="Override a config field for this run, e.g. --set ads_enabled=true (repeatable). A calibrated "
                 "bundle's thresholds were set with its own config: the summary then says so.")
def detect_cmd(bundle: Path, inputs: tuple[Path, ...], out_dir: Path, batch_size: int, seed: int | None,
               engine, map_format: str, stream: bool, quiet: bool, max_image_pixels: int | None,
               threshold: float | None, overrides: dict) -> None:
    """Score images (files or folders) with a model BUNDLE; maps come back at each image's original size.

    Any image Pillow reads is accepted: 8/16-bit grayscale, RGB, RGBA, palette, EXIF-rotated, any size. A file that
    cannot be read gets a JSON record with the error and the others still complete; the exit code is then 1.

    With a calibrated bundle (`glad calibrate`) every record also has normalized_score (threshold at 0.5), label
    ("normal" / "anomalous") and the threshold used; --threshold overrides the raw image threshold. With a pixel
    threshold, records carry the defect regions and <name>_mask.png (255 = defective pixel) is written. Overlays
    and map PNGs use one colour/value scale per calibrated bundle (pixel threshold at mid colour bar); an
    uncalibrated bundle scales each image to its own maximum, and its overlays say so. One line per image
    (label, normalised and raw score, file) is printed, then the JSON summary.
    """
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.images import list_images
    from glad_runtime.output import detect_files, summarize

    if threshold is not None and not math.isfinite(threshold):
        raise click.BadParameter("must be a finite number", param_hint="--threshold")
    calibration = Bundle(bundle).calibration()
    paths = list_images(list(inputs))  # a missing input: PathNotFoundError, a usage error (exit 2)
    if not paths:
        raise click.BadParameter("no images found", param_hint="INPUTS")
    start = time.perf_counter()
    changes = dict(overrides) | ({} if seed is None else {"seed": seed})  # --seed wins over --set seed=
    if max_image_pixels is not None:  # a deployment limit: changes no result, so no recalibration note
        changes["max_image_pixels"] = max_image_pixels
    server = engine.options["url"] if engine.backend == "triton" else None
    if stream:
        if not server:
            raise click.BadParameter("needs --server HOST:GRPC_PORT (a `glad serve` server)", param_hint="--stream")
        if set(changes) - {"max_image_pixels"}:  # the server applies its own pixel limit
            raise click.BadParameter("the served bundle's config applies; --set / --seed cannot change it",
                                     param_hint="--stream")
        records = _detect_streamed(bundle, paths, out_dir, server, engine.options["model_prefix"], threshold,
                                   calibration, window=2 * batch_size, map_format=map_format, progress=not quiet)
        run_seed = Bundle(bundle).config.seed
    else:
        _, detector = open_detector(bundle, engine, batch_size, changes, threshold=threshold)
        records = detect_files(detector, paths, out_dir, batch_size=batch_size, map_format=map_format,
                               progress=not quiet)
        run_seed = detector.config.seed
    summary = summarize(records) | {"wall_s": round(time.perf_counter() - start, 2), "out": str(out_dir)}
    notes = [summary["note"]] if "note" in summary else []
    if calibration is not None and run_seed != calibration.params.get("pipeline_seed", run_seed):
        notes.append(f"calibrated with seed {calibration.params['pipeline_seed']}, run with seed "
                     f"{run_seed}: scores shift with the noise seed")
    changed = sorted(k for k in overrides if k not in ("seed", "max_image_pixels"))
    if calibration is not None and threshold is None and changed:
        notes.append(f"calibrated with the bundle's config, run with --set {', '.join(changed)}: the thresholds "
                     "may not apply (recalibrate, or pass --threshold)")
    if notes:
        summary["note"] = "; ".join(notes)
    for r in records:
        if r.error is None and r.label is not None:
            norm = "" if r.normalized_score is None else f"{r.normalized_score:.3f} "
            click.echo(f"{r.label:9s} {norm}(raw {r.score:.6g}) {r.source}")
    if "note" in summary:
        click.echo(f"note: {summary['note']}", err=True)
    click.echo(json.dumps(summary))
    for r in records:
        if r.error:
            click.echo(f"error: {r.error}", err=True)
    sys.exit(1 if summary["failed"] else 0)


def _detect_streamed(bundle: Path, paths: list[Path], out_dir: Path, server: str, model_prefix: str | None,
                     threshold: float | None, calibration, *, window: int, map_format: str, progress: bool):
    """``glad detect --server URL --stream``: :meth:`GladClient.stream` over the files (sent as they are), each
    result written as it finishes (:func:`glad_runtime.output.write_detections`); records in input order."""
    from collections import defaultdict, deque

    from tqdm import tqdm

    from glad_runtime.core.bundle import Bundle
    from glad_runtime.engines.triton import default_model_prefix
    from glad_runtime.output import write_detections
    from glad_runtime.render import MapScale
    from glad_runtime.serving.client import GladClient

    b = Bundle(bundle)
    index: dict[str, deque] = defaultdict(deque)  # a path listed twice is sent twice, each result to one slot
    for i, p in enumerate(paths):
        index[str(p)].append(i)
    out_dir.mkdir(parents=True, exist_ok=True)
    with GladClient(server, model_prefix or default_model_prefix(b), threshold=threshold) as client:
        results = tqdm(client.stream([str(p) for p in paths], window=window), total=len(paths), desc="detect",
                       disable=not progress)
        return write_detections(((index[d.source].popleft(), d, None) for d in results), paths, out_dir,
                                MapScale.for_bundle(calibration, b.config), map_format)
