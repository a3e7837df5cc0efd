"""Runs of ``glad perf``: many load points on one or two targets, the tool's own overhead, the score check, the
reports (CSV, JSON, Markdown, plot) and the perf_analyzer input.

* :func:`run_points`: every load of a range on each target; with two targets (``--compare``) they alternate at
  each load (A B, then B A, ...) so a drift of the machine hits both, and :func:`compare` gives their ratios.
* :func:`measure_overhead`: the same loads, protocol, batch and stream-ness against a no-op python-backend model
  (``bench/perf/noop_model.py``) on a local server started for it: the requests per second and latency the tool
  itself reaches on this machine, reported beside each point (``overhead``).
* :func:`verify_scores`: the first served score of each sampled file against the in-process ONNX Runtime result
  of a bundle (``--verify-bundle``).
* :func:`write_reports`: ``perf.json``, ``perf.csv`` (perf_analyzer's column names, :func:`bench.perf.rules.csv_columns`),
  ``perf.md``, ``perf.svg`` (written here, no dependency) and ``perf.png`` (matplotlib, when installed).
* :func:`write_perf_analyzer_input`: perf_analyzer's ``--input-data`` JSON and the command line.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from typing import Sequence


from bench.perf import rules
from bench.perf.load import Payloads, Settings, Target, connect, dumps, measure_point
from glad_runtime.errors import ServerStartError
from glad_runtime.serving import protocol

__all__ = ["run_points", "compare", "measure_overhead", "verify_scores", "write_reports", "markdown_table",
           "write_perf_analyzer_input", "perf_analyzer_command", "noop_repository", "host_info", "NOOP_MODELS"]

#: the no-op models of the overhead check: (name, decoupled)
NOOP_MODELS = (("glad_perf_noop", False), ("glad_perf_noop_stream", True))


def host_info() -> dict:
    """The machine the client ran on: CPU model (``/proc/cpuinfo``), cores this process may use, load average
    at the start (1 min), Python version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": cores, "load_average_1min": load, "python": platform.python_version()}


def _target_dict(t: Target) -> dict:
    return {"label": t.name, "url": t.url, "protocol": t.protocol, "model": t.model, "streaming": t.streaming,
            "networks": list(t.networks), "max_images": t.max_images, "outputs": list(t.outputs),
            "metrics_url": t.metrics_url}


