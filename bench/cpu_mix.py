"""Choose each graph's fastest CPU configuration on this machine and record it in the bundle (issue 19, item 2;
issue 33).

    python -m bench.cpu_mix BUNDLE [--images 8] [--check-images 40] [--batches 1,8] [--repeats 5]
                                   [--e2e-repeats 7] [--e2e-engines ort-fp32,mix] [--no-ads] [--out runs/bench/cpu_mix]

1. Records the loop's own network inputs (ONNX Runtime fp32 on real ELPV cells, half defective:
   ``calib.quantize.RecordingEngines``) with ADS on whenever the bundle can run it (the tiny preset ships ADS off;
   ``GladConfig.ads_enabled=True`` is applied here, as ``glad bench --ads`` does), so ``dino_ads`` and the fused
   ``ads_check`` graph get the check's real inputs. ``--no-ads`` keeps the bundle's setting.
2. Per exported graph (``vae_encoder``, ``unet``, ``vae_decoder``, ``dino``, ``dino_ads`` and ``ads_check`` when
   exported) and configuration (:data:`glad_runtime.engines.mix.CHOICES`: ONNX Runtime fp32, OpenVINO f32, OpenVINO
   bf16 where the CPU has it): one call at each batch size, the configurations interleaved within each repeat
   (:mod:`bench.interleave`: warm-up, median and spread per cell); achieved GFLOP/s (FLOPs from the graph,
   ``bench.flops``) against this CPU's peak from its microarchitecture at the clock measured while timing
   (``bench.cpu_peak``); the error against ONNX Runtime fp32 on the same inputs (max and mean |difference| relative
   to the output's max and mean |value|).
3. A configuration passes a graph's gate when max rel <= :data:`MAX_REL` and mean rel <= :data:`MEAN_REL` (the
   bf16 gates of ``tests/integration/test_openvino.py``); the fastest passing one (per-image median summed over the batch sizes)
   is written to ``BUNDLE/engines/cpu_mix.json`` (:func:`glad_runtime.engines.mix.write_plan`). ``ads_check`` is
   timed and planned for the record, but the mix (like ONNX Runtime and OpenVINO on the CPU) runs the check on the
   host: the table shows whether the fused graph would pay.
4. End to end with ADS on, against ONNX Runtime fp32: the mix (``--e2e-engines`` adds e.g. OpenVINO bf16), images/s
   at each batch size interleaved (median and spread, and the speed-up round by round), and, on the bundle's own
   calibration images when it has them (``calibration.json`` records their folder) or else ELPV cells: the share of
   images with the same adaptive step, the same SAFF trigger and the same label at the calibrated threshold, and
   the largest score difference.

``results.json`` / ``results.md`` go to ``--out``. Timings on a shared machine: the interleaving keeps ratios fair,
the spreads say how much the load moved them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["MAX_REL", "MEAN_REL", "cpu_peak_gflops", "ads_config", "select_mix", "end_to_end", "check_images",
           "main"]

#: per-graph gate: max |difference| relative to the reference output's max |value| ...
MAX_REL = 1e-1
#: ... and mean |difference| relative to its mean |value| (tests/integration/test_openvino.py's bf16 gates)
MEAN_REL = 4e-2


def cpu_peak_gflops(cores: int, ghz: float | None = None) -> dict:
    """This CPU's fp32 and bf16 peak (GFLOP/s) for ``cores`` cores from its microarchitecture
    (:func:`bench.cpu_peak.cpu_peak`; the clock measured now unless ``ghz`` is given)."""
    from bench.cpu_peak import cpu_peak

    return cpu_peak(cores, ghz=ghz)


def ads_config(bundle, ads: bool = True):
    """The bundle's config with ADS on when ``ads`` and the bundle can run it (the ADS feature graph exported:
    ``dino_ads`` when the check runs at another size than scoring), else the bundle's own config."""
    c = bundle.config
    if not ads or c.ads_enabled:
        return c
    can = c.ads_size == c.dino_resolution or bundle.file("onnx/dino_ads.onnx").is_file()
    return c.replace(ads_enabled=True) if can else c


def _rows(feeds: dict, n: int) -> dict:
    """``n`` samples of recorded feeds (repeating them when fewer were recorded)."""
    k = len(next(iter(feeds.values())))
    idx = np.arange(n) % k
    return {name: np.ascontiguousarray(v[idx]) for name, v in feeds.items()}


