"""``glad bench``: the same real images through every available engine, in one run, side by side.

Every engine is loaded and warmed up first; then per batch size (1, 4, 16 by default) ``repeats`` rounds, each one
pass over the images per engine, the engines alternating within each round (``bench.interleave``: on a shared
machine a block per engine measured the neighbours' load as much as the engine; issue 33). Reported per engine and
batch size: images/s (median, min-max and spread over the rounds), p50/p95/p99 request latency (a request is one
batch), seconds per image in each pipeline stage (encode, UNet steps, ADS decode, ADS features, ADS distance,
decode, features, scoring), the distribution of adaptive steps, peak memory (resident set high-water mark of this
process while the engine loaded and warmed up; a served engine's server is a separate process), and throughput
ratios against PyTorch and ONNX Runtime fp32 when they ran (the median of the per-round ratios, with min-max). Also:
the adaptive (ADS on) versus fixed-step (ADS off) cost (interleaved too) and the share of the denoising loop spent
in ADS checks, FLOPs per stage from the exported graphs (``bench.flops``) and the achieved GFLOP/s against the
peak: on a GPU the device's TFLOP/s, on a CPU its microarchitecture's peak at the measured clock
(``bench.cpu_peak``).

Engines are named ``torch``, ``ort-fp32``, ``ort-fp16``, ``ort-int8``, ``tensorrt-fp16``, ... (``backend-precision``);
unavailable ones (no export, no GPU, no quantised graphs) are skipped with the reason in the output.
"""

from __future__ import annotations

import json
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from glad_runtime.errors import UsageError

__all__ = ["run_bench", "run_stream_bench", "DEFAULT_ENGINES", "load_bench_images", "write_outputs", "percentiles"]