def run_points(targets: Sequence[Target], payloads: Payloads, mode: str, loads: Sequence[float],
               settings: Settings, *, stop: threading.Event | None = None, quiet: bool = False,
               overhead: bool = False, workdir: str | Path | None = None, verify_bundle=None) -> dict:
    """Measure every load of ``loads`` on each target (:func:`bench.perf.load.measure_point`).

    Args:
        targets: one target, or two to compare (they alternate at each load).
        mode: ``concurrency`` or ``request_rate``; loads: the concurrencies or rates (requests/s).
        stop: set it (Ctrl-C) to stop: the point running ends cleanly (its figures are kept, ``interrupted``),
            no later point starts, and the results so far are returned with ``interrupted`` true.
        quiet: no progress bar (tqdm, on stderr).
        overhead: also measure the tool's ceiling on a no-op model (:func:`measure_overhead`; needs the
            ``tritonserver`` of nvidia-pytriton here), in ``workdir``.
        verify_bundle: a bundle: compare the served scores with the in-process ones (:func:`verify_scores`).
    Returns:
        ``{"tool", "started", "host", "mode", "loads", "batch_size", "settings", "images", "targets", "points",
        "compare", "overhead", "verify", "interrupted"}`` (JSON-ready through :func:`bench.perf.load.dumps`).
    """
    from tqdm import tqdm

    stop = stop or threading.Event()
    res = {"tool": "glad perf", "started": datetime.datetime.now().isoformat(timespec="seconds"),
           "host": host_info(), "mode": mode, "loads": list(loads), "batch_size": payloads.batch_size,
           "settings": dataclasses.asdict(settings), "images": [n for n, _ in payloads.files],
           "targets": [_target_dict(t) for t in targets], "points": [], "compare": [], "overhead": None,
           "verify": None, "interrupted": False}
    unit = "concurrency" if mode == "concurrency" else "req/s"
    with tqdm(total=len(loads) * len(targets), desc="glad perf", unit="point", file=sys.stderr,
              disable=quiet, dynamic_ncols=True) as bar:
        for i, load in enumerate(loads):
            order = list(targets) if i % 2 == 0 else list(reversed(targets))
            for t in order:
                if stop.is_set():
                    break
                bar.set_description(f"{t.name} {unit} {load:g}")

                def window(w, bar=bar):
                    bar.set_postfix_str(f"window: {w['requests_per_s']:.2f} req/s, p99 {w['p99_us'] / 1e3:.0f} ms")

                point = measure_point(t, payloads, mode, load, settings, stop=stop, on_window=window)
                res["points"].append(point)
                c = point["client"]
                bar.set_postfix_str(f"{c['requests_per_s']:.2f} req/s, p99 {c['latency_us']['p99'] / 1e3:.0f} ms"
                                    + ("" if point["stable"] else " (unstable)"))
                bar.update(1)
            if stop.is_set():
                break
    res["interrupted"] = stop.is_set()
    if len(targets) == 2:
        res["compare"] = compare(res["points"], targets[0].name, targets[1].name)
    if overhead and not stop.is_set():
        try:
            res["overhead"] = measure_overhead(targets, payloads, mode, loads, settings, workdir, stop=stop,
                                               quiet=quiet)
            for p in res["points"]:
                key = f"{'stream' if p['streaming'] else p['protocol']} {p['load']:g}"
                p["overhead"] = res["overhead"]["points"].get(key)
        except (ServerStartError, OSError) as e:
            res["overhead"] = {"skipped": f"{type(e).__name__}: {e}".splitlines()[0]}
    if verify_bundle is not None and not stop.is_set():
        res["verify"] = verify_scores(verify_bundle, payloads.files, res["points"])
    return res


def compare(points: Sequence[dict], a: str, b: str) -> list[dict]:
    """Per load measured on both: ``b / a`` ratios of requests/s, images/s, p50 and p99 latency, and the largest
    score difference between the two targets on the same files (``a`` and ``b`` are target labels)."""
    by = {(p["label"], p["load"]): p for p in points}
    out = []
    for (label, load), pa in by.items():
        if label != a or (b, load) not in by:
            continue
        pb = by[(b, load)]
        ca, cb = pa["client"], pb["client"]

        def ratio(x, y):
            return y / x if x and math.isfinite(x) and math.isfinite(y) else float("nan")

        sa, sb = pa["scores"]["by_file"], pb["scores"]["by_file"]
        common = sorted(set(sa) & set(sb))
        out.append({"load": load, "a": a, "b": b,
                    "requests_per_s_ratio": ratio(ca["requests_per_s"], cb["requests_per_s"]),
                    "images_per_s_ratio": ratio(ca["images_per_s"], cb["images_per_s"]),
                    "p50_ratio": ratio(ca["latency_us"]["p50"], cb["latency_us"]["p50"]),
                    "p99_ratio": ratio(ca["latency_us"]["p99"], cb["latency_us"]["p99"]),
                    "max_score_diff": max((abs(sa[f] - sb[f]) for f in common), default=float("nan")),
                    "compared_files": len(common)})
    return sorted(out, key=lambda r: r["load"])


