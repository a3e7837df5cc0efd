"""Per-image latency of GLAD in process (ONNX Runtime) vs served by a real tritonserver (client-side loop through the
Triton engine, and the server-side BLS loop), on the same real ELPV solar cells and the same exported bundle.

    PYTHONPATH=. python bench/serving_latency.py [--bundle EXPORTED_BUNDLE] [--images 4] [--repeats 3]

Without ``--bundle`` a tiny bundle (random init, ADS on as in the tests) is created and exported (fp32) in a
temporary folder. The server runs on this machine (CPU python-backend models, 1 ORT thread per instance), so client
and server share the cores. Reported: median seconds per image at batch 1 (latency: one image per call) and at
batch ``--images`` (one call for all images, divided by their count), with the scores' max difference to in-process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glad_runtime.core.bundle import Bundle  # noqa: E402
from glad_runtime.core.images import Preprocessor  # noqa: E402
from glad_runtime.pipeline.batch import GladPipeline  # noqa: E402


def _tiny_bundle(folder: Path) -> Bundle:
    from export.models import build_tiny_modules, save_bundle_modules
    from export.onnx_export import export_bundle
    from glad_runtime.core.config import get_preset

    modules = build_tiny_modules(get_preset("tiny"), seed=0, features="random")
    b = Bundle.create(folder / "tiny", get_preset("tiny", ads_enabled=True, tau=0.02, min_step=150))
    save_bundle_modules(modules, b)
    export_bundle(b, modules, precisions=("fp32",))
    return b


def _elpv(n: int) -> list[np.ndarray]:
    from elpv_dataset.utils import load_dataset

    images, probs, types = load_dataset()
    idx = np.where(types == "mono")[0][:n]
    return [images[i] for i in idx]


def _median_per_image(fn, items: list, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for item in items:
            t = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="an exported bundle (default: a tiny one made in a temp folder)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    from glad_runtime.serving.client import GladClient
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.engines.triton import TritonEngines, default_model_prefix
    from triton_models.repository import generate_repository
    from triton_models.server import launch_server

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b = Bundle(args.bundle) if args.bundle else _tiny_bundle(tmp)
        cfg = b.config
        raw = _elpv(args.images)
        pre = Preprocessor.from_config(cfg)
        batch = np.stack([pre(i.astype(np.float32) / np.float32(255.0)) for i in raw])
        singles = [batch[k:k + 1] for k in range(len(batch))]
        prefix = default_model_prefix(b)
        generate_repository(b, tmp / "repo", max_batch=max(4, args.images))
        t0 = time.perf_counter()
        server = launch_server(tmp / "repo")
        startup = time.perf_counter() - t0
        results = {}
        try:
            ort_pipe = GladPipeline(OrtEngines(b), cfg)
            ort1_pipe = GladPipeline(OrtEngines(b, intra_op_threads=1), cfg)  # the server's setting
            ref = ort_pipe(batch)
            tri = TritonEngines(server.grpc_url, prefix, cfg, checksum=b.checksum())
            tri_pipe = GladPipeline(tri, cfg)
            client = GladClient(server.grpc_url, prefix, timeout=300)
            modes = {
                "in-process ORT (default threads)": lambda x: ort_pipe(x).scores,
                "in-process ORT (1 intra-op thread)": lambda x: ort1_pipe(x).scores,
                "Triton engine (client-side loop)": lambda x: tri_pipe(x).scores,
                "Triton BLS (server-side loop)": lambda x: np.array([d.score for d in client.detect(list(x))]),
            }
            for name, fn in modes.items():
                scores = fn(batch)  # warm-up, and the batch result
                diff = float(np.abs(np.asarray(scores) - ref.scores).max())
                lat = _median_per_image(fn, singles, args.repeats)
                thr = _median_per_image(fn, [batch], args.repeats) / len(batch)
                results[name] = {"s_per_image_batch1": round(lat, 4),
                                 f"s_per_image_batch{len(batch)}": round(thr, 4), "max_score_diff": diff}
            tri.close()
            client.close()
        finally:
            server.stop()
    info = {"bundle": str(args.bundle or "tiny (random init, ADS on)"), "preset": cfg.preset,
            "resolution": cfg.resolution, "steps": cfg.num_inference_steps, "ads": cfg.ads_enabled,
            "images": len(batch), "repeats": args.repeats, "server_startup_s": round(startup, 1), "results": results}
    print(f"{'mode':36s} {'s/img batch 1':>14s} {f's/img batch {len(batch)}':>14s} {'max |score diff|':>17s}")
    for name, r in results.items():
        vals = list(r.values())
        print(f"{name:36s} {vals[0]:14.4f} {vals[1]:14.4f} {vals[2]:17.2e}")
    print(f"server start-up {startup:.1f} s")
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
