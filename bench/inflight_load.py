"""Latency under load: the per-batch model ``<prefix>_glad`` versus the in-flight model ``<prefix>_glad_inflight``
(issue 17), same server, same bundle, same open-loop arrival schedule, one run. A use of ``glad perf`` (issue 28):
the load, the measurement and the counts are :mod:`bench.perf`'s; this module only chooses the loads and keeps
its report.

    python -m bench.inflight_load BUNDLE [--loads 0.5,0.7,0.9] [--requests 120] [--clients 16] [--threads 0]
        [--overlap auto|on|off] [--out DIR]
    python -m bench.inflight_load --url HOST:GRPC_PORT --prefix P [--metrics-url URL] [...]

1. Without ``--url``: writes a model repository for the exported ``BUNDLE`` (``--max-batch`` images per ``_glad``
   request, the in-flight pool ``--max-active`` / ``--max-queue``) and starts a local ``tritonserver`` on it. With
   ``--url``: the running server's ``<prefix>_glad`` and ``<prefix>_glad_inflight`` (nothing is started).
2. **Capacity** of the per-batch model: ``glad perf`` closed loop at concurrency ``--clients``, single-image
   requests, ``--capacity-requests`` requests; images answered per second.
3. For each load (a fraction of that capacity): ``glad perf --compare`` of the two models, open loop at
   ``load * capacity`` requests/s, Poisson arrivals (fixed ``--seed``, the same schedule for both), ``--requests``
   single-image requests each, at most ``--clients`` outstanding (perf's ``--max-threads``); latency counts from the
   scheduled arrival to the answer, so requests waiting for a free sender count their wait. The two models
   alternate (per-batch first at even loads, in flight first at odd ones).
4. Per model and load: offered and achieved images/s, p50 / p95 / p99 / max latency, rejected requests (the
   in-flight pool's back-pressure), other errors, the largest score difference between the two models on the
   same images, and whether the tool's counts equal the server's statistics. ``results.json``, ``results.md``
   and ``latency_vs_load.png`` go to ``--out``, and ``glad perf``'s own reports to ``--out``/perf.

The images are real ELPV cells (``elpv-dataset``), half defective, sent as PNG files (``image_files``), as a line
would. Client and server share this machine's cores: read the ratios between the two models, run alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
from pathlib import Path
from typing import Sequence

__all__ = ["run_load_bench", "write_outputs", "main"]


def _summary(point: dict) -> dict:
    """One model at one load in this bench's report format (latencies in seconds)."""
    c = point["client"]
    lat = c["latency_us"]
    seconds = point["measured_seconds"]
    return {"requests": c["requests"], "answered": c["ok"] + c["errors"], "ok": c["ok"],
            "rejected": c["rejections"], "errors": c["errors"] - c["rejections"],
            "errors_by_type": c["errors_by_type"], "offered_per_s": point["load"],
            "achieved_per_s": c["images_ok"] / seconds if seconds > 0 else float("nan"),
            "latency_s": {q: lat[q] / 1e6 for q in ("p50", "p95", "p99")} if c["ok"] else {},
            "max_s": lat["max"] / 1e6, "counts_match": point["reconciliation"]["match"]}