def _engines(bundle, choices: Sequence[str], threads: int, fused_check: bool = False) -> dict:
    from glad_runtime.engines.openvino import OpenVinoEngines
    from glad_runtime.engines.ort import OrtEngines

    out = {}
    for c in choices:
        backend, precision = c.split("-")
        try:
            out[c] = (OrtEngines(bundle, intra_op_threads=threads, fused_check=fused_check) if backend == "ort" else
                      OpenVinoEngines(bundle, precision=precision, num_threads=threads, fused_check=fused_check))
        except Exception as e:  # noqa: BLE001 (a configuration this CPU cannot run: reported, skipped)
            out[c] = e
    return out


class _CheckRecorder:
    """``RecordingEngines`` plus the fused check's inputs: ``ads_distance`` records them and returns None, so the
    pipeline still checks on the host (and ``vae_decoder`` / ``dino_ads`` are recorded as the loop calls them)."""

    def __init__(self, rec):
        self.rec = rec
        self.encode, self.unet, self.decode, self.features = rec.encode, rec.unet, rec.decode, rec.features

    def ads_distance(self, pred_original_sample, input_anchored, config):
        self.rec._keep("ads_check", pred_original_sample=np.asarray(pred_original_sample, np.float32),
                       input_anchored=np.asarray(input_anchored, np.float32))
        return None


def _outputs(engines, graph: str) -> list[str]:
    """The output names the Engines calls ask a graph for."""
    return {"vae_encoder": ["latents"], "unet": ["noise_pred"], "vae_decoder": ["images"],
            "ads_check": ["distance"]}.get(graph) or list(engines._token_names)


def select_mix(bundle, images: np.ndarray, *, choices: Sequence[str] | None = None, batches: Sequence[int] = (1, 8),
               repeats: int = 5, threads: int = 0, write: bool = True, ads: bool = True,
               progress=print) -> dict:
    """Steps 1-3 of the module docstring on preprocessed ``images`` ``[N, 3, R, R]``; returns the per-graph table
    and the plan (written to the bundle when ``write``)."""
    from bench.cpu_peak import measure_clock_ghz, peak_gflops
    from bench.flops import graph_flops
    from bench.interleave import interleave
    from calib.quantize import RecordingEngines
    from glad_runtime.core.cpus import threads_for
    from glad_runtime.engines.mix import CHOICES, write_plan
    from glad_runtime.pipeline.batch import GladPipeline

    say = progress or (lambda *a, **k: None)
    config = ads_config(bundle, ads)
    choices = list(choices or CHOICES)
    has_check = bundle.file("onnx/ads_check.onnx").is_file() and config.ads_enabled
    engines = _engines(bundle, choices, threads, fused_check=has_check)
    ref = engines["ort-fp32"]
    rec = RecordingEngines(ref, config)
    GladPipeline(_CheckRecorder(rec) if has_check else rec, config)(images)
    cores = threads_for(1, threads)  # the cores the engines run on
    clocks = [measure_clock_ghz(cores)]
    table: dict = {}
    for graph, calls in rec.calls.items():
        if not bundle.file(f"onnx/{graph}.onnx").is_file():
            continue
        feeds = {name: np.concatenate([c[name] for c in calls]) for name in calls[0]}
        outputs = _outputs(ref, graph)
        flops = graph_flops(bundle.file(f"onnx/{graph}.onnx"))
        runnable = {c: e for c, e in engines.items() if not isinstance(e, Exception)
                    and graph in getattr(e, "graphs", [graph])}
        row: dict = {c: {"skipped": f"{type(e).__name__}: {e}"} for c, e in engines.items()
                     if isinstance(e, Exception)}
        row.update({c: {"skipped": f"{graph} not loaded"} for c, e in engines.items()
                    if not isinstance(e, Exception) and c not in runnable})
        for c in runnable:
            row[c] = {"s_per_image": {}, "spread": {}, "gflops": {}}
        for b in batches:
            f = _rows(feeds, b)
            res = interleave({c: (lambda e=e, f=f, g=graph, o=outputs: e._run_graph(g, f, o))
                              for c, e in runnable.items()}, repeats, warmup=1)
            for c, cell in res["cells"].items():
                row[c]["s_per_image"][str(b)] = cell["median"] / b
                row[c]["spread"][str(b)] = cell["spread"]
                row[c]["gflops"][str(b)] = flops * b / cell["median"] / 1e9
        clocks.append(measure_clock_ghz(cores))
        f = _rows(feeds, max(batches))
        want = ref._run_graph(graph, f, outputs)
        for c, e in runnable.items():
            got = e._run_graph(graph, f, outputs)
            r = row[c]
            r["max_rel"] = max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)) for g, w in zip(got, want))
            r["mean_rel"] = max(float(np.abs(g - w).mean() / max(np.abs(w).mean(), 1e-12)) for g, w in zip(got, want))
            r["passes"] = r["max_rel"] <= MAX_REL and r["mean_rel"] <= MEAN_REL
            r["cost"] = sum(r["s_per_image"].values())
        passing = {c: r for c, r in row.items() if r.get("passes")}
        choice = min(passing, key=lambda c: passing[c]["cost"]) if passing else "ort-fp32"
        table[graph] = {"choice": choice, "gflop_per_image": flops / 1e9, "samples": len(next(iter(feeds.values()))),
                        "configs": row}
        say(f"{graph}: " + ", ".join(f"{c} {1e3 * r['s_per_image'][str(batches[0])]:.1f} ms" for c, r in row.items()
                                     if "s_per_image" in r) + f" at batch {batches[0]} -> {choice}", flush=True)
    ghz = float(np.median([c["ghz"] for c in clocks]))
    peak = cpu_peak_gflops(cores, ghz=ghz)
    peak.update(clock_source=clocks[0]["source"] + f", measured {len(clocks)} times while timing (median; "
                f"{min(c['ghz'] for c in clocks):.2f}-{max(c['ghz'] for c in clocks):.2f} GHz)",
                clock_ghz_seen=[c["ghz"] for c in clocks])
    for t in table.values():
        for c, r in t["configs"].items():
            if "gflops" in r:
                p = peak_gflops(peak["arch"], cores, ghz)["bf16" if c.endswith("bf16") else "fp32"]
                r["of_peak"] = {b: g / p for b, g in r["gflops"].items()}
    plan = {g: {"choice": t["choice"], "s_per_image": t["configs"][t["choice"]]["s_per_image"]}
            for g, t in table.items()}
    res = {"bundle": str(bundle.path), "ads_enabled": config.ads_enabled, "batches": list(batches),
           "repeats": repeats, "timing": "interleaved (bench.interleave): configurations alternate within each "
                                       "repeat after one warm-up round; medians, spread = (max - min) / median",
           "peak_gflops": peak, "graphs": table, "plan": plan}
    if write:
        import openvino

        res["plan_file"] = write_plan(bundle, plan, openvino=openvino.get_version(), ads_enabled=config.ads_enabled)
    return res


