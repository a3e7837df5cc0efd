"""Full-size GLAD on a GPU with the PyTorch engine, in one short run (the device check of the benchmark issues).

    python -m bench.gpu_check --out DIR [--arch sd14-dino-vitb8] [--images DIR] [--device cuda] [--dtype fp16]

The ``sd14-dino-vitb8`` architecture (random weights: the costs, not the decisions, are what is measured) on the
:class:`~glad_runtime.engines.pytorch.TorchEngines` (numpy in and out, so host transfers are included, as the pipeline
pays them). Sections, each written to ``DIR/gpu_check.json`` as soon as it is done (a run stopped at its time
limit keeps what it measured):

1. ``probe``: GPU, driver, torch and CUDA versions, whether TensorRT and onnxruntime's CUDA / TensorRT providers
   are importable (the TensorRT engine path needs them).
2. ``graphs``: median seconds per call of each network at batch 1, 4 and 8 (UNet with classifier-free guidance
   inside, VAE encoder and decoder, DINO ViT-B/8 at 512 px with the 4 scoring layers), and the ADS check (two
   decodes + the features of both at the ADS size) in UNet-step equivalents.
3. ``pipeline``: :class:`~glad_runtime.pipeline.batch.GladPipeline` seconds per image at batch 1 and 8, ADS off and on,
   with the stage split and the adaptive steps taken.
4. ``stream``: ``bench.run.run_stream_bench`` (one at a time, per batch, step scheduler) on the same images.

``--arch tiny`` runs the same script on the tiny architecture (a CPU smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np


def _probe() -> dict:
    import torch

    out: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                 "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, sm=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    for mod in ("tensorrt", "polygraphy", "onnxruntime", "diffusers", "timm"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "present")
        except Exception as e:  # noqa: BLE001 - a probe: record why, whatever it is
            out[mod] = f"missing: {type(e).__name__}: {e}"[:200]
    try:
        import onnxruntime as ort

        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return out


def _time(fn, *args, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall seconds of ``fn(*args)`` (the engine returns numpy, so every call ends synchronised)."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _graphs(engines, config, batches=(1, 4, 8)) -> dict:
    from glad_runtime.core.scoring import resize_bilinear

    c = config
    rng = np.random.default_rng(0)
    out: dict = {}
    for b in batches:
        lat = rng.standard_normal((b, c.latent_channels, c.latent_size, c.latent_size), dtype=np.float32)
        img = rng.uniform(-1, 1, (b, 3, c.resolution, c.resolution)).astype(np.float32)
        dimg = rng.uniform(-1, 1, (b, 3, c.dino_resolution, c.dino_resolution)).astype(np.float32)
        ts = np.full(b, c.t_max // 2, dtype=np.int64)
        row = {"unet": _time(engines.unet, lat, ts), "vae_encoder": _time(engines.encode, img),
               "vae_decoder": _time(engines.decode, lat), "dino": _time(engines.features, dimg)}
        lat2 = np.concatenate([lat, lat])

        def check():
            imgs = engines.decode(lat2)
            if c.ads_size != c.resolution:
                imgs = resize_bilinear(imgs, (c.ads_size, c.ads_size))
            engines.features(imgs)

        row["ads_check"] = _time(check)
        row["ads_check_in_unet_steps"] = row["ads_check"] / row["unet"]
        if callable(getattr(engines, "ads_distance", None)):  # the fused check: only the distance map leaves
            row["ads_check_fused"] = _time(engines.ads_distance, lat, lat, c)
            row["ads_check_fused_in_unet_steps"] = row["ads_check_fused"] / row["unet"]
        out[str(b)] = row
        print(f"  batch {b}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" if not k.endswith("unet_steps") else
                                           f"{k} = {v:.2f}" for k, v in row.items()), flush=True)
    return out


def _pipeline(engines, config, images: np.ndarray) -> dict:
    from collections import Counter

    from glad_runtime.pipeline.batch import GladPipeline

    out: dict = {}
    for ads in (False, True):
        cfg = config.replace(ads_enabled=ads)
        pipe = GladPipeline(engines, cfg)
        pipe(images[:1])  # warm-up
        for b in (1, 8):
            b = min(b, len(images))
            t = time.perf_counter()
            stages: Counter = Counter()
            steps: list[int] = []
            for i in range(0, len(images), b):
                res = pipe(images[i:i + b])
                stages.update(res.timings)
                steps += res.adaptive_steps.tolist()
            per = (time.perf_counter() - t) / len(images)
            key = f"ads_{'on' if ads else 'off'}_batch{b}"
            out[key] = {"seconds_per_image": per, "images_per_s": 1 / per,
                        "stage_s_per_image": {k: v / len(images) for k, v in stages.items()},
                        "adaptive_steps": {str(k): v for k, v in sorted(Counter(steps).items())}}
            print(f"  {key}: {per * 1e3:.0f} ms/image ({1 / per:.2f} img/s)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arch", default="sd14-dino-vitb8", choices=["sd14-dino-vitb8", "tiny"])
    ap.add_argument("--images", type=Path, help="folder of images (default: bench.run.load_bench_images)")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--skip", action="append", default=[], choices=["graphs", "pipeline", "stream"])
    ap.add_argument("--stream-mode", action="append", help="bench.run.STREAM_MODES (default: all)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"arch": args.arch, "dtype": args.dtype, "device": args.device}

    def save():
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))

    result["probe"] = _probe()
    print(json.dumps(result["probe"]), flush=True)
    save()

    from bench.run import STREAM_MODES, load_bench_images, run_stream_bench
    from export.models import build_sd14_modules, build_tiny_modules
    from glad_runtime.core.config import get_preset
    from glad_runtime.engines.pytorch import TorchEngines

    cfg = get_preset(args.arch) if args.arch != "tiny" else get_preset("tiny", ads_enabled=True)
    t = time.perf_counter()
    modules = build_sd14_modules(cfg, random_init=True) if args.arch != "tiny" else build_tiny_modules(cfg)
    result["build_modules_s"] = time.perf_counter() - t
    t = time.perf_counter()
    engines = TorchEngines(modules, device=args.device, dtype=args.dtype, max_batch=64)
    result["to_device_s"] = time.perf_counter() - t
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".tif")) \
        if args.images else None
    images, names = load_bench_images(cfg, paths, count=args.count)
    result["images"] = names
    print(f"modules built in {result['build_modules_s']:.1f} s; {len(images)} images", flush=True)
    def section(name, fn):
        """Run one section; on a failure (a non-finite fp16 output, say) record it and retry once in bf16."""
        nonlocal engines
        if name in args.skip:
            return
        print(f"{name}:", flush=True)
        try:
            result[name] = fn(engines)
        except Exception as e:  # noqa: BLE001 - one failed section must not lose the others
            result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
            print(f"  {name} failed: {e}", flush=True)
            if args.dtype == "fp16" and args.device.startswith("cuda"):
                engines = TorchEngines(modules, device=args.device, dtype="bf16", max_batch=64)
                result[name + "_bf16"] = fn(engines)
                engines = TorchEngines(modules, device=args.device, dtype=args.dtype, max_batch=64)
        save()

    section("graphs", lambda e: _graphs(e, cfg))
    section("pipeline", lambda e: _pipeline(e, cfg, images))
    section("stream", lambda e: run_stream_bench(None, f"torch-{args.dtype}", images, pool=8, ads=True, engines=e,
                                                 config=cfg, progress=print,
                                                 modes=args.stream_mode or STREAM_MODES))
    if args.device.startswith("cuda"):
        import torch

        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        save()
    print(f"written {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
