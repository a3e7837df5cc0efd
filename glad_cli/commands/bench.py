"""``glad bench``: every available engine on the same real images, side by side."""

from __future__ import annotations

import json
from pathlib import Path

import click

from glad_cli.options import bundle_argument


@click.command("bench")
@bundle_argument()
@click.option("--engine", "engine_names", multiple=True,
              help="Engines to compare (repeatable): torch, ort-fp32, ort-fp16, ort-int8, tensorrt-fp16 (the "
                   "default set; unavailable ones are skipped with the reason), openvino-fp32, openvino-bf16, mix "
                   "(each graph on its measured fastest CPU configuration: python -m bench.cpu_mix BUNDLE first).")
@click.option("--images", "image_dir", type=click.Path(exists=True, path_type=Path),
              help="Real images (folder or files); default ELPV mono cells (half defective).")
@click.option("--num-images", default=16, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", "batch_sizes", multiple=True, type=click.IntRange(1), default=(1, 4, 16),
              show_default=True)
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(1),
              help="Rounds per batch size; the engines alternate within each round (medians, min-max, spread).")
@click.option("--ads/--no-ads", default=True, show_default=True, help="Run with ADS on (its cost is measured).")
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime / OpenVINO threads of the ort, openvino and mix engines (0 = the cores this "
              "process may use, threads that sleep when idle).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default BUNDLE/bench).")
@click.option("--stream", is_flag=True, help="Instead: a stream of mixed images served one at a time, per batch and "
              "by the step scheduler (first --engine, default ort-fp32), writing stream.json.")
@click.option("--pool", default=8, show_default=True, type=click.IntRange(1), help="--stream: batch / pool size.")
@click.option("--server", default=None, help="Also the `triton` engine: gRPC URL of a server serving this bundle.")
@click.option("--model-prefix", default=None, help="With --server: the bundle's model prefix (default its name).")
def bench_cmd(bundle: Path, engine_names, image_dir, num_images: int, batch_sizes, repeats: int, ads: bool,
              threads: int, out_dir, stream: bool, pool: int, server, model_prefix) -> None:
    """Benchmark every available engine on the same real images and print the side-by-side table.

    The engines are loaded first, then timed interleaved: per batch size, each round runs one pass per engine, so
    a shared machine's load falls on all of them alike. Per engine and batch size: images/s (median, min-max),
    p50/p95/p99 latency, seconds per stage, adaptive-step distribution, peak memory and throughput ratios to
    PyTorch and ONNX Runtime fp32 (per round); plus the adaptive vs fixed-step cost, the ADS share of the loop,
    FLOPs per stage and the achieved GFLOP/s against the peak (the CPU's from its microarchitecture at the
    measured clock). Writes bench.json, bench.md and bench.png.
    """
    from bench.run import DEFAULT_ENGINES, load_bench_images, run_bench, write_outputs
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.images import list_images

    b = Bundle(bundle)
    cfg = b.config.replace(ads_enabled=ads)
    paths = list_images([image_dir]) if image_dir else None
    images, names = load_bench_images(cfg, paths, num_images)
    if stream:
        from bench.run import run_stream_bench

        res = run_stream_bench(b, (engine_names or ("ort-fp32",))[0], images, pool=pool, ads=ads, threads=threads,
                               progress=click.echo)
        out = (out_dir or bundle / "bench")
        out.mkdir(parents=True, exist_ok=True)
        (out / "stream.json").write_text(json.dumps(res, indent=2))
        click.echo(f"written: {out / 'stream.json'}")
        return
    results = run_bench(b, engines=engine_names or DEFAULT_ENGINES, images=images, names=names,
                        batch_sizes=sorted(set(batch_sizes)), repeats=repeats, ads=ads, threads=threads,
                        server=server, model_prefix=model_prefix, progress=lambda m: click.echo(m, err=True))
    paths_out = write_outputs(results, out_dir or bundle / "bench")
    click.echo(paths_out["md"].read_text())
    click.echo(f"written: {', '.join(str(p) for p in paths_out.values())}")