def check_images(bundle, count: int) -> tuple[np.ndarray, list[str], str]:
    """``(images, names, where)``: the bundle's own calibration images (the folder its ``calibration.json``
    records as ``normal_dir``) when it has them, else ELPV cells (``bench.run.load_bench_images``)."""
    from bench.run import load_bench_images
    from glad_runtime.core.images import list_images

    cal = None
    try:
        cal = bundle.calibration()
    except Exception:  # noqa: BLE001 (an unreadable calibration: fall back to ELPV, said in `where`)
        pass
    folder = (cal.params or {}).get("normal_dir") if cal is not None else None
    if folder and Path(folder).is_dir():
        paths = list_images([Path(folder)])[:count]
        if paths:
            imgs, names = load_bench_images(bundle.config, paths, count)
            return imgs, names, f"the bundle's calibration images ({folder}, {len(paths)})"
    imgs, names = load_bench_images(bundle.config, count=count)
    return imgs, names, f"ELPV mono cells ({len(imgs)}, half defective; the bundle records no calibration images)"


def end_to_end(bundle, images: np.ndarray, batches: Sequence[int] = (1, 8), repeats: int = 7, threads: int = 0,
               check: np.ndarray | None = None, check_where: str = "", ads: bool = True,
               engines: Sequence[str] = ("ort-fp32", "mix"), progress=print) -> dict:
    """Step 4: ``{"engines": {name: {batch: cell_stats of images/s}}, "speedup": {name: {batch: paired ratio}},
    "check": {name: {"same_adaptive_step", "same_saff_trigger", "same_label", "max_score_rel", ...}}, ...}``;
    ``images`` are timed, ``check`` (default ``images``) compared."""
    from bench.interleave import interleave, paired_ratio
    from glad_runtime.engines.mix import MixedEngines
    from glad_runtime.engines.openvino import OpenVinoEngines
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.pipeline.batch import GladPipeline

    say = progress or (lambda *a, **k: None)
    config = ads_config(bundle, ads)
    make = {"ort-fp32": lambda: OrtEngines(bundle, intra_op_threads=threads),
            "mix": lambda: MixedEngines(bundle, threads=threads),
            "openvino-bf16": lambda: OpenVinoEngines(bundle, precision="bf16", num_threads=threads),
            "openvino-f32": lambda: OpenVinoEngines(bundle, precision="f32", num_threads=threads)}
    pipes, skipped = {}, {}
    for name in engines:
        try:
            pipes[name] = GladPipeline(make[name](), config)
        except Exception as e:  # noqa: BLE001 (e.g. bf16 on a CPU without it: reported)
            skipped[name] = f"{type(e).__name__}: {e}"
    check = images if check is None else check
    cal = None
    try:
        cal = bundle.calibration()
    except Exception:  # noqa: BLE001
        pass
    results = {}
    for name, pipe in pipes.items():
        outs = [pipe(check[s:s + 8]) for s in range(0, len(check), 8)]
        results[name] = {k: np.concatenate([getattr(o, k) for o in outs])
                         for k in ("scores", "adaptive_steps", "saff_triggered")}
    a = results["ort-fp32"]
    if cal is not None:
        threshold, t_from = float(cal.image_threshold), "calibration.json image_threshold"
    else:
        threshold, t_from = float(np.median(a["scores"])), "median ORT fp32 score (no calibration.json)"
    out: dict = {"ads_enabled": config.ads_enabled, "timed_images": int(len(images)), "repeats": repeats,
                 "check_images": int(len(check)),
                 "check_from": check_where, "threshold": threshold, "threshold_from": t_from,
                 "engines": {}, "speedup": {}, "check": {}, "skipped": skipped,
                 "ref_adaptive_steps": {str(k): int(v) for k, v in zip(*np.unique(a["adaptive_steps"],
                                                                                   return_counts=True))},
                 "ref_saff_triggered": int(a["saff_triggered"].sum())}
    for name, r in results.items():
        out["check"][name] = {
            "same_adaptive_step": float(np.mean(a["adaptive_steps"] == r["adaptive_steps"])),
            "same_saff_trigger": float(np.mean(a["saff_triggered"] == r["saff_triggered"])),
            "same_label": float(np.mean((a["scores"] > threshold) == (r["scores"] > threshold))),
            "max_score_rel": float(np.abs(a["scores"] - r["scores"]).max() / np.abs(a["scores"]).max())}
    for b in batches:
        def runner(pipe, b=b):
            return lambda: [pipe(images[s:s + b]) for s in range(0, len(images), b)]

        res = interleave({name: runner(p) for name, p in pipes.items()}, repeats, warmup=1)
        for name, cell in res["cells"].items():
            rates = sorted(len(images) / v for v in cell["values"])
            out["engines"].setdefault(name, {})[str(b)] = {
                "images_per_s": len(images) / cell["median"], "min": rates[0], "max": rates[-1],
                "spread": cell["spread"], "n": cell["n"]}
        for name in pipes:
            if name != "ort-fp32":
                pr = paired_ratio(res, "ort-fp32", name)
                out["speedup"].setdefault(name, {})[str(b)] = {k: pr[k] for k in ("median", "min", "max",
                                                                                  "of_medians")}
        say(f"batch {b}: " + ", ".join(f"{n} {out['engines'][n][str(b)]['images_per_s']:.2f} img/s" for n in pipes),
            flush=True)
    return out