DEFAULT_ENGINES = ("torch", "ort-fp32", "ort-fp16", "ort-int8", "tensorrt-fp16")
STAGES = ("encode", "unet", "ads_decode", "ads_features", "ads_fused", "ads_distance", "decode", "features", "scoring")
ADS_STAGES = ("ads_decode", "ads_features", "ads_fused", "ads_distance")


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 (numpy ``linear`` method) of latencies in seconds."""
    v = np.asarray(values, dtype=np.float64)
    return {f"p{q}": float(np.percentile(v, q)) for q in (50, 95, 99)}


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 resets VmHWM (the peak resident set) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def load_bench_images(config, image_paths: Sequence[Path] | None = None, count: int = 16) -> tuple[np.ndarray, list[str]]:
    """``[N,3,R,R]`` float32 in [-1,1] and their names: the given files, else real ELPV mono cells (half
    defective; the ``elpv-dataset`` package), else scikit-image's photos; all through the config's
    :class:`~glad_runtime.core.images.Preprocessor` (arrays as float pixels in [0, 1]).

    Raises:
        UsageError: no images could be loaded.
    """
    from glad_runtime.core.images import Preprocessor, load_image

    pre = Preprocessor.from_config(config)

    if image_paths:
        paths = list(image_paths)[:count]
        return np.stack([pre.image(load_image(p)) for p in paths]), [str(p) for p in paths]
    try:
        from elpv_dataset.utils import load_dataset

        images, probs, types = load_dataset()
        mono = types == "mono"
        good = np.where(mono & (probs == 0))[0][-(count - count // 2):]
        bad = np.where(mono & (probs == 1))[0][-(count // 2):]
        idx = np.concatenate([good, bad])
        rgb = [images[i].astype(np.float32) / np.float32(255.0) for i in idx]
        names = [f"elpv-{'good' if probs[i] == 0 else 'defect'}-{i}" for i in idx]
    except ImportError:
        import skimage.data as sk

        names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "moon", "page", "text"][:count]
        rgb = []
        for n in names:
            a = np.asarray(getattr(sk, n)(), dtype=np.float32) / 255.0
            rgb.append(a[..., :3] if a.ndim == 3 else a)
    if not rgb:
        raise UsageError("no benchmark images")
    return np.stack([pre(r) for r in rgb]), names


def _engine_factory(bundle, name: str, threads: int, server: str | None = None,
                    model_prefix: str | None = None) -> Callable:
    from glad_runtime.engines.registry import EngineSpec, backend_row, open_engines

    backend, _, precision = name.partition("-")

    def make():  # an unknown name or a precision the backend lacks raises here: the engine is skipped
        if backend == "triton":  # the client-side loop against served networks
            spec = EngineSpec("triton", max_batch=64, options={"url": server, "model_prefix": model_prefix})
        else:  # `backend-precision` (default: the backend's); threads where the backend has a thread setting
            spec = EngineSpec(backend, precision=precision or None, max_batch=64,
                              threads=threads if backend_row(backend).threads else 0)
        return open_engines(bundle, spec)

    return make


def _load_engine(make, config, images: np.ndarray, batch_sizes: Sequence[int]) -> dict:
    """Load one engine and warm it up (batch 1 and the largest batch): ``{"engines", "pipe", "load_s",
    "peak_rss_mb", "adaptive_steps"}``; the peak resident set covers loading and the warm-up of this engine alone."""
    from glad_runtime.pipeline.batch import GladPipeline

    _reset_peak_rss()
    t0 = time.perf_counter()
    engines = make()
    load_s = time.perf_counter() - t0
    pipe = GladPipeline(engines, config)
    pipe(images[:1])  # warm-up: first-call allocations, lazy initialisation
    steps = []
    for i in range(0, len(images), max(batch_sizes)):  # also the adaptive steps of every image
        steps += pipe(images[i:i + max(batch_sizes)]).adaptive_steps.tolist()
    return {"engines": engines, "pipe": pipe, "load_s": load_s, "peak_rss_mb": _peak_rss_mb(),
            "adaptive_steps": {str(k): v for k, v in sorted(Counter(steps).items())}}


def _interleaved_passes(loaded: dict, images: np.ndarray, batch_sizes: Sequence[int], repeats: int,
                        say: Callable[[str], None]) -> dict:
    """Per batch size, one pass over ``images`` per engine and round, the engines interleaved within each round
    (:func:`bench.interleave.interleave`, warm-up: one request of that size per engine); returns
    ``{name: {"batch": {bs: {...}}}}`` with medians, min / max and spread of images/s, the per-round pass seconds
    (``round_s``, for paired ratios), latency percentiles and per-stage seconds per image."""
    from bench.interleave import interleave

    n = len(images)
    out: dict = {name: {"batch": {}} for name in loaded}
    for bs in batch_sizes:
        lat: dict = {name: [] for name in loaded}
        stage_runs: dict = {name: [] for name in loaded}

        def one_pass(name, bs=bs, lat=lat, stage_runs=stage_runs):
            def run():
                stages = Counter()
                for i in range(0, n, bs):
                    t = time.perf_counter()
                    res = loaded[name]["pipe"](images[i:i + bs])
                    lat[name].append(time.perf_counter() - t)
                    stages.update(res.timings)
                stage_runs[name].append({k: stages.get(k, 0.0) / n for k in STAGES})
            return run

        res = interleave({name: one_pass(name) for name in loaded}, repeats, warmup=1,
                         warmups={name: (lambda name=name, bs=bs: loaded[name]["pipe"](images[:bs]))
                                  for name in loaded})
        for name, cell in res["cells"].items():
            rates = sorted(n / v for v in cell["values"])
            stage_med = {k: float(np.median([r[k] for r in stage_runs[name]])) for k in STAGES}
            out[name]["batch"][str(bs)] = {
                "images_per_s": n / cell["median"], "images_per_s_min": rates[0], "images_per_s_max": rates[-1],
                "spread": cell["spread"], "round_s": cell["values"], "latency_s": percentiles(lat[name]),
                "stage_s_per_image": stage_med, "requests": len(lat[name])}
        say(f"  batch {bs:>3}: " + ", ".join(f"{name} {out[name]['batch'][str(bs)]['images_per_s']:.2f} img/s "
                                             f"(spread {100 * out[name]['batch'][str(bs)]['spread']:.0f}%)"
                                             for name in loaded))
    return out


def run_bench(bundle, *, engines: Sequence[str] = DEFAULT_ENGINES, images: np.ndarray | None = None,
              names: Sequence[str] | None = None, batch_sizes: Sequence[int] = (1, 4, 16), repeats: int = 2,
              ads: bool = True, threads: int = 0, server: str | None = None, model_prefix: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark the engines on the same images; returns the JSON-able result (see module docstring).

    Args:
        bundle: a :class:`~glad_runtime.core.bundle.Bundle` (exported for ``ort-*``, built for ``tensorrt-*``).
        engines: engine names ``backend[-precision]``.
        images: ``[N,3,R,R]`` float32 in [-1,1] (default :func:`load_bench_images`).
        batch_sizes: requests of this many images.
        repeats: passes over the images per batch size (medians reported).
        ads: run with ADS on (the tiny preset ships it off; the checks are what a deployment must engineer down).
        threads: ONNX Runtime intra-op threads (0 = default).
        server, model_prefix: a Triton server serving this bundle (``glad serve``); adds the ``triton`` engine
            (the ADS/SAFF loop here, every network call served).
    """
    say = progress or (lambda m: None)
    config = bundle.config.replace(ads_enabled=bool(ads))
    if images is None:
        images, names = load_bench_images(config)
    results: dict = {"bundle": str(bundle.path), "preset": config.preset, "ads_enabled": config.ads_enabled,
                     "num_images": int(len(images)), "images": list(names or []), "batch_sizes": list(batch_sizes),
                     "repeats": repeats, "threads": threads,
                     "host": {"machine": platform.machine(), "processor": platform.processor(),
                              "python": platform.python_version()},
                     "engines": {}, "skipped": {}}
    engines = list(engines) + (["triton"] if server and "triton" not in engines else [])
    loaded: dict = {}
    for name in engines:
        say(f"{name}: loading and warming up")
        try:
            loaded[name] = _load_engine(_engine_factory(bundle, name, threads, server, model_prefix), config,
                                        images, batch_sizes)
        except Exception as e:  # an unavailable engine is reported, the others still run
            results["skipped"][name] = f"{type(e).__name__}: {e}"
            say(f"    skipped: {type(e).__name__}: {str(e)[:200]}")
    results["timing"] = ("interleaved (bench.interleave): per batch size the engines alternate within each repeat "
                         "after a warm-up request; medians, min-max and spread = (max - min) / median")
    if loaded:
        passes = _interleaved_passes(loaded, images, batch_sizes, repeats, say)
        for name, eng in loaded.items():
            results["engines"][name] = {"load_s": eng["load_s"], **passes[name],
                                        "adaptive_steps": eng["adaptive_steps"], "peak_rss_mb": eng["peak_rss_mb"]}
    for eng in loaded.values():
        close = getattr(eng["engines"], "close", None)
        if callable(close):
            close()
    _add_ratios(results)
    _add_ads_cost(results, bundle, config, images, threads, say, server, model_prefix)
    _add_flops(results, bundle, config)
    return results