# ---------------------------------------------------------------------------------------------- overhead
def noop_repository(folder: str | Path, map_side: int = 224) -> Path:
    """Write the no-op models (:data:`NOOP_MODELS`, source ``bench/perf/noop_model.py``) into a fresh repository
    ``folder``: the GLAD entry models' inputs and outputs (``protocol.glad_inputs`` / ``glad_outputs``,
    ``max_batch_size: 0``), two instances for the unary one, maps of ``map_side`` pixels. Returns the folder."""
    repo = Path(folder)
    shutil.rmtree(repo, ignore_errors=True)
    src = Path(__file__).with_name("noop_model.py")
    for name, decoupled in NOOP_MODELS:
        (repo / name / "1").mkdir(parents=True)
        shutil.copy(src, repo / name / "1" / "model.py")
        ins = ",\n".join("  " + s.pbtxt(False) for s in protocol.glad_inputs(8))
        outs = ",\n".join("  " + s.pbtxt(False) for s in protocol.glad_outputs())
        sched = ("model_transaction_policy { decoupled: true }\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n"
                 if decoupled else "instance_group [ { count: 2 kind: KIND_CPU } ]\n")
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\ninput [\n{ins}\n]\noutput [\n{outs}\n]\n'
            + sched + f'parameters [ {{ key: "map_side" value: {{ string_value: "{int(map_side)}" }} }} ]\n')
    return repo


def measure_overhead(targets: Sequence[Target], payloads: Payloads, mode: str, loads: Sequence[float],
                     settings: Settings, workdir: str | Path | None, *, stop: threading.Event | None = None,
                     quiet: bool = False) -> dict:
    """The tool's own ceiling: the same loads, batch, protocol and stream-ness as the targets, against the no-op
    models on a local ``tritonserver`` (nvidia-pytriton), windows of at most 2 s (same stability rule) or the
    same request count.

    Returns:
        ``{"server": "local no-op", "points": {"<grpc|http|stream> <load>": {"requests_per_s", "images_per_s",
        "latency_us", "stable"}}}``.
    Raises:
        ServerStartError: no ``tritonserver`` here, or it did not start.
    """
    from tqdm import tqdm

    from triton_models.server import launch_server

    work = Path(workdir) if workdir else Path.cwd() / "glad-perf-noop"
    repo = noop_repository(work / "noop_models", max((t.map_side for t in targets), default=224))
    kinds = sorted({("stream" if t.streaming else t.protocol) for t in targets})
    quick = dataclasses.replace(settings, interval_s=min(settings.interval_s, 2.0))
    out: dict = {"server": "local no-op python-backend models (bench/perf/noop_model.py)", "points": {}}
    with launch_server(repo, ready_timeout=120, log_path=work / "noop-tritonserver.log") as srv, \
            tqdm(total=len(kinds) * len(loads), desc="tool overhead (no-op model)", unit="point", file=sys.stderr,
                 disable=quiet, dynamic_ncols=True) as bar:
        for kind in kinds:
            url = f"http://{srv.http_url}" if kind == "http" else srv.grpc_url
            model = NOOP_MODELS[1][0] if kind == "stream" else NOOP_MODELS[0][0]
            t = connect(url, model, metrics_url=None)
            for load in loads:
                if stop is not None and stop.is_set():
                    return out
                p = measure_point(t, payloads, mode, load, quick, stop=stop)
                c = p["client"]
                out["points"][f"{kind} {load:g}"] = {"requests_per_s": c["requests_per_s"],
                                                     "images_per_s": c["images"] / p["measured_seconds"]
                                                     if p["measured_seconds"] else float("nan"),
                                                     "latency_us": c["latency_us"], "stable": p["stable"],
                                                     "errors": c["errors"]}
                bar.update(1)
    return out


# ---------------------------------------------------------------------------------------------- scores
def verify_scores(bundle, files: Sequence[tuple[str, bytes]], points: Sequence[dict]) -> dict:
    """The first served score of each file (every point, every target) against ``bundle`` run in process
    (ONNX Runtime, the bundle's own config): ``{"files", "max_abs_diff", "worst_file"}``."""
    from glad_runtime.detector import Detector

    served: dict[str, list[float]] = {}
    for p in points:
        for f, s in p["scores"]["by_file"].items():
            served.setdefault(f, []).append(s)
    names = [n for n, _ in files if n in served]
    if not names:
        return {"files": 0, "max_abs_diff": float("nan"), "worst_file": None}
    data = dict(files)
    det = Detector.open(bundle, "ort")
    ref = {n: d.score for n, (d, _) in zip(names, det.detect([data[n] for n in names]))}
    diffs = {n: max(abs(s - ref[n]) for s in served[n]) for n in names if ref[n] is not None}
    worst = max(diffs, key=diffs.get) if diffs else None
    return {"files": len(diffs), "max_abs_diff": diffs[worst] if worst else float("nan"), "worst_file": worst,
            "in_process": ref}


