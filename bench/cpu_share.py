"""Throughput when another process takes one core (issue 19, item 3): ONNX Runtime engines in process, threads from
the cores this process may use (:mod:`glad_runtime.core.cpus`), idle threads spinning (ONNX Runtime's default) or
sleeping (ours), on an idle machine and with one core kept busy by another process (a Python busy loop).

    python -m bench.cpu_share BUNDLE [--batches 1,8] [--images 8] [--out runs/bench/cpu_share]

Reported per configuration and batch size: images/s (median of ``--repeats`` runs over ``--images`` real ELPV
cells) and the fall under the busy core; ``results.json`` and ``results.md`` go to ``--out``. Run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["measure", "main"]


def _throughput(pipeline, images: np.ndarray, batch: int, repeats: int) -> float:
    pipeline(images[:batch])  # warm-up at this batch size
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for s in range(0, len(images), batch):
            pipeline(images[s:s + batch])
        rates.append(len(images) / (time.perf_counter() - t))
    return statistics.median(rates)


def measure(bundle, batches: Sequence[int] = (1, 8), images: int = 8, repeats: int = 3) -> dict:
    """``{"cores", "rows": [{"spinning", "busy_core", "batch", "images_per_s"}], "fall": {...}}``."""
    from bench.run import load_bench_images
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.cpus import usable_cores
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.pipeline.batch import GladPipeline

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    imgs, _ = load_bench_images(b.config, count=images)
    rows = []
    for spinning in (True, False):
        pipeline = GladPipeline(OrtEngines(b, spinning=spinning), b.config)
        for busy in (False, True):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                time.sleep(0.5 if busy else 0)
                for batch in batches:
                    rows.append({"spinning": spinning, "busy_core": busy, "batch": batch,
                                 "images_per_s": _throughput(pipeline, imgs, batch, repeats)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    fall = {}
    for spinning in (True, False):
        for batch in batches:
            idle, busy = (next(r["images_per_s"] for r in rows if r["spinning"] == spinning and r["batch"] == batch
                               and r["busy_core"] == k) for k in (False, True))
            fall[f"{'spinning' if spinning else 'sleeping'} batch {batch}"] = 1 - busy / idle
    return {"bundle": str(b.path), "cores": usable_cores(), "images": images, "repeats": repeats, "rows": rows,
            "fall": fall}


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
    lines = [f"{res['cores']} usable cores; one taken by a busy loop = {share:.0%} of them.", "",
             "| threads | batch | idle images/s | one core busy images/s | fall |", "|---|---|---|---|---|"]
    for spinning in (True, False):
        for batch in sorted({r["batch"] for r in res["rows"]}):
            idle, busy = (next(r["images_per_s"] for r in res["rows"] if r["spinning"] == spinning
                               and r["batch"] == batch and r["busy_core"] == k) for k in (False, True))
            lines.append(f"| {'spinning' if spinning else 'sleeping'} | {batch} | {idle:.3f} | {busy:.3f} | "
                         f"{1 - busy / idle:.0%} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
