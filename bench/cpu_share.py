"""Throughput when another process takes one core (issue 19, item 3): ONNX Runtime engines in process, threads from
the cores this process may use (:mod:`glad_runtime.core.cpus`), idle threads spinning (ONNX Runtime's default) or
sleeping (ours), on an idle machine and with one core kept busy by another process (a Python busy loop).

    python -m bench.cpu_share BUNDLE [--batches 1,8] [--images 8] [--out runs/bench/cpu_share]

Reported per configuration and batch size: images/s (median and min-max of ``--repeats`` passes over ``--images``
real ELPV cells, the four settings interleaved within each repeat by ``bench.interleave``) and the fall under the
busy core (per repeat, median); ``results.json`` and ``results.md`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

__all__ = ["fall_per_round", "measure", "main"]


def fall_per_round(idle_seconds, busy_seconds) -> dict:
    """The throughput fall under the busy core, repeat by repeat: ``1 - (images/s busy) / (images/s idle)`` =
    ``1 - idle seconds / busy seconds`` of the same pass; ``bench.interleave.cell_stats`` of those."""
    from bench.interleave import cell_stats

    return cell_stats([1 - i / b for i, b in zip(idle_seconds, busy_seconds)])


_OPTIONS = (("spinning", "idle"), ("sleeping", "idle"), ("spinning", "busy"), ("sleeping", "busy"))


def measure(bundle, batches: Sequence[int] = (1, 8), images: int = 8, repeats: int = 3) -> dict:
    """``{"cores", "rows": [{"spinning", "busy_core", "batch", "images_per_s", "min", "max", "spread"}], "fall":
    {...}}``. Per batch size the four settings (spinning / sleeping threads, idle / one core busy) alternate within
    each repeat (``bench.interleave``, warm-up one request each); the busy loop runs only while a busy setting is
    timed, started (and given 0.5 s) before it and stopped before an idle one."""
    from bench.cpu_mix import ads_config
    from bench.interleave import interleave
    from bench.run import load_bench_images
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.cpus import usable_cores
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.pipeline.batch import GladPipeline

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    config = ads_config(b)  # ADS on where the bundle can run it (the tiny preset ships it off)
    imgs, _ = load_bench_images(config, count=images)
    pipes = {"spinning": GladPipeline(OrtEngines(b, spinning=True), config),
             "sleeping": GladPipeline(OrtEngines(b, spinning=False), config)}
    hog: list = [None]

    def set_load(name: str) -> None:
        busy = name.endswith("busy")
        if busy and hog[0] is None:
            hog[0] = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(0.5)
        elif not busy and hog[0] is not None:
            hog[0].kill()
            hog[0].wait()
            hog[0] = None

    rows, fall = [], {}
    try:
        for batch in batches:
            def one_pass(threads, batch=batch):
                def run():
                    for s in range(0, len(imgs), batch):
                        pipes[threads](imgs[s:s + batch])
                return run

            opts = {f"{t} {load}": one_pass(t) for t, load in _OPTIONS}
            res = interleave(opts, repeats, warmup=1, between=set_load,
                             warmups={f"{t} {load}": (lambda t=t, b=batch: pipes[t](imgs[:b])) for t, load in _OPTIONS})
            for t, load in _OPTIONS:
                cell = res["cells"][f"{t} {load}"]
                rates = sorted(len(imgs) / v for v in cell["values"])
                rows.append({"spinning": t == "spinning", "busy_core": load == "busy", "batch": batch,
                             "images_per_s": len(imgs) / cell["median"], "min": rates[0], "max": rates[-1],
                             "spread": cell["spread"], "round_images_per_s": [len(imgs) / v for v in cell["values"]]})
                print(json.dumps(rows[-1]), flush=True)
            for t in ("spinning", "sleeping"):
                per_round = fall_per_round(res["cells"][f"{t} idle"]["values"], res["cells"][f"{t} busy"]["values"])
                fall[f"{t} batch {batch}"] = per_round["median"]
                fall[f"{t} batch {batch} min-max"] = [per_round["min"], per_round["max"]]
            set_load("idle")
    finally:
        set_load("idle")
    return {"bundle": str(b.path), "ads_enabled": config.ads_enabled, "cores": usable_cores(), "images": images,
            "repeats": repeats, "rows": rows,
            "fall": fall, "timing": "interleaved (bench.interleave): the four settings alternate within each repeat; "
                                    "fall = median over repeats of 1 - busy / idle images/s of the same repeat"}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/cpu_share"))
    a = ap.parse_args(argv)
    res = measure(a.bundle, [int(x) for x in a.batches.split(",")], a.images, a.repeats)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=2))
    share = 1 / res["cores"]
    from bench.cpu_peak import identify, read_cpuinfo

    info = read_cpuinfo()
    cpu = f"{info.get('model_name', 'unknown CPU')} ({identify(info)[1]})" if info else "unknown CPU"
    lines = [f"{cpu}, ADS {'on' if res.get('ads_enabled') else 'off'}: {res['cores']} usable cores; one taken by a "
             f"busy loop = {share:.0%} of them. Medians of "
             f"{res['repeats']} interleaved repeats (min-max).", "",
             "| threads | batch | idle images/s | one core busy images/s | fall (min-max) |", "|---|---|---|---|---|"]
    for spinning in (True, False):
        for batch in sorted({r["batch"] for r in res["rows"]}):
            idle, busy = (next(r for r in res["rows"] if r["spinning"] == spinning and r["batch"] == batch
                               and r["busy_core"] == k) for k in (False, True))
            t = "spinning" if spinning else "sleeping"
            lo, hi = res["fall"][f"{t} batch {batch} min-max"]
            lines.append(f"| {t} | {batch} | {idle['images_per_s']:.3f} ({idle['min']:.3f}-{idle['max']:.3f}) | "
                         f"{busy['images_per_s']:.3f} ({busy['min']:.3f}-{busy['max']:.3f}) | "
                         f"{res['fall'][f'{t} batch {batch}']:.0%} ({lo:.0%}-{hi:.0%}) |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