#: engines the ratios are taken against, when measured: ``vs_<name>`` in each engine's result
RATIO_REFERENCES = ("torch", "ort-fp32")


def _add_ratios(results: dict) -> None:
    """Throughput ratios against each measured reference engine, round by round (the passes ran interleaved):
    ``vs_torch`` / ``vs_ort-fp32`` ``{bs: {"throughput_x" (median of per-round ratios), "min", "max",
    "p50_latency_x"}}``."""
    from bench.interleave import cell_stats

    for ref_name in RATIO_REFERENCES:
        ref = results["engines"].get(ref_name)
        if not ref:
            continue
        for r in results["engines"].values():
            out = {}
            for bs, b in r["batch"].items():
                if bs not in ref["batch"]:
                    continue
                rr = cell_stats([x / y for x, y in zip(ref["batch"][bs]["round_s"], b["round_s"])])
                out[bs] = {"throughput_x": rr["median"], "min": rr["min"], "max": rr["max"],
                           "p50_latency_x": b["latency_s"]["p50"] / ref["batch"][bs]["latency_s"]["p50"]}
            r[f"vs_{ref_name}"] = out


def _add_ads_cost(results: dict, bundle, config, images, threads, say, server=None, model_prefix=None) -> None:
    """Adaptive vs fixed-step cost on the fastest measured engine, at the largest batch size."""
    measured = results["engines"]
    if not measured:
        return
    bs = str(max(results["batch_sizes"]))
    name = max(measured, key=lambda k: measured[k]["batch"][bs]["images_per_s"])
    from bench.interleave import interleave
    from glad_runtime.pipeline.batch import GladPipeline

    engines = _engine_factory(bundle, name, threads, server, model_prefix)()
    cost = {"engine": name, "batch_size": int(bs)}
    b = int(bs)
    pipes = {label: GladPipeline(engines, config.replace(ads_enabled=on)) for label, on in (("adaptive", True),
                                                                                             ("fixed", False))}
    stages = {label: Counter() for label in pipes}

    def one_pass(label):
        def run():
            for i in range(0, len(images), b):
                stages[label].update(pipes[label](images[i:i + b]).timings)
        return run

    res = interleave({label: one_pass(label) for label in pipes}, max(1, int(results.get("repeats", 1))), warmup=1,
                     warmups={label: (lambda label=label: pipes[label](images[:b])) for label in pipes})
    for label in pipes:
        cost[f"{label}_s_per_image"] = res["cells"][label]["median"] / len(images)
    st = stages["adaptive"]
    loop = st["unet"] + sum(st[k] for k in ADS_STAGES)
    cost["ads_share_of_loop"] = sum(st[k] for k in ADS_STAGES) / loop if loop else 0.0
    cost["timing"] = "adaptive and fixed passes interleaved (bench.interleave)"
    cost["adaptive_over_fixed"] = cost["adaptive_s_per_image"] / cost["fixed_s_per_image"]
    results["ads_cost"] = cost
    say(f"ADS cost ({name}, batch {bs}): adaptive/fixed = {cost['adaptive_over_fixed']:.2f}x, checks = "
        f"{100 * cost['ads_share_of_loop']:.0f}% of the loop")