def run_load_bench(bundle=None, out: Path = Path("runs/bench/inflight"), *, loads: Sequence[float] = (0.5, 0.7, 0.9),
                   requests: int = 120, clients: int = 16, seed: int = 0, max_batch: int = 8,
                   max_active: int | None = None, max_queue: int | None = None, capacity_requests: int = 64,
                   images: int = 16, timeout_s: float = 600.0, overlap: bool | None = None, glad_instances: int = 1,
                   threads: int = 0, url: str | None = None, prefix: str = "bench", metrics_url: str | None = "auto",
                   quiet: bool = False) -> dict:
    """Run the bench (module docstring) on an exported ``bundle`` (a local server) or the server at ``url``
    (gRPC, models ``<prefix>_glad`` / ``<prefix>_glad_inflight``); returns the results dict."""
    from bench.perf import load as L
    from bench.perf.run import run_points, write_reports

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"clients": clients, "requests": requests, "seed": seed, "loads": {}}
    with contextlib.ExitStack() as stack:
        if url is None:
            from glad_runtime.core.bundle import Bundle
            from triton_models.repository import generate_repository
            from triton_models.server import launch_server

            if bundle is None:
                raise SystemExit("give BUNDLE (a local server is started) or --url")
            b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
            repo = out / "models"
            shutil.rmtree(repo, ignore_errors=True)
            generate_repository(b, repo, prefix=prefix, max_batch=max_batch, inflight_max_active=max_active,
                                inflight_max_queue=max_queue, inflight_overlap=overlap,
                                glad_instances=glad_instances, intra_op_threads=threads)
            srv = stack.enter_context(launch_server(repo, ready_timeout=300, log_path=out / "tritonserver.log"))
            url, metrics_url = srv.grpc_url, srv.metrics_url
            res.update({"bundle": str(b.path), "preset": b.config.preset, "ads_enabled": b.config.ads_enabled,
                        "steps": b.config.num_inference_steps, "max_batch": max_batch,
                        "max_active": max_active or max_batch,
                        "max_queue": 4 * max_batch if max_queue is None else max_queue,
                        "overlap": (threads == 1) if overlap is None else overlap,
                        "glad_instances": glad_instances, "threads": threads})
        res["url"] = url
        glad = L.connect(url, f"{prefix}_glad", metrics_url=metrics_url, outputs=("scores", "adaptive_steps"),
                         label="per_batch")
        inflight = L.connect(url, f"{prefix}_glad_inflight", metrics_url=metrics_url,
                             outputs=("scores", "adaptive_steps"), label="inflight")
        payloads = L.Payloads(L.load_images(L.default_images(out / "images", images)), 1)
        cap_settings = L.Settings(request_count=capacity_requests, timeout_s=timeout_s, warmup_requests=clients)
        cap = run_points([glad], payloads, "concurrency", [clients], cap_settings, quiet=quiet)["points"][0]
        res["capacity_per_batch_per_s"] = cap["client"]["images_ok"] / cap["measured_seconds"]
        print(f"per-batch capacity: {res['capacity_per_batch_per_s']:.3f} images/s", flush=True)
        rates = [round(load * res["capacity_per_batch_per_s"], 4) for load in loads]
        settings = L.Settings(request_count=requests, timeout_s=timeout_s, max_threads=clients, seed=seed,
                              distribution="poisson", warmup_requests=2)
        runs = run_points([glad, inflight], payloads, "request_rate", rates, settings, quiet=quiet)
        write_reports(runs, out / "perf")
    by = {(p["label"], p["load"]): p for p in runs["points"]}
    for load, rate in zip(loads, rates):
        if ("per_batch", rate) not in by or ("inflight", rate) not in by:
            continue
        row = {"per_batch": _summary(by[("per_batch", rate)]), "inflight": _summary(by[("inflight", rate)])}
        cmp = next(c for c in runs["compare"] if c["load"] == rate)
        row["max_score_diff"], row["compared"] = cmp["max_score_diff"], cmp["compared_files"]
        pb, inf = row["per_batch"]["latency_s"], row["inflight"]["latency_s"]
        row["p99_ratio"] = inf["p99"] / pb["p99"] if pb and inf else float("nan")
        res["loads"][f"{load:.2f}"] = row
        print(f"load {load:.2f}: {json.dumps(row)}", flush=True)
    return res


