"""TensorRT parity on a GPU machine, in one short run (the device check of the export issue).

    pip install -e .[export,tensorrt] && python -m bench.trt_parity [--workdir runs/trt-parity]

1. Two tiny bundles of the same architecture (random weights, seeds 0 and 1), exported to ONNX (fp32 + fp16).
2. `glad build` on bundle A, fp32 and fp16 (static batch 4), with timing cache; timed.
3. Per graph: TensorRT vs ONNX Runtime (CPU, fp32) on the export's real inputs: max relative error.
4. The whole ADS/SAFF loop on real images: TensorRT fp16 / fp32 vs ONNX Runtime fp32 (adaptive steps, scores).
5. Refit: bundle B's engines refitted from A's (``--refit-from``) vs ORT on B: max relative error, refit seconds.

Prints a table and writes ``<workdir>/trt_parity.json``. Needs a CUDA GPU, TensorRT 10 and polygraphy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _bundle(path: Path, seed: int):
    from export.models import build_tiny_modules, save_bundle_modules
    from export.onnx_export import export_bundle
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.config import get_preset

    cfg = get_preset("tiny", ads_enabled=True, tau=0.02, min_step=150)
    modules = build_tiny_modules(cfg, seed=seed, features="random")
    b = Bundle.create(path, cfg)
    save_bundle_modules(modules, b)
    export_bundle(b, modules)
    return b, modules


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs/trt-parity"))
    args = ap.parse_args(argv)
    from export.onnx_export import example_inputs
    from export.tensorrt_build import build_bundle
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.pipeline.batch import GladPipeline
    from glad_runtime.engines.trt import TensorRTEngines, current_gpu, tensorrt_version

    out: dict = {"gpu": current_gpu().__dict__, "tensorrt": tensorrt_version()}
    args.workdir.mkdir(parents=True, exist_ok=True)
    a, mods_a = _bundle(args.workdir / "a", 0)
    b, _ = _bundle(args.workdir / "b", 1)
    for prec in ("fp32", "fp16"):
        t0 = time.perf_counter()
        res = build_bundle(a, prec, batch=(1, 4, 8), progress=print)
        out[f"build_{prec}_s"] = round(time.perf_counter() - t0, 1)
        out[f"engines_{prec}"] = {r.graph: r.path.stat().st_size for r in res}
    feeds = example_inputs(mods_a, a.config)
    ort_a = OrtEngines(a)
    x = feeds["vae_encoder"]["images"]
    for prec in ("fp32", "fp16"):
        trt_a = TensorRTEngines(a, precision=prec)
        errs = {}
        for name, fn_t, fn_o, arg in (("vae_encoder", trt_a.encode, ort_a.encode, (x,)),
                                      ("vae_decoder", trt_a.decode, ort_a.decode, (feeds["vae_decoder"]["latents"],)),
                                      ("unet", trt_a.unet, ort_a.unet, (feeds["unet"]["latents"],
                                                                        feeds["unet"]["timesteps"])),
                                      ("dino", lambda i: trt_a.features(i)[0], lambda i: ort_a.features(i)[0],
                                       (feeds["dino"]["images"],))):
            t, o = fn_t(*arg), fn_o(*arg)
            errs[name] = float(np.abs(t - o).max() / np.abs(o).max())
        out[f"graph_rel_err_{prec}"] = errs
        ref = GladPipeline(ort_a, a.config)(x)
        t0 = time.perf_counter()
        got = GladPipeline(trt_a, a.config)(x)
        out[f"pipeline_{prec}"] = {
            "same_steps": bool(np.array_equal(ref.adaptive_steps, got.adaptive_steps)),
            "score_rel_err": float(np.abs(ref.scores - got.scores).max() / np.abs(ref.scores).max()),
            "seconds_per_image": (time.perf_counter() - t0) / len(x)}
        trt_a.close()
    t0 = time.perf_counter()
    build_bundle(b, "fp16", batch=(1, 4, 8), refit_from=a, progress=print)
    out["refit_fp16_s"] = round(time.perf_counter() - t0, 1)
    trt_b, ort_b = TensorRTEngines(b, precision="fp16"), OrtEngines(b)
    z = ort_b.encode(x)
    out["refit_unet_rel_err"] = float(np.abs(trt_b.unet(z, feeds["unet"]["timesteps"]) - ort_b.unet(
        z, feeds["unet"]["timesteps"])).max() / np.abs(ort_b.unet(z, feeds["unet"]["timesteps"])).max())
    (args.workdir / "trt_parity.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
