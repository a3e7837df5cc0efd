"""The ADS check-cost controls, each measured for detection quality and throughput in one run (step-scheduler issue).

    python -m bench.check_cost --case runs/elpv_tiny:runs/elpv_mono --case runs/grass_tiny:runs/textures/grass \\
        [--out runs/check-cost] [--stream-images 32] [--pool 8]

For each ``BUNDLE:DATA`` case, ADS on (``tau`` from the normal training images, see :func:`auto_tau`), and each
setting of :data:`SETTINGS`:

* quality on ``DATA/test`` (``training.evaluate``, ONNX Runtime fp32, batch 8): I-AUROC, I-AP, and with masks
  P-AUROC and AUPRO; the adaptive-step histogram;
* throughput on a mixed stream of ``--stream-images`` test images (half good, half defective) served three ways
  (``bench.run.run_stream_bench``): per batch with the official check cost, per batch (this project's pipeline), and
  the step scheduler.

Settings that change a graph (the ADS check at a lower resolution needs a ``dino_ads`` graph at that size) run on a
variant bundle exported next to the output (same weights, fp32 graphs), with ``tau`` derived again the same way
(the check's score scale changes with its resolution). Writes ``check_cost.json`` and
``check_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

#: name -> config overrides (ADS on for all). "official" is the reference behaviour.
SETTINGS: dict[str, dict] = {
    "official (check every step)": {},
    "check every 2nd step": {"ads_check_every": 2},
    "check every 3rd step": {"ads_check_every": 3},
    "check at half resolution": {"ads_resolution": "half"},
    "reuse last-step decode": {"ads_reuse_final_decode": True},
    "every 2nd step + reuse": {"ads_check_every": 2, "ads_reuse_final_decode": True},
}


def auto_tau(engines, config, data: Path, count: int = 16, quantile: float = 0.95) -> float:
    """ADS ``tau`` from normal images only: the ``quantile`` of the first check's score over ``count`` images of
    ``DATA/train/good`` (probed with ``min_step`` above ``t_max``, which decides every image at its first check)."""
    from glad_runtime.core.images import even_subset
    from glad_runtime.detector import Detector
    from training.data import MVTecCategory

    paths = MVTecCategory(data).train_images()
    paths = [paths[i] for i in even_subset(paths, count)]
    probe = Detector(engines, config.replace(ads_enabled=True, min_step=1000, tau=1e9))
    scores = np.array([d.ads_score for d in probe.score_files(paths, batch_size=8)], np.float64)
    return float(np.quantile(scores, quantile))


def variant_bundle(src, dst: Path, **overrides):
    """A copy of bundle ``src`` with config ``overrides`` and its graphs re-exported (fp32), for settings whose
    graphs differ (``ads_resolution``). Reused when it exists with the same config."""
    from export.models import load_bundle_modules, save_bundle_modules
    from export.onnx_export import export_bundle
    from glad_runtime.core.bundle import Bundle

    cfg = src.config.replace(**overrides)
    if (dst / "onnx" / "export.json").exists() and Bundle(dst).config == cfg:
        return Bundle(dst)
    modules = load_bundle_modules(src)
    b = Bundle.create(dst, cfg)
    save_bundle_modules(modules, b)
    export_bundle(b, modules, precisions=["fp32"])
    return b


def _stream_images(data: Path, config, n: int) -> np.ndarray:
    from glad_runtime.core.images import Preprocessor
    from training.data import MVTecCategory

    paths, labels, _ = MVTecCategory(data).test_images()
    good = [p for p, y in zip(paths, labels) if y == 0]
    bad = [p for p, y in zip(paths, labels) if y == 1]
    pick = [x for pair in zip(good[: n // 2], bad[: n - n // 2]) for x in pair]  # alternating good / defective
    return np.concatenate(list(Preprocessor.from_config(config).batches(pick, 16)))


def run_case(bundle_dir: Path, data: Path, out: Path, *, stream_images: int, pool: int, max_test: int = 0,
             settings: list[str] | None = None, say=print) -> dict:
    from bench.run import run_stream_bench
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.engines import load_engines
    from glad_runtime.detector import Detector
    from glad_runtime.pipeline.batch import GladPipeline
    from training.evaluate import evaluate

    src = Bundle(bundle_dir)
    engines = load_engines(src, "ort", precision="fp32", max_batch=64)
    tau = auto_tau(engines, src.config, data)
    base = src.config.replace(ads_enabled=True, tau=tau)
    say(f"{bundle_dir.name}: ADS tau {tau:.4f} (q95 of first-check scores on normal training images), "
        f"min_step {base.min_step}, timesteps {GladPipeline(engines, base).schedule.timesteps.tolist()}")
    images = _stream_images(data, base, stream_images)
    rows = {}
    for name, overrides in SETTINGS.items():
        if settings and name not in settings:
            continue
        over = dict(overrides)
        eng, cfg = engines, base
        if over.get("ads_resolution") == "half":
            p = base.patch_size
            over["ads_resolution"] = max(p, (base.ads_size // 2) // p * p)
            vb = variant_bundle(src, out / f"{bundle_dir.name}-ads{over['ads_resolution']}",
                                ads_resolution=over["ads_resolution"])
            eng = load_engines(vb, "ort", precision="fp32", max_batch=64)
            # the check's score scale changes with its resolution: tau is derived again, the same way
            over["tau"] = auto_tau(eng, vb.config.replace(tau=base.tau), data)
        cfg = base.replace(**over)
        say(f"  {name}: {over}")
        t0 = time.perf_counter()
        q = evaluate(Detector(eng, cfg), data, out / f"{bundle_dir.name}-{len(rows)}", baseline=None,
                     max_test=max_test, progress=False, log=lambda m: None)["glad"]
        eval_s = time.perf_counter() - t0
        s = run_stream_bench(None, "ort-fp32", images, pool=pool, engines=eng, config=cfg,
                             modes=("per_batch_official", "per_batch", "scheduler"))
        m = s["modes"]
        rows[name] = {"overrides": over, "quality": q, "eval_s": eval_s, "stream": m}
        say(f"    I-AUROC {q['I-AUROC']:.4f}" + (f", P-AUROC {q['P-AUROC']:.4f}, AUPRO {q['AUPRO']:.4f}"
                                                  if "P-AUROC" in q else "")
            + f"; img/s official batch {m['per_batch_official']['images_per_s']:.2f}, batch "
              f"{m['per_batch']['images_per_s']:.2f}, scheduler {m['scheduler']['images_per_s']:.2f}; steps "
              f"{q.get('adaptive_step_hist')}")
    return {"bundle": str(bundle_dir), "data": str(data), "tau": tau, "min_step": base.min_step, "rows": rows}


def markdown(results: list[dict]) -> str:
    lines = []
    for case in results:
        lines += [f"### {Path(case['bundle']).name} on {case['data']} (tau {case['tau']:.4f})", "",
                  "| setting | I-AUROC | P-AUROC | AUPRO | img/s per batch (official checks) | img/s per batch | "
                  "img/s scheduler | scheduler / per batch | scheduler / official | adaptive steps |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in case["rows"].items():
            q, m = r["quality"], r["stream"]
            off, pb, sc = (m[k]["images_per_s"] for k in ("per_batch_official", "per_batch", "scheduler"))
            fmt = lambda k: f"{q[k]:.4f}" if k in q else "-"  # noqa: E731
            lines.append(f"| {name} | {fmt('I-AUROC')} | {fmt('P-AUROC')} | {fmt('AUPRO')} | {off:.2f} | {pb:.2f} | "
                         f"{sc:.2f} | {sc / pb:.2f}x | {sc / off:.2f}x | {q.get('adaptive_step_hist')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="BUNDLE:DATA (repeatable)")
    ap.add_argument("--out", type=Path, default=Path("runs/check-cost"))
    ap.add_argument("--stream-images", type=int, default=32)
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--max-test", type=int, default=0, help="evaluate at most this many test images (0 = all)")
    ap.add_argument("--setting", action="append", choices=list(SETTINGS), help="run only these settings")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.case:
        bundle, _, data = case.partition(":")
        results.append(run_case(Path(bundle), Path(data), args.out, stream_images=args.stream_images,
                                pool=args.pool, max_test=args.max_test,
                                settings=args.setting))
        (args.out / "check_cost.json").write_text(json.dumps(results, indent=2, default=float))
    (args.out / "check_cost.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
