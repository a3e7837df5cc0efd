"""Full-size export figures: the ``sd14-dino-vitb8`` architecture (random weights) exported on CPU, loaded in ONNX
Runtime and run once per graph. Each graph runs in its own subprocess so peak memory is per graph.

    python -m bench.export_full [--workdir runs/bench-export-full] [--precision fp32 --precision fp16]

Writes ``<workdir>/export_full.json`` and prints a table: export seconds, file size, peak RSS of the export
process, ONNX Runtime session load and one-call latency (batch 1, CPU), and the max relative error against torch
on real images. Kept out of the test suite: it takes minutes and about 15 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

GRAPHS = ("unet", "vae_encoder", "vae_decoder", "dino")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_one(workdir: Path, graph: str, precisions: list[str], opset: int) -> dict:
    """Export one graph of a random-init sd14 bundle and time one ONNX Runtime call (runs in a child process)."""
    import numpy as np

    from export.models import build_sd14_modules
    from export.onnx_export import example_inputs, export_bundle
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.config import get_preset
    from glad_runtime.engines.ort import session_options

    cfg = get_preset("sd14-dino-vitb8")
    t0 = time.perf_counter()
    modules = build_sd14_modules(cfg, random_init=True)
    build_s = time.perf_counter() - t0
    path = workdir / f"bundle-{graph}"
    bundle = Bundle.create(path, cfg)
    reports = export_bundle(bundle, modules, opset=opset, precisions=precisions, graphs=[graph])
    export_peak = _peak_rss_gb()
    feeds = {k: v[:1] for k, v in example_inputs(modules, cfg)[graph].items()}
    del modules
    import onnxruntime as ort

    out = {"graph": graph, "build_modules_s": round(build_s, 1), "export_peak_rss_gb": round(export_peak, 2),
           "precisions": {}}
    for r in reports:
        t1 = time.perf_counter()
        sess = ort.InferenceSession(str(bundle.file(r.file)), session_options(), providers=["CPUExecutionProvider"])
        load_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        res = sess.run(None, feeds)
        run_s = time.perf_counter() - t2
        out["precisions"][r.precision] = {
            "file": r.file, "bytes": r.bytes, "export_s": r.export_s, "max_abs_err": r.max_abs_err,
            "max_rel_err": r.max_rel_err, "ort_load_s": round(load_s, 1), "ort_call_batch1_s": round(run_s, 2),
            "finite": bool(all(np.isfinite(x).all() for x in res)), "inputs": r.inputs, "outputs": r.outputs}
        del sess
    out["peak_rss_gb"] = round(_peak_rss_gb(), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-export-full"))
    ap.add_argument("--precision", action="append", choices=["fp32", "fp16"])
    ap.add_argument("--graph", action="append", choices=GRAPHS)
    ap.add_argument("--opset", type=int, default=21)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    precisions = args.precision or ["fp32"]
    graphs = args.graph or list(GRAPHS)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(run_one(args.workdir, graphs[0], precisions, args.opset)))
        return 0
    results = []
    for g in graphs:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "bench.export_full", "--child", "--graph", g, "--workdir", str(args.workdir),
               "--opset", str(args.opset)] + [x for p in precisions for x in ("--precision", p)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            why = "killed (out of memory?)" if proc.returncode < 0 else f"exit code {proc.returncode}"
            print(f"{g}: FAILED, {why}\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append({"graph": g, "error": f"{why}: {proc.stderr[-2000:]}", "wall_s": round(time.perf_counter() - t0, 1)})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        for prec, r in res["precisions"].items():
            print(f"{g:<12} {prec:<5} {r['bytes'] / 1e9:6.2f} GB  export {r['export_s']:7.1f} s  peak "
                  f"{res['export_peak_rss_gb']:5.1f} GB  ORT load {r['ort_load_s']:5.1f} s  call {r['ort_call_batch1_s']:6.2f} s"
                  f"  rel err {r['max_rel_err']:.1e}", flush=True)
    (args.workdir / "export_full.json").write_text(json.dumps(results, indent=2))
    print(f"written {args.workdir / 'export_full.json'}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