def write_outputs(res: dict, out: Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` (one row per model and load) and ``latency_vs_load.png``."""
    from bench.perf.load import dumps

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(dumps(res))
    head = (f"Per-batch capacity ({res['clients']} closed-loop clients): {res['capacity_per_batch_per_s']:.3f} "
            f"images/s; {res['requests']} Poisson arrivals per load (seed {res['seed']}), at most {res['clients']} "
            f"outstanding; server {res['url']}")
    if "preset" in res:
        head += (f" (started here: preset {res['preset']}, ADS {'on' if res['ads_enabled'] else 'off'}, "
                 f"{res['steps']} DDIM steps; max_batch {res['max_batch']}, in-flight max_active "
                 f"{res['max_active']}, max_queue {res['max_queue']}, overlap {res['overlap']}; per-batch instances "
                 f"{res['glad_instances']}; ONNX Runtime threads per network instance {res['threads']} (0 = the "
                 "server's cores))")
    lines = [head + ".", "",
             "| load | model | offered /s | achieved /s | p50 s | p95 s | p99 s | max s | rejected | errors | "
             "p99 in-flight / per-batch | max score diff | counts = server's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for load, row in res["loads"].items():
        for label in ("per_batch", "inflight"):
            r = row[label]
            lat = r["latency_s"] or {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
            extra = (f"{row['p99_ratio']:.2f} | {row['max_score_diff']:.2e} ({row['compared']} images)"
                     if label == "inflight" else " | ")
            lines.append(f"| {load} | {label} | {r['offered_per_s']:.3f} | {r['achieved_per_s']:.3f} | "
                         f"{lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {r['max_s']:.2f} | "
                         f"{r['rejected']} | {r['errors']} | {extra} | {'yes' if r['counts_match'] else 'no'} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    paths = {"json": out / "results.json", "md": out / "results.md"}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, ax = plt.subplots(figsize=(7, 4.5))
    loads = [float(k) for k in res["loads"]]
    for label, colour in (("per_batch", "tab:red"), ("inflight", "tab:blue")):
        for q, style in (("p50", "--"), ("p99", "-")):
            ys = [res["loads"][k][label]["latency_s"].get(q, float("nan")) for k in res["loads"]]
            ax.plot(loads, ys, style, marker="o", color=colour, label=f"{label} {q}")
    ax.set_xlabel("offered load (fraction of the per-batch model's capacity)")
    ax.set_ylabel("latency (s), scheduled arrival to answer")
    ax.set_title("GLAD on Triton (CPU): per-batch vs in-flight batching")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png", dpi=120)
    plt.close(fig)
    paths["png"] = out / "latency_vs_load.png"
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="an exported bundle (glad export); a local server is "
                    "started on it (omit with --url)")
    ap.add_argument("--url", default=None, help="gRPC HOST:PORT of a running server instead of a local one")
    ap.add_argument("--prefix", default="bench", help="the models' prefix (with --url: the served one)")
    ap.add_argument("--metrics-url", default="auto", help="with --url: Triton's /metrics (auto: port 8002)")
    ap.add_argument("--loads", default="0.5,0.7,0.9", help="fractions of the per-batch capacity")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=16, help="closed-loop clients of the capacity run; the most "
                    "requests outstanding in the open-loop runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-active", type=int, default=None)
    ap.add_argument("--max-queue", type=int, default=None)
    ap.add_argument("--capacity-requests", type=int, default=64)
    ap.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                    help="in-flight ticks with stage overlap (auto: the repository's default)")
    ap.add_argument("--glad-instances", type=int, default=1, help="instances of the per-batch model")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per network model instance (0: "
                    "the cores the server may use, divided among the model's instances)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/inflight"))
    a = ap.parse_args(argv)
    if a.bundle is None and a.url is None:
        ap.error("give BUNDLE (a local server is started) or --url HOST:PORT")
    res = run_load_bench(a.bundle, a.out, loads=[float(x) for x in a.loads.split(",")], requests=a.requests,
                         clients=a.clients, seed=a.seed, max_batch=a.max_batch, max_active=a.max_active,
                         max_queue=a.max_queue, capacity_requests=a.capacity_requests,
                         overlap={"auto": None, "on": True, "off": False}[a.overlap],
                         glad_instances=a.glad_instances, threads=a.threads, url=a.url, prefix=a.prefix,
                         metrics_url=None if a.metrics_url == "none" else a.metrics_url)
    paths = write_outputs(res, a.out)
    print((a.out / "results.md").read_text())
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
