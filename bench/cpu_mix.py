"""Choose each graph's fastest CPU configuration on this machine and record it in the bundle (issue 19, item 2).

    python -m bench.cpu_mix BUNDLE [--images 8] [--batches 1,8] [--repeats 5] [--out runs/bench/cpu_mix]

1. Records the loop's own network inputs (ONNX Runtime fp32 on real ELPV cells, half defective:
   ``calib.quantize.RecordingEngines``).
2. Per graph and configuration (:data:`glad_runtime.engines.mix.CHOICES`: ONNX Runtime fp32, OpenVINO f32, OpenVINO
   bf16 where the CPU has it): the median time of one call at each batch size, achieved GFLOP/s (FLOPs from the
   graph, ``bench.flops``) against this CPU's peak for its ISA, and the error against ONNX Runtime fp32 on the same
   inputs (max and mean |difference| relative to the output's max and mean |value|).
3. A configuration passes a graph's gate when max rel <= :data:`MAX_REL` and mean rel <= :data:`MEAN_REL` (the
   bf16 gates of ``tests/test_openvino.py``); the fastest passing one (per-image time summed over the batch sizes)
   is written to ``BUNDLE/engines/cpu_mix.json`` (:func:`glad_runtime.engines.mix.write_plan`).
4. End to end on the same images: ONNX Runtime fp32 against the mix (``--engine mix``): images/s at each batch
   size, the share of images with the same adaptive step, and the largest score difference.

``results.json`` / ``results.md`` go to ``--out``. Timings on a shared machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["MAX_REL", "MEAN_REL", "cpu_peak_gflops", "select_mix", "end_to_end", "main"]

#: per-graph gate: max |difference| relative to the reference output's max |value| ...
MAX_REL = 1e-1
#: ... and mean |difference| relative to its mean |value| (tests/test_openvino.py's bf16 gates)
MEAN_REL = 4e-2


def cpu_peak_gflops(cores: int) -> dict:
    """This CPU's nominal fp32 and bf16 peak (GFLOP/s) for ``cores`` cores, from ``/proc/cpuinfo``: clock (the
    highest current "cpu MHz" reported, not the turbo clock) x FLOPs per cycle per core (fp32: 2 FMA units x lanes x 2, lanes 16 with AVX-512, 8 with AVX2; bf16:
    twice fp32 with AVX-512 BF16, 1024 x 2 per cycle with AMX). Nominal: turbo and the real FMA unit count vary."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    ghz = (max(mhz) if mhz else 0.0) / 1000
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fp32 = 2 * lanes * 2
    bf16 = 2048 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
    return {"ghz": ghz, "cores": cores, "fp32": ghz * cores * fp32, "bf16": ghz * cores * bf16,
            "isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]}


def _rows(feeds: dict, n: int) -> dict:
    """``n`` samples of recorded feeds (repeating them when fewer were recorded)."""
    k = len(next(iter(feeds.values())))
    idx = np.arange(n) % k
    return {name: np.ascontiguousarray(v[idx]) for name, v in feeds.items()}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations; OpenVINO's shape specialisation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _engines(bundle, choices: Sequence[str], threads: int) -> dict:
    from glad_runtime.engines.openvino import OpenVinoEngines
    from glad_runtime.engines.ort import OrtEngines

    out = {}
    for c in choices:
        backend, precision = c.split("-")
        try:
            out[c] = (OrtEngines(bundle, intra_op_threads=threads) if backend == "ort" else
                      OpenVinoEngines(bundle, precision=precision, num_threads=threads))
        except Exception as e:  # noqa: BLE001 (a configuration this CPU cannot run: reported, skipped)
            out[c] = e
    return out


def select_mix(bundle, images: np.ndarray, *, choices: Sequence[str] | None = None, batches: Sequence[int] = (1, 8),
               repeats: int = 5, threads: int = 0, write: bool = True) -> dict:
    """Steps 1-3 of the module docstring on preprocessed ``images`` ``[N, 3, R, R]``; returns the per-graph table
    and the plan (written to the bundle when ``write``)."""
    from bench.flops import graph_flops
    from calib.quantize import RecordingEngines
    from glad_runtime.core.cpus import threads_for
    from glad_runtime.engines.mix import CHOICES, write_plan
    from glad_runtime.pipeline.batch import GladPipeline

    choices = list(choices or CHOICES)
    engines = _engines(bundle, choices, threads)
    ref = engines["ort-fp32"]
    rec = RecordingEngines(ref, bundle.config)
    GladPipeline(rec, bundle.config)(images)
    peak = cpu_peak_gflops(threads_for(1, threads))  # the cores the engines run on
    table: dict = {}
    for graph, calls in rec.calls.items():
        feeds = {name: np.concatenate([c[name] for c in calls]) for name in calls[0]}
        outputs = _outputs(ref, graph)
        flops = graph_flops(bundle.file(f"onnx/{graph}.onnx"))
        row = {}
        for c, eng in engines.items():
            if isinstance(eng, Exception):
                row[c] = {"skipped": f"{type(eng).__name__}: {eng}"}
                continue
            r: dict = {"s_per_image": {}, "gflops": {}}
            for b in batches:
                f = _rows(feeds, b)
                t = _median_time(lambda: eng._run_graph(graph, f, outputs), repeats)
                r["s_per_image"][str(b)] = t / b
                r["gflops"][str(b)] = flops * b / t / 1e9
            f = _rows(feeds, max(batches))
            got = eng._run_graph(graph, f, outputs)
            want = ref._run_graph(graph, f, outputs)
            r["max_rel"] = max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)) for g, w in zip(got, want))
            r["mean_rel"] = max(float(np.abs(g - w).mean() / max(np.abs(w).mean(), 1e-12)) for g, w in zip(got, want))
            r["passes"] = r["max_rel"] <= MAX_REL and r["mean_rel"] <= MEAN_REL
            r["cost"] = sum(r["s_per_image"].values())
            row[c] = r
        passing = {c: r for c, r in row.items() if r.get("passes")}
        choice = min(passing, key=lambda c: passing[c]["cost"]) if passing else "ort-fp32"
        table[graph] = {"choice": choice, "gflop_per_image": flops / 1e9, "configs": row}
    plan = {g: {"choice": t["choice"], "s_per_image": t["configs"][t["choice"]]["s_per_image"]}
            for g, t in table.items()}
    res = {"bundle": str(bundle.path), "batches": list(batches), "repeats": repeats, "peak_gflops": peak,
           "graphs": table, "plan": plan}
    if write:
        import openvino

        res["plan_file"] = write_plan(bundle, plan, openvino=openvino.get_version())
    return res