# ---------------------------------------------------------------------------------------------- reports
def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _ms(us) -> str:
    return "-" if us is None or not math.isfinite(us) else f"{us / 1e3:.0f}"


def _rate(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.1f}"


def _network_totals(point: dict) -> tuple[float, float]:
    """(queue, compute) in microseconds per entry-model request, summed over the network models it called."""
    models = point["server"]["models"]
    n = models[point["model"]]["requests"]
    if not n:
        return float("nan"), float("nan")
    q = c = 0.0
    for m, f in models.items():
        if m == point["model"] or not f["requests"]:
            continue
        q += f["queue_us"] * f["requests"]
        c += (f["compute_input_us"] + f["compute_infer_us"] + f["compute_output_us"]) * f["requests"]
    return q / n, c / n


def markdown_table(res: dict) -> str:
    """One row per point: throughput, latency quantiles, the server's queue and compute (entry model and, summed
    per request, its network models), the UNet's achieved batch, errors, the count reconciliation, stability and
    the tool's ceiling."""
    unit = "concurrency" if res["mode"] == "concurrency" else "req/s"
    head = (f"| model | {unit} | req/s | images/s | p50 ms | p90 ms | p99 ms | max ms | entry queue ms | "
            "entry compute ms | networks queue ms | networks compute ms | UNet batch | errors | requests "
            "tool / server | images tool / server | stable | tool ceiling req/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in res["points"]:
        c, s, r = p["client"], p["server"]["models"], p["reconciliation"]
        e = s[p["model"]]
        nq, nc = _network_totals(p)
        unet = next((f for m, f in s.items() if m.endswith("_unet")), {})
        over = p.get("overhead") or {}
        errs = ", ".join(f"{k} {v}" for k, v in c["errors_by_type"].items()) or "0"
        lines.append(
            f"| `{p['label']}` | {p['load']:g} | {c['requests_per_s']:.2f} | {c['images_per_s']:.2f} | "
            f"{_ms(c['latency_us']['p50'])} | {_ms(c['latency_us']['p90'])} | {_ms(c['latency_us']['p99'])} | "
            f"{_ms(c['latency_us']['max'])} | {_ms(e['queue_us'])} | "
            f"{_ms(e['compute_input_us'] + e['compute_infer_us'] + e['compute_output_us'])} | {_ms(nq)} | "
            f"{_ms(nc)} | {unet.get('batch', float('nan')):.2f} | {errs} | {r['client_requests']} / "
            f"{r['server_requests']} | {r['client_images']} / "
            f"{'-' if r['server_images'] is None else int(r['server_images'])} | "
            f"{'yes' if p['stable'] else 'no'}{' (stopped)' if p['interrupted'] else ''} | "
            f"{_rate(over.get('requests_per_s'))} |")
    return "\n".join(lines)


def _plot_series(res: dict) -> dict[str, list[tuple[float, float, float, float]]]:
    """Per target: ``(requests/s, p50 ms, p99 ms, load)`` in load order (a curve joins consecutive loads, as
    perf_analyzer's latency-vs-throughput charts do; at saturation it turns back on itself)."""
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for p in res["points"]:
        c = p["client"]
        series.setdefault(p["label"], []).append((c["requests_per_s"], c["latency_us"]["p50"] / 1e3,
                                                  c["latency_us"]["p99"] / 1e3, p["load"]))
    return {k: sorted(v, key=lambda r: r[3]) for k, v in series.items()}


def _tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 10 else f"{v:.2g}"


def write_svg(res: dict, path: str | Path) -> Path:
    """Latency (p50 dashed, p99 solid, ms) against throughput (requests/s), one colour per target, points joined in
    load order and labelled with their load, as a self-contained SVG (no plotting library)."""
    series = _plot_series(res)
    pts = [(x, y) for v in series.values() for x, a, b, _ in v for y in (a, b)
           if math.isfinite(x) and math.isfinite(y)]
    W, H, L, R, T, B = 720, 440, 70, 20, 40, 50
    xmax = max((x for x, _ in pts), default=1.0) * 1.1 or 1.0
    ymax = max((y for _, y in pts), default=1.0) * 1.1 or 1.0

    def sx(x):
        return L + (W - L - R) * x / xmax

    def sy(y):
        return H - B - (H - T - B) * y / ymax

    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
          'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
          f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">GLAD on Triton: latency vs throughput '
          f'({res["mode"].replace("_", " ")}, batch {res["batch_size"]})</text>',
          f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
          f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
          f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">throughput (requests/s)</text>',
          f'<text x="16" y="{(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 16 {(T + H - B) / 2})">'
          'latency (ms)</text>']
    for k in range(6):
        xv, yv = xmax * k / 5, ymax * k / 5
        el.append(f'<text x="{sx(xv):.1f}" y="{H - B + 16}" text-anchor="middle">{_tick(xv)}</text>')
        el.append(f'<text x="{L - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{_tick(yv)}</text>')
        el.append(f'<line x1="{L}" y1="{sy(yv):.1f}" x2="{W - R}" y2="{sy(yv):.1f}" stroke="#eee"/>')
    for i, (label, v) in enumerate(series.items()):
        col = colours[i % len(colours)]
        for j, (q, dash) in enumerate((("p50", "6,4"), ("p99", ""))):
            xy = [(sx(x), sy(p50 if j == 0 else p99), load) for x, p50, p99, load in v
                  if math.isfinite(x) and math.isfinite(p50 if j == 0 else p99)]
            if not xy:
                continue
            el.append(f'<polyline fill="none" stroke="{col}" stroke-width="2"'
                      + (f' stroke-dasharray="{dash}"' if dash else "") + ' points="'
                      + " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in xy) + '"/>')
            el += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{col}"/>' for x, y, _ in xy]
            if j == 1:  # the load beside each p99 point
                el += [f'<text x="{x + 5:.1f}" y="{y - 5:.1f}" fill="{col}" font-size="10">{load:g}</text>'
                       for x, y, load in xy]
            ly = T + 16 * (2 * i + j)
            el.append(f'<line x1="{L + 12}" y1="{ly}" x2="{L + 40}" y2="{ly}" stroke="{col}" stroke-width="2"'
                      + (f' stroke-dasharray="{dash}"' if dash else "") + "/>")
            el.append(f'<text x="{L + 46}" y="{ly + 4}">{label} {q}</text>')
    el.append("</svg>")
    path = Path(path)
    path.write_text("\n".join(el) + "\n")
    return path


def write_png(res: dict, path: str | Path) -> Path | None:
    """The same plot as :func:`write_svg` with matplotlib (None when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, v in _plot_series(res).items():
        xs = [x for x, _, _, _ in v]
        line, = ax.plot(xs, [b for _, _, b, _ in v], "-o", label=f"{label} p99")
        ax.plot(xs, [a for _, a, _, _ in v], "--o", color=line.get_color(), label=f"{label} p50")
        for x, _, b, load in v:  # the load beside each p99 point
            ax.annotate(f"{load:g}", (x, b), textcoords="offset points", xytext=(4, 4), fontsize=8,
                        color=line.get_color())
    ax.set_xlabel("throughput (requests/s); labels: " + ("concurrency" if res["mode"] == "concurrency"
                                                           else "offered requests/s"))
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"GLAD on Triton: latency vs throughput ({res['mode'].replace('_', ' ')}, batch "
                 f"{res['batch_size']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_csv(points: Sequence[dict], path: str | Path, mode: str, networks: Sequence[str]) -> Path:
    """perf_analyzer-style CSV (:func:`bench.perf.rules.csv_columns`), one row per point, in measuring order."""
    import csv

    cols = rules.csv_columns(mode, networks)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for p in points:
            w.writerow(rules.csv_row(p, networks))
    return Path(path)


def write_reports(res: dict, out: str | Path) -> dict[str, Path]:
    """``perf.json`` (everything), ``perf.csv`` (one target) or ``perf-<label>.csv`` per target and
    ``compare.csv`` (two), ``perf.md``, ``perf.svg`` and ``perf.png`` (with matplotlib) into ``out``."""
    import csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "perf.json"}
    paths["json"].write_text(dumps(res))
    labels = [t["label"] for t in res["targets"]]
    for t in res["targets"]:
        pts = [p for p in res["points"] if p["label"] == t["label"]]
        name = "perf.csv" if len(labels) == 1 else f"perf-{_safe(t['label'])}.csv"
        paths[f"csv:{t['label']}"] = write_csv(pts, out / name, res["mode"], t["networks"])
    if res["compare"]:
        cols = ["Concurrency" if res["mode"] == "concurrency" else "Request Rate", "A", "B",
                "Inferences/Second Ratio", "Images/Second Ratio", "p50 latency Ratio", "p99 latency Ratio",
                "Max Score Diff"]
        with open(out / "compare.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in res["compare"]:
                w.writerow([r["load"], r["a"], r["b"]] + [f"{r[k]:.4g}" for k in (
                    "requests_per_s_ratio", "images_per_s_ratio", "p50_ratio", "p99_ratio", "max_score_diff")])
        paths["compare"] = out / "compare.csv"
    md = [f"glad perf, {res['started']}, {res['host']['cpu']} ({res['host']['cores']} cores, load average "
          f"{res['host']['load_average_1min']:.2f} at the start); {res['mode'].replace('_', ' ')}, batch "
          f"{res['batch_size']}, map size {res['settings']['map_size']}; "
          + (f"{res['settings']['request_count']} requests per point"
             if res["settings"]["request_count"] else
             f"windows of {res['settings']['interval_s']:g} s until 3 agree within "
             f"{100 * res['settings']['tolerance']:g} % (at most {res['settings']['max_trials']})")
          + ".", "", markdown_table(res)]
    if res["compare"]:
        md += ["", "| load | B / A | req/s ratio | p50 ratio | p99 ratio | max score diff |", "|---|---|---|---|---|---|"]
        md += [f"| {r['load']:g} | {r['b']} / {r['a']} | {r['requests_per_s_ratio']:.2f} | {r['p50_ratio']:.2f} | "
               f"{r['p99_ratio']:.2f} | {r['max_score_diff']:.1e} |" for r in res["compare"]]
    if res.get("verify"):
        v = res["verify"]
        md += ["", f"Served scores vs in process: {v['files']} files, largest difference {v['max_abs_diff']:.1e}."]
    if res.get("overhead") and res["overhead"].get("skipped"):
        md += ["", f"Tool overhead not measured: {res['overhead']['skipped']}"]
    if res["interrupted"]:
        md += ["", "Stopped by Ctrl-C: the points above are what was measured."]
    (out / "perf.md").write_text("\n".join(md) + "\n")
    paths["md"] = out / "perf.md"
    if res["points"]:
        paths["svg"] = write_svg(res, out / "perf.svg")
        png = write_png(res, out / "perf.png")
        if png is not None:
            paths["png"] = png
    return paths


# ---------------------------------------------------------------------------------------------- perf_analyzer
def _range_arg(values: Sequence[float]) -> str | None:
    """perf_analyzer's ``start:end:step`` for an arithmetic sequence, else None."""
    v = list(values)
    if len(v) == 1:
        return f"{v[0]:g}:{v[0]:g}"
    step = v[1] - v[0]
    if step > 0 and all(abs((b - a) - step) < 1e-9 for a, b in zip(v, v[1:])):
        return f"{v[0]:g}:{v[-1]:g}:{step:g}"
    return None


def perf_analyzer_command(model: str, url: str, transport: str, streaming: bool, mode: str,
                          loads: Sequence[float], settings: Settings, input_file: str = "input_data.json",
                          csv_file: str = "perf_analyzer.csv") -> list[str]:
    """The perf_analyzer command line(s) measuring what ``glad perf`` measures: the model, the real images of
    ``input_file`` (``--input-data``), the loads (one command per load when they are not an arithmetic range,
    which perf_analyzer's ``start:end:step`` cannot express), windows and stability rule (p99,
    ``--percentile=99``) or the request count, streaming for the in-flight model, ``map_size`` when not the
    default, and a verbose CSV with the server's statistics."""
    base = ["perf_analyzer", "-m", model, "-u", url, "-i", transport, "--input-data", input_file,
            "--percentile=99", f"--stability-percentage={100 * settings.tolerance:g}"]
    if settings.request_count > 0:
        base += ["--measurement-mode=count_windows", f"--measurement-request-count={settings.request_count}"]
    else:
        base += [f"--measurement-interval={int(round(settings.interval_s * 1000))}",
                 f"--max-trials={settings.max_trials}"]
    if streaming:
        base.append("--streaming")
    if settings.map_size != protocol.DEFAULT_MAP_SIZE:
        base.append(f"--request-parameter={protocol.MAP_SIZE_PARAMETER}:{settings.map_size}:string")
    if mode == "request_rate":
        base += [f"--request-distribution={settings.distribution}", f"--max-threads={settings.max_threads}"]
    flag = "--concurrency-range" if mode == "concurrency" else "--request-rate-range"
    rng = _range_arg(loads)
    if rng is not None:
        return [" ".join(base + [flag, rng, "-f", csv_file, "--verbose-csv"])]
    stem = csv_file.rsplit(".", 1)[0]
    return [" ".join(base + [flag, f"{v:g}:{v:g}", "-f", f"{stem}_{v:g}.csv", "--verbose-csv"]) for v in loads]


def write_perf_analyzer_input(folder: str | Path, payloads: Payloads, *, model: str, url: str, transport: str,
                              streaming: bool, mode: str, loads: Sequence[float], settings: Settings) -> dict:
    """perf_analyzer's ``--input-data`` file and command for this model, into ``folder``.

    ``input_data.json``: ``{"data": [...]}`` with one entry per request, as ``glad perf`` sends them (request
    ``k`` = files ``k*B .. k*B+B-1``, round robin, ``ceil(n / B)`` entries): ``"image_files": {"content": {"b64":
    ...}, "shape": [B, 1]}``, where the base64 text holds the BYTES tensor as Triton serialises it (per element a
    4-byte little-endian length, then the file's bytes). Only ``image_files`` is given: the entry models declare
    both inputs optional. ``perf_analyzer.sh``: the command line(s) (:func:`perf_analyzer_command`), run from the
    folder. Returns ``{"input": path, "script": path, "commands": [...]}``.
    """
    from tritonclient.utils import serialize_byte_tensor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = len(payloads.files)
    data = []
    for k in range(max(1, -(-n // payloads.batch_size))):
        _, arr = payloads.request(k)
        raw = serialize_byte_tensor(arr).item()
        data.append({protocol.GLAD_FILE_INPUT: {"content": {"b64": base64.b64encode(raw).decode("ascii")},
                                                "shape": list(arr.shape)}})
    (folder / "input_data.json").write_text(json.dumps({"data": data}))
    cmds = perf_analyzer_command(model, url, transport, streaming, mode, loads, settings)
    script = folder / "perf_analyzer.sh"
    script.write_text("#!/bin/sh\n# perf_analyzer on the same model, images and loads as glad perf "
                      "(written by glad perf --write-perf-analyzer-input)\nset -e\ncd \"$(dirname \"$0\")\"\n"
                      + "\n".join(cmds) + "\n")
    script.chmod(0o755)
    return {"input": folder / "input_data.json", "script": script, "commands": cmds}