def _add_flops(results: dict, bundle, config) -> None:
    from bench.flops import PEAK_TFLOPS, stage_flops

    if not bundle.file("onnx/unet.onnx").is_file():
        return
    steps = [int(s) for s, c in next(iter(results["engines"].values()), {}).get("adaptive_steps", {}).items()
             for _ in range(c)] if results["engines"] else []
    from glad_runtime.core.schedule import ddim_timesteps

    ts = ddim_timesteps(config.t_max, config.num_inference_steps).tolist()
    checks = float(np.mean([sum(1 for t in ts if t >= s) for s in steps])) if steps and config.ads_enabled else 0.0
    fl = stage_flops(bundle.file("onnx"), config.num_inference_steps * config.num_seeds, checks)
    results["flops_per_image"] = fl
    gpu = None
    try:
        from glad_runtime.engines.trt import current_gpu

        gpu = current_gpu().name
    except Exception:
        pass
    peak = next((v for k, v in PEAK_TFLOPS.items() if gpu and k in gpu), None)
    cpu = None
    if not peak:  # on the CPU: the peak from its microarchitecture at the clock measured now (bench.cpu_peak)
        try:
            from bench.cpu_peak import cpu_peak
            from glad_runtime.core.cpus import threads_for

            cpu = results["cpu_peak"] = cpu_peak(threads_for(1, int(results.get("threads", 0))))
        except Exception:  # noqa: BLE001 (no /proc/cpuinfo: no peak line)
            cpu = None
    for name, r in results["engines"].items():
        best = max(b["images_per_s"] for b in r["batch"].values())
        r["achieved_gflops"] = best * fl["total"] / 1e9
        if peak:
            r["tflops_vs_peak"] = {"achieved": r["achieved_gflops"] / 1e3, "peak": peak, "gpu": gpu}
        elif cpu and not name.startswith(("torch-cuda", "tensorrt", "triton")):
            prec = "bf16" if ("bf16" in name or name == "mix") else "fp32"  # mix: bf16 where its plan chose it
            r["cpu_vs_peak"] = {"achieved": r["achieved_gflops"], "peak": cpu[prec], "precision": prec}