def write_outputs(res: dict, out: Path) -> Path:
    from bench.cpu_peak import peak_line

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    peak = res["peak_gflops"]
    bs = res["batches"]
    lines = [peak_line(peak), "",
             f"Per graph, ADS {'on' if res.get('ads_enabled') else 'off'}: ms per image, median (min-max) of "
             f"{res['repeats']} interleaved repeats; achieved GFLOP/s and its share of the peak of the "
             "configuration's precision.", "",
             "| graph | config | " + " | ".join(f"ms/image b{b} (spread)" for b in bs) + " | "
             + " | ".join(f"GFLOP/s b{b} (of peak)" for b in bs) + " | max rel | mean rel | gate | chosen |",
             "|---|---|" + "---|" * (2 * len(bs) + 4)]
    for g, t in res["graphs"].items():
        for c, r in t["configs"].items():
            if "skipped" in r:
                lines.append(f"| {g} | {c} | skipped: {r['skipped'][:80]} |")
                continue
            ms = " | ".join(f"{1e3 * r['s_per_image'][str(b)]:.1f} ({100 * r['spread'][str(b)]:.0f}%)" for b in bs)
            gf = " | ".join(f"{r['gflops'][str(b)]:.0f} ({100 * r['of_peak'][str(b)]:.0f}%)" for b in bs)
            lines.append(f"| {g} | {c} | {ms} | {gf} | {r['max_rel']:.1e} | {r['mean_rel']:.1e} | "
                         f"{'pass' if r['passes'] else 'FAIL'} | {'**yes**' if c == t['choice'] else ''} |")
    if "ads_check" in res["graphs"]:
        lines += ["", "`ads_check` (the fused check) is timed for the record; the mix checks on the host (decoder and "
                      "ADS features as chosen above)."]
    e2e = res.get("end_to_end")
    if e2e:
        lines += ["", f"End to end, ADS {'on' if e2e['ads_enabled'] else 'off'}, {e2e['timed_images']} images per "
                      f"pass, engines interleaved ({e2e.get('repeats', '?')} rounds after a warm-up): images/s median "
                      f"(min-max), and the speed-up over ONNX Runtime fp32: median of the per-round ratios "
                      f"(min-max; the ratio of the medians).", "",
                  "| engine | " + " | ".join(f"images/s b{b}" for b in bs) + " | "
                  + " | ".join(f"x ort-fp32 b{b}" for b in bs) + " |", "|---|" + "---|" * (2 * len(bs))]
        for name, cells in e2e["engines"].items():
            sp = e2e["speedup"].get(name)
            lines.append(f"| {name} | " + " | ".join(
                f"{cells[str(b)]['images_per_s']:.3f} ({cells[str(b)]['min']:.3f}-{cells[str(b)]['max']:.3f})"
                for b in bs) + " | " + " | ".join(
                (f"{sp[str(b)]['median']:.2f}x ({sp[str(b)]['min']:.2f}-{sp[str(b)]['max']:.2f}; "
                 f"{sp[str(b)]['of_medians']:.2f}x)" if sp else "1")
                for b in bs) + " |")
        lines += ["", f"Against ONNX Runtime fp32 on {e2e['check_images']} images ({e2e['check_from']}); threshold "
                      f"{e2e['threshold']:.4g} ({e2e['threshold_from']}); reference: adaptive steps "
                      f"{e2e['ref_adaptive_steps']}, {e2e['ref_saff_triggered']} SAFF triggers.", "",
                  "| engine | same adaptive step | same SAFF trigger | same label | max score diff (rel.) |",
                  "|---|---|---|---|---|"]
        for name, c in e2e["check"].items():
            lines.append(f"| {name} | {c['same_adaptive_step']:.1%} | {c['same_saff_trigger']:.1%} | "
                         f"{c['same_label']:.1%} | {c['max_score_rel']:.1e} |")
        for name, why in e2e.get("skipped", {}).items():
            lines.append(f"\n{name} skipped: {why[:200]}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.md"


def main(argv: Sequence[str] | None = None) -> None:
    from bench.run import load_bench_images
    from glad_runtime.core.bundle import Bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--images", type=int, default=8, help="ELPV cells recorded and timed")
    ap.add_argument("--check-images", type=int, default=40, help="images of the end-to-end comparison")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per graph and batch size")
    ap.add_argument("--e2e-repeats", type=int, default=7, help="interleaved end-to-end repeats")
    ap.add_argument("--e2e-engines", default="ort-fp32,mix",
                    help="engines of the end-to-end run (ort-fp32 first; also openvino-bf16, openvino-f32): the "
                         "fewer, the closer in time each round's passes, the fairer the per-round ratio")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-ads", dest="ads", action="store_false", help="keep the bundle's ADS setting")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/cpu_mix"))
    a = ap.parse_args(argv)
    b = Bundle(a.bundle)
    batches = [int(x) for x in a.batches.split(",")]
    imgs, _ = load_bench_images(b.config, count=a.images)
    res = select_mix(b, imgs, batches=batches, repeats=a.repeats, threads=a.threads, ads=a.ads)
    print(json.dumps({g: p["choice"] for g, p in res["plan"].items()}), flush=True)
    check, _, where = check_images(b, a.check_images)
    res["end_to_end"] = end_to_end(b, imgs, batches, repeats=a.e2e_repeats, threads=a.threads, check=check,
                                   check_where=where, ads=a.ads, engines=a.e2e_engines.split(","))
    print(write_outputs(res, a.out).read_text())


if __name__ == "__main__":
    main()
