"""Latency under load: the per-batch model ``<prefix>_glad`` versus the in-flight model ``<prefix>_glad_inflight``
(issue 17), same server, same bundle, same open-loop arrival stream, one run.

    python -m bench.inflight_load BUNDLE [--loads 0.5,0.7,0.9] [--requests 120] [--clients 16] [--threads 0]
        [--overlap auto|on|off] [--out DIR]

1. Writes a model repository for the exported ``BUNDLE`` (``--max-batch`` images per ``_glad`` request, the
   in-flight pool ``--max-active`` / ``--max-queue``) and starts a real ``tritonserver`` on it.
2. **Capacity** of the per-batch model: ``--clients`` closed-loop clients, each sending single-image requests back
   to back (``--capacity-requests`` in all); images answered per second.
3. For each load (a fraction of that capacity): an open-loop Poisson arrival stream (fixed ``--seed``) of
   ``--requests`` single-image requests, dealt round robin to ``--clients`` clients, sent at their arrival times
   whatever is outstanding (per-batch: ``async_infer``; in flight: one gRPC stream per client). Latency counts from
   the scheduled arrival to the answer. The two models get the same arrivals, one after the other.
4. Per model and load: offered and achieved images/s, p50 / p95 / p99 / max latency, rejected requests (the
   in-flight pool's back-pressure), other errors, and the largest score difference between the two models on the
   same images. ``results.json``, ``results.md`` and ``latency_vs_load.png`` go to ``--out``.

The images are real ELPV cells (``elpv-dataset``), half defective, sent as PNG files (``image_files``), as a line
would. Client and server share this machine's cores: read the ratios between the two models, run alone.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.run import percentiles

__all__ = ["poisson_arrivals", "summarize_run", "run_load_bench", "write_outputs", "main"]

#: the outputs the bench asks for (scores to compare the models; no maps: they are the same size for both)
_OUTPUTS = ("scores", "adaptive_steps")


def poisson_arrivals(rate: float, n: int, seed: int = 0) -> np.ndarray:
    """``n`` arrival times in seconds (float64, increasing, first > 0) of a Poisson process of ``rate`` per second:
    cumulative sums of exponential gaps of mean ``1 / rate``. Raises ValueError for rate <= 0 or n < 1."""
    if rate <= 0 or n < 1:
        raise ValueError(f"rate must be > 0 and n >= 1, got {rate}, {n}")
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=n))


def summarize_run(arrivals: np.ndarray, done: dict[int, tuple[float, float | None, str | None]],
                  duration: float) -> dict:
    """Figures of one model at one load.

    Args:
        arrivals: scheduled arrival times (s) of the requests, index = request.
        done: per request: ``(answer time in s on the arrivals' clock, score or None, error text or None)``.
        duration: seconds from the first arrival to the last answer.
    Returns:
        ``requests``, ``answered`` (each request at most once), ``ok``, ``rejected`` (pool full), ``errors``
        (other), ``offered_per_s`` (requests / arrival span), ``achieved_per_s`` (ok / duration),
        ``latency_s`` (p50 / p95 / p99 of answered-ok requests, :func:`bench.run.percentiles`) and ``max_s``.
    """
    lat = [t - arrivals[i] for i, (t, s, e) in done.items() if e is None]
    rejected = sum(1 for _, _, e in done.values() if e is not None and "pool full" in e)
    span = float(arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    return {"requests": int(len(arrivals)), "answered": len(done), "ok": len(lat), "rejected": rejected,
            "errors": len(done) - len(lat) - rejected,
            "offered_per_s": (len(arrivals) - 1) / span if span > 0 else float("nan"),
            "achieved_per_s": len(lat) / duration if duration > 0 else float("nan"),
            "latency_s": percentiles(lat) if lat else {}, "max_s": float(max(lat)) if lat else float("nan")}


def _elpv_pngs(count: int) -> list[bytes]:
    """``count`` real ELPV mono cells as PNG bytes, normal and defective alternating."""
    from elpv_dataset.utils import load_dataset
    from PIL import Image

    images, probs, types = load_dataset()
    mono = types == "mono"
    good, bad = np.where(mono & (probs == 0))[0], np.where(mono & (probs == 1))[0]
    out = []
    for k in range(count):
        i = (good if k % 2 == 0 else bad)[k // 2]
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _inputs(png: bytes):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("image_files", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([png], dtype=np.object_).reshape(1, 1))
    return [inp], [grpcclient.InferRequestedOutput(n) for n in _OUTPUTS]


def _capacity(url: str, model: str, pngs: list[bytes], clients: int, requests: int) -> float:
    """Images/s of ``model`` with ``clients`` closed-loop clients sending ``requests`` single images in all."""
    import tritonclient.grpc as grpcclient

    counter = iter(range(requests))
    lock = threading.Lock()
    errors: list[str] = []

    def worker():
        c = grpcclient.InferenceServerClient(url)
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                break
            inputs, outputs = _inputs(pngs[k % len(pngs)])
            try:
                c.infer(model, inputs, outputs=outputs)
            except Exception as e:  # noqa: BLE001 (counted, reported)
                errors.append(str(e))
        c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"capacity run of {model}: {len(errors)} errors, first: {errors[0]}")
    return requests / (time.monotonic() - t0)


def _open_loop(url: str, model: str, inflight: bool, pngs: list[bytes], arrivals: np.ndarray, clients: int,
               timeout_s: float) -> tuple[dict, float]:
    """Send request i at ``arrivals[i]`` (s) from client ``i % clients``; returns ``done`` for
    :func:`summarize_run` and the run's duration."""
    import tritonclient.grpc as grpcclient

    done: dict[int, tuple[float, float | None, str | None]] = {}
    lock = threading.Lock()
    finished = threading.Event()
    n = len(arrivals)
    t0 = [0.0]

    def record(i, result, error):
        t = time.monotonic() - t0[0]
        with lock:
            if i in done:
                raise RuntimeError(f"request {i} answered twice")
            score = None if result is None else float(result.as_numpy("scores").ravel()[0])
            done[i] = (t, score, None if error is None else str(error))
            if len(done) == n:
                finished.set()

    conns = [grpcclient.InferenceServerClient(url) for _ in range(clients)]
    error_ids = itertools.count(-1, -1)  # the stream names no request in an error: counted under negative ids

    def on_stream(result, error):
        with lock:
            i = int(result.get_response().id) if result is not None else next(error_ids)
        record(i, result, error)

    if inflight:
        for c in conns:
            c.start_stream(callback=on_stream)
    t0[0] = time.monotonic()
    for i, at in enumerate(arrivals):
        delay = t0[0] + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        c = conns[i % clients]
        inputs, outputs = _inputs(pngs[i % len(pngs)])
        if inflight:
            c.async_stream_infer(model, inputs, outputs=outputs, request_id=str(i))
        else:
            c.async_infer(model, inputs, callback=lambda result, error, i=i: record(i, result, error),
                          outputs=outputs, request_id=str(i))
    finished.wait(timeout_s)
    for c in conns:
        if inflight:
            c.stop_stream()
        c.close()
    with lock:  # from the first arrival to the last answer
        duration = max((t for t, _, _ in done.values()), default=0.0) - float(arrivals[0])
        return dict(done), duration


def run_load_bench(bundle, out: Path, *, loads: Sequence[float] = (0.5, 0.7, 0.9), requests: int = 120,
                   clients: int = 16, seed: int = 0, max_batch: int = 8, max_active: int | None = None,
                   max_queue: int | None = None, capacity_requests: int = 64, images: int = 16,
                   timeout_s: float = 600.0, overlap: bool | None = None, glad_instances: int = 1,
                   threads: int = 0) -> dict:
    """Run the bench (module docstring) on an exported ``bundle``; returns the results dict."""
    from glad_runtime.core.bundle import Bundle
    from triton_models.repository import generate_repository
    from triton_models.server import launch_server

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    out = Path(out)
    repo = out / "models"
    shutil.rmtree(repo, ignore_errors=True)
    generate_repository(b, repo, prefix="bench", max_batch=max_batch, inflight_max_active=max_active,
                        inflight_max_queue=max_queue, inflight_overlap=overlap, glad_instances=glad_instances,
                        intra_op_threads=threads)
    pngs = _elpv_pngs(images)
    res: dict = {"bundle": str(b.path), "preset": b.config.preset, "ads_enabled": b.config.ads_enabled,
                 "steps": b.config.num_inference_steps, "clients": clients, "requests": requests, "seed": seed,
                 "max_batch": max_batch, "max_active": max_active or max_batch,
                 "max_queue": 4 * max_batch if max_queue is None else max_queue,
                 "overlap": (threads == 1) if overlap is None else overlap,
                 "glad_instances": glad_instances, "threads": threads, "loads": {}}
    with launch_server(repo, ready_timeout=300, log_path=out / "tritonserver.log") as srv:
        url = srv.grpc_url
        _capacity(url, "bench_glad", pngs, clients, 2 * max_batch)  # warm-up
        _open_loop(url, "bench_glad_inflight", True, pngs, np.linspace(0.01, 0.5, 4), 2, timeout_s)  # warm-up
        cap = _capacity(url, "bench_glad", pngs, clients, capacity_requests)
        res["capacity_per_batch_per_s"] = cap
        print(f"per-batch capacity: {cap:.3f} images/s", flush=True)
        for load in loads:
            arrivals = poisson_arrivals(load * cap, requests, seed)
            row = {}
            scores = {}
            for label, model, inflight in (("per_batch", "bench_glad", False),
                                           ("inflight", "bench_glad_inflight", True)):
                done, duration = _open_loop(url, model, inflight, pngs, arrivals, clients, timeout_s)
                row[label] = summarize_run(arrivals, done, duration)
                scores[label] = {i: s for i, (_, s, e) in done.items() if e is None and i >= 0}
                print(f"load {load:.2f} {label}: {json.dumps(row[label])}", flush=True)
            common = sorted(set(scores["per_batch"]) & set(scores["inflight"]))
            row["max_score_diff"] = max((abs(scores["per_batch"][i] - scores["inflight"][i]) for i in common),
                                        default=float("nan"))
            row["compared"] = len(common)
            pb, inf = row["per_batch"]["latency_s"], row["inflight"]["latency_s"]
            row["p99_ratio"] = inf["p99"] / pb["p99"] if pb and inf else float("nan")
            res["loads"][f"{load:.2f}"] = row
    return res


def write_outputs(res: dict, out: Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` (one row per model and load) and ``latency_vs_load.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    lines = [f"Per-batch capacity ({res['clients']} closed-loop clients): {res['capacity_per_batch_per_s']:.3f} "
             f"images/s; {res['requests']} Poisson arrivals per load (seed {res['seed']}), {res['clients']} "
             f"open-loop clients; preset {res['preset']}, ADS {'on' if res['ads_enabled'] else 'off'}, "
             f"{res['steps']} DDIM steps; max_batch {res['max_batch']}, in-flight max_active {res['max_active']}, "
             f"max_queue {res['max_queue']}, overlap {res['overlap']}; per-batch instances {res['glad_instances']}; "
             f"ONNX Runtime threads per network instance {res.get('threads', 1)} (0 = the server's cores).",
             "",
             "| load | model | offered /s | achieved /s | p50 s | p95 s | p99 s | max s | rejected | errors | "
             "p99 in-flight / per-batch | max score diff |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for load, row in res["loads"].items():
        for label in ("per_batch", "inflight"):
            r = row[label]
            lat = r["latency_s"] or {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
            extra = (f"{row['p99_ratio']:.2f} | {row['max_score_diff']:.2e} ({row['compared']} images)"
                     if label == "inflight" else " | ")
            lines.append(f"| {load} | {label} | {r['offered_per_s']:.3f} | {r['achieved_per_s']:.3f} | "
                         f"{lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {r['max_s']:.2f} | "
                         f"{r['rejected']} | {r['errors']} | {extra} |")
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
    ax.set_ylabel("latency (s), arrival to answer")
    ax.set_title(f"GLAD {res['preset']} on Triton (CPU): per-batch vs in-flight batching")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_load.png", dpi=120)
    plt.close(fig)
    paths["png"] = out / "latency_vs_load.png"
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="an exported bundle (glad export)")
    ap.add_argument("--loads", default="0.5,0.7,0.9", help="fractions of the per-batch capacity")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=16)
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
    a.out.mkdir(parents=True, exist_ok=True)
    res = run_load_bench(a.bundle, a.out, loads=[float(x) for x in a.loads.split(",")], requests=a.requests,
                         clients=a.clients, seed=a.seed, max_batch=a.max_batch, max_active=a.max_active,
                         max_queue=a.max_queue, capacity_requests=a.capacity_requests,
                         overlap={"auto": None, "on": True, "off": False}[a.overlap],
                         glad_instances=a.glad_instances, threads=a.threads)
    paths = write_outputs(res, a.out)
    print((a.out / "results.md").read_text())
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