def write_outputs(results: dict, out_dir: Path) -> dict[str, Path]:
    """``bench.json``, ``bench.md`` (the side-by-side table) and ``bench.png`` (images/s per engine and batch)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["md"].write_text(markdown_table(results))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(results["engines"])
        bss = [str(b) for b in results["batch_sizes"]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.8 / max(1, len(names))
        for k, name in enumerate(names):
            vals = [results["engines"][name]["batch"][b]["images_per_s"] for b in bss]
            ax.bar(np.arange(len(bss)) + k * w, vals, w, label=name)
        ax.set_xticks(np.arange(len(bss)) + w * (len(names) - 1) / 2, [f"batch {b}" for b in bss])
        ax.set_ylabel("images / s")
        ax.set_title(f"GLAD {results['preset']} (ADS {'on' if results['ads_enabled'] else 'off'})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
    except ImportError:
        paths.pop("png")
    return paths


def markdown_table(results: dict) -> str:
    """The side-by-side table (one row per engine and batch size) plus stage, ADS and FLOP summaries."""
    refs = [k for k in RATIO_REFERENCES if k in results["engines"]]
    lines = [f"# GLAD benchmark: {results['preset']}, {results['num_images']} images, ADS "
             f"{'on' if results['ads_enabled'] else 'off'}, medians of {results['repeats']} repeats, engines "
             f"interleaved within each repeat", "",
             "| engine | batch | images/s (min-max) | p50 s | p95 s | p99 s | "
             + "".join(f"x {k} (min-max) | " for k in refs) + "peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(refs) + "---:|"]
    for name, r in results["engines"].items():
        for bs, b in r["batch"].items():
            lat = b["latency_s"]
            ratios = ""
            for k in refs:
                x = r.get(f"vs_{k}", {}).get(bs)
                ratios += ("| " if x is None else f"{x['throughput_x']:.2f} ({x['min']:.2f}-{x['max']:.2f}) | ")
            rng = (f" ({b['images_per_s_min']:.2f}-{b['images_per_s_max']:.2f})" if "images_per_s_min" in b else "")
            lines.append(f"| {name} | {bs} | {b['images_per_s']:.2f}{rng} | {lat['p50']:.3f} | {lat['p95']:.3f} | "
                         f"{lat['p99']:.3f} | {ratios}"
                         f"{'' if r.get('peak_rss_mb') is None else round(r['peak_rss_mb'])} |")
    lines += ["", "Seconds per image by stage (largest batch):", "",
              "| engine | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]
    for name, r in results["engines"].items():
        b = r["batch"][str(max(results["batch_sizes"]))]["stage_s_per_image"]
        lines.append(f"| {name} | " + " | ".join(f"{b[k]:.4f}" for k in STAGES) + " |")
    lines += ["", "Adaptive steps (DDIM timestep where ADS decided: images):", ""]
    for name, r in results["engines"].items():
        lines.append(f"- {name}: {r['adaptive_steps']}")
    if "ads_cost" in results:
        c = results["ads_cost"]
        lines += ["", f"ADS cost ({c['engine']}, batch {c['batch_size']}): adaptive {c['adaptive_s_per_image']:.3f} "
                      f"s/image vs fixed {c['fixed_s_per_image']:.3f} s/image ({c['adaptive_over_fixed']:.2f}x); "
                      f"ADS checks take {100 * c['ads_share_of_loop']:.0f}% of the denoising loop."]
    if "flops_per_image" in results:
        f = results["flops_per_image"]
        lines += ["", f"FLOPs per image: total {f['total'] / 1e9:.2f} G; UNet step {f['unet_step'] / 1e9:.2f} G; one "
                      f"ADS check {f['ads_check'] / 1e9:.2f} G (= {f['ads_check_in_unet_steps']:.1f} UNet steps)."]
        for name, r in results["engines"].items():
            extra = ""
            if "tflops_vs_peak" in r:
                t = r["tflops_vs_peak"]
                extra = f" = {t['achieved']:.1f} of {t['peak']:.0f} TFLOP/s peak on {t['gpu']}"
            elif "cpu_vs_peak" in r:
                t = r["cpu_vs_peak"]
                extra = f" = {100 * t['achieved'] / t['peak']:.0f}% of the {t['precision']} peak {t['peak']:.0f}"
            lines.append(f"- {name}: {r['achieved_gflops']:.1f} GFLOP/s achieved{extra}")
    if "cpu_peak" in results:
        from bench.cpu_peak import peak_line

        lines += ["", peak_line(results["cpu_peak"])]
    if results["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- {k}: {v[:300]}" for k, v in results["skipped"].items()]
    return "\n".join(lines) + "\n"


STREAM_MODES = ("one_at_a_time", "per_batch_official", "per_batch", "scheduler")


def run_stream_bench(bundle, engine: str = "ort-fp32", images: np.ndarray | None = None, *, pool: int = 8,
                     ads: bool = True, threads: int = 0, progress: Callable[[str], None] | None = None,
                     engines=None, config=None, modes: Sequence[str] = STREAM_MODES) -> dict:
    """A stream of mixed normal and defective images through the ways of serving it (issue: step scheduler):

    * ``one_at_a_time``: :class:`GladPipeline` on each image alone;
    * ``per_batch_official``: :class:`GladPipeline` on consecutive batches of ``pool`` images with the official
      code's check cost (``check_decided=True``: while any image of the batch is undecided, every image is checked);
    * ``per_batch``: the same batches with this project's pipeline (only undecided images are checked);
    * ``scheduler``: :class:`~glad_runtime.pipeline.stream.StepScheduler` with ``pool`` images in flight.

    All images are available at the start (a saturated line). Latency of an image: from when its work starts (its
    batch starts, or it is admitted) to its result. Returns images/s, p50/p95/p99 latency and the largest score
    difference of each mode against the first mode run (the results must agree). ``engines`` and ``config`` (an
    already-built :class:`~glad_runtime.engines.Engines` and its config) replace ``bundle`` and ``engine``, e.g. the
    PyTorch engine on a GPU in ``bench.gpu_check``.
    """
    from glad_runtime.pipeline.batch import GladPipeline
    from glad_runtime.pipeline.stream import StepScheduler

    unknown = set(modes) - set(STREAM_MODES)
    if unknown:
        raise UsageError(f"unknown stream modes {sorted(unknown)}; known: {STREAM_MODES}")
    say = progress or (lambda m: None)
    config = (config or bundle.config).replace(ads_enabled=bool(ads))
    if images is None:
        images, _ = load_bench_images(config)
    if engines is None:
        engines = _engine_factory(bundle, engine, threads)()
    pipe = GladPipeline(engines, config)
    pipe(images[:pool])  # warm-up
    n = len(images)
    out: dict = {"engine": engine, "pool": pool, "num_images": n, "ads_enabled": config.ads_enabled, "modes": {}}
    scores: dict[str, np.ndarray] = {}

    for mode in [m for m in STREAM_MODES if m in modes]:
        t0 = time.perf_counter()
        lat, sc = [], np.zeros(n)
        extra: dict = {}
        if mode == "scheduler":
            sched = StepScheduler(engines, config, max_active=pool, max_queue=pool)
            started: dict[int, float] = {}

            def feed():
                for i in range(n):
                    started[i] = time.perf_counter()
                    yield i, images[i]

            for r in sched.stream(feed()):
                lat.append(time.perf_counter() - started[r.source])
                sc[r.source] = r.score
            extra = {k: sched.stats[k] for k in ("unet_calls", "unet_images", "check_calls", "check_images")}
        else:
            size = 1 if mode == "one_at_a_time" else pool
            runner = GladPipeline(engines, config, check_decided=mode == "per_batch_official")
            for i in range(0, n, size):
                t = time.perf_counter()
                res = runner(images[i:i + size])
                lat += [time.perf_counter() - t] * len(res.scores)
                sc[i:i + size] = res.scores
        scores[mode] = sc
        out["modes"][mode] = {"images_per_s": n / (time.perf_counter() - t0), "latency_s": percentiles(lat), **extra}
    ref = next(iter(scores.values()))
    for mode, s in scores.items():
        out["modes"][mode]["max_score_rel_diff"] = float(np.abs(s - ref).max() / np.abs(ref).max())
    out["results_agree"] = all(m["max_score_rel_diff"] < 1e-3 for m in out["modes"].values())
    if not out["results_agree"]:  # the modes must compute the same per-image results; a bench bug otherwise
        say("WARNING: the modes' scores disagree (max rel. diff above 1e-3): their throughputs do not compare")
    base_mode = "per_batch" if "per_batch" in scores else next(iter(scores))
    base = out["modes"][base_mode]["images_per_s"]
    for mode in out["modes"]:
        m = out["modes"][mode]
        m[f"throughput_vs_{base_mode}"] = m["images_per_s"] / base
        say(f"{mode:>18}: {m['images_per_s']:.2f} img/s ({m[f'throughput_vs_{base_mode}']:.2f}x {base_mode}), p99 "
            f"{m['latency_s']['p99']:.2f} s, score diff {m['max_score_rel_diff']:.1e}")
    return out