def _outputs(engines, graph: str) -> list[str]:
    """The output names the Engines calls ask a graph for."""
    if graph == "vae_encoder":
        return ["latents"]
    if graph == "unet":
        return ["noise_pred"]
    if graph == "vae_decoder":
        return ["images"]
    return list(engines._token_names)


def end_to_end(bundle, images: np.ndarray, batches: Sequence[int] = (1, 8), repeats: int = 2,
               threads: int = 0) -> dict:
    """Step 4: ``{"ort-fp32": {batch: images/s}, "mix": {...}, "same_adaptive_step": share, "max_score_rel": ...}``."""
    from glad_runtime.engines.mix import MixedEngines
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.pipeline.batch import GladPipeline

    out: dict = {}
    results = {}
    for name, eng in (("ort-fp32", OrtEngines(bundle, intra_op_threads=threads)),
                      ("mix", MixedEngines(bundle, threads=threads))):
        pipe = GladPipeline(eng, bundle.config)
        results[name] = pipe(images)
        out[name] = {}
        for b in batches:
            def run():
                for s in range(0, len(images), b):
                    pipe(images[s:s + b])
            out[name][str(b)] = len(images) / _median_time(run, repeats)
    a, m = results["ort-fp32"], results["mix"]
    out["same_adaptive_step"] = float(np.mean(a.adaptive_steps == m.adaptive_steps))
    out["max_score_rel"] = float(np.abs(a.scores - m.scores).max() / np.abs(a.scores).max())
    out["speedup"] = {b: out["mix"][b] / out["ort-fp32"][b] for b in out["mix"]}
    return out


def write_outputs(res: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    peak = res["peak_gflops"]
    lines = [f"CPU peak (nominal, {peak.get('cores')} cores at {peak.get('ghz', 0):.2f} GHz, "
             f"{' '.join(peak.get('isa', []))}): fp32 {peak.get('fp32', 0):.0f} GFLOP/s, bf16 "
             f"{peak.get('bf16', 0):.0f} GFLOP/s.", "",
             "| graph | config | " + " | ".join(f"ms/image b{b}" for b in res["batches"]) + " | "
             + " | ".join(f"GFLOP/s b{b}" for b in res["batches"]) + " | max rel | mean rel | gate | chosen |",
             "|---|---|" + "---|" * (2 * len(res["batches"]) + 4)]
    for g, t in res["graphs"].items():
        for c, r in t["configs"].items():
            if "skipped" in r:
                lines.append(f"| {g} | {c} | skipped: {r['skipped'][:80]} |")
                continue
            ms = " | ".join(f"{1e3 * r['s_per_image'][str(b)]:.1f}" for b in res["batches"])
            gf = " | ".join(f"{r['gflops'][str(b)]:.1f}" for b in res["batches"])
            lines.append(f"| {g} | {c} | {ms} | {gf} | {r['max_rel']:.1e} | {r['mean_rel']:.1e} | "
                         f"{'pass' if r['passes'] else 'FAIL'} | {'**yes**' if c == t['choice'] else ''} |")
    e2e = res.get("end_to_end")
    if e2e:
        lines += ["", "| engine | " + " | ".join(f"images/s b{b}" for b in res["batches"]) + " |",
                  "|---|" + "---|" * len(res["batches"])]
        for name in ("ort-fp32", "mix"):
            lines.append(f"| {name} | " + " | ".join(f"{e2e[name][str(b)]:.3f}" for b in res["batches"]) + " |")
        lines.append(f"| mix / ort-fp32 | " + " | ".join(f"{e2e['speedup'][str(b)]:.2f}x" for b in res["batches"])
                     + " |")
        lines += ["", f"Same adaptive step on {e2e['same_adaptive_step']:.0%} of the images; largest score "
                      f"difference {e2e['max_score_rel']:.1e} of the largest score."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.md"


def main(argv: Sequence[str] | None = None) -> None:
    from bench.run import load_bench_images
    from glad_runtime.core.bundle import Bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/cpu_mix"))
    a = ap.parse_args(argv)
    b = Bundle(a.bundle)
    batches = [int(x) for x in a.batches.split(",")]
    imgs, _ = load_bench_images(b.config, count=a.images)
    res = select_mix(b, imgs, batches=batches, repeats=a.repeats, threads=a.threads)
    print(json.dumps(res["plan"], indent=1), flush=True)
    res["end_to_end"] = end_to_end(b, imgs, batches, threads=a.threads)
    print(write_outputs(res, a.out).read_text())


if __name__ == "__main__":
    main()
