"""``glad perf --sweep BUNDLE``: Model Analyzer's job for one GLAD bundle on this machine.

For every configuration of a grid (the cartesian product of ``--sweep-set KEY=V1,V2,...``; keys in
:data:`SWEEP_KEYS`: instance counts, the dynamic batcher's delay, the in-flight pool, ONNX Runtime threads, the
request cap), a model repository is generated (:func:`triton_models.repository.generate_repository`, prefix
``perf``), a local ``tritonserver`` started on it (:func:`triton_models.server.launch_server`), each load point
measured on the chosen entry model (:func:`bench.perf.load.measure_point`, the same rules as ``glad perf URL``)
and the server stopped. The **best** configuration is the one with the highest throughput (images/s) at any of
its load points whose p99 latency is within ``--p99-ms`` with no failed request; it is written as the ``glad serve``
command line that serves it, then **re-measured** on a fresh server in the same run (the confirmation, with the
ratio of its throughput and p99 to the first measurement).

Client and server share this machine's cores: what is found is the best configuration for this machine with the
client on it; on a GPU host, rerun there.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import threading
from pathlib import Path
from typing import Mapping, Sequence

from bench.perf.load import Payloads, Settings, connect, measure_point
from glad_runtime.errors import UsageError
from glad_runtime.serving import protocol

__all__ = ["SWEEP_KEYS", "DEFAULT_GRIDS", "parse_grid", "configurations", "serve_command", "repository_options",
           "best_point", "run_sweep", "sweep_markdown"]

#: sweepable settings: key -> (``glad serve`` flag, allowed minimum, ``generate_repository`` argument)
SWEEP_KEYS = {"glad_instances": ("--glad-instances", 1, "glad_instances"),
              "instances": ("--instances", 1, "instances"),
              "queue_delay_us": ("--queue-delay-us", 0, "queue_delay_us"),
              "threads": ("--threads", 0, "intra_op_threads"),
              "inflight_max_active": ("--inflight-max-active", 1, "inflight_max_active"),
              "inflight_max_queue": ("--inflight-max-queue", 0, "inflight_max_queue"),
              "max_batch": ("--max-batch", 1, "max_batch")}


def repository_options(config: Mapping[str, int]) -> dict[str, int]:
    """A configuration's keys as :func:`triton_models.repository.generate_repository` arguments."""
    return {SWEEP_KEYS[k][2]: v for k, v in config.items()}
#: the default grid per entry model (6 configurations each)
DEFAULT_GRIDS = {protocol.GLAD_MODEL: {"glad_instances": [1, 2, 3], "threads": [0, 1]},
                 protocol.INFLIGHT_MODEL: {"inflight_max_active": [2, 4, 8], "threads": [0, 1]}}


def parse_grid(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["glad_instances=1,2", "threads=0,1"]`` -> ``{"glad_instances": [1, 2], "threads": [0, 1]}`` (dashes
    may stand for underscores: ``glad-instances=1,2``).

    Raises:
        UsageError: an unknown key (the known ones are listed), a value that is not an integer or is below the
        key's minimum, or a key given twice.
    """
    grid: dict[str, list[int]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_").lstrip("_")
        if not sep or key not in SWEEP_KEYS:
            raise UsageError(f"--sweep-set {spec!r}: expected KEY=V1,V2 with KEY one of {', '.join(SWEEP_KEYS)}")
        if key in grid:
            raise UsageError(f"--sweep-set: {key} given twice")
        try:
            vals = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--sweep-set {spec!r}: values must be integers") from None
        low = SWEEP_KEYS[key][1]
        if not vals or any(v < low for v in vals):
            raise UsageError(f"--sweep-set {spec!r}: values must be >= {low}")
        grid[key] = sorted(set(vals))
    return grid


def configurations(grid: Mapping[str, Sequence[int]]) -> list[dict[str, int]]:
    """The cartesian product of ``grid``, in order (first key slowest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def serve_command(bundle: str | Path, config: Mapping[str, int], repo: str = "models") -> str:
    """The ``glad serve`` command line that serves ``bundle`` with ``config`` (flags of :data:`SWEEP_KEYS`)."""
    flags = " ".join(f"{SWEEP_KEYS[k][0]} {v}" for k, v in config.items())
    return f"glad serve {bundle} --repo {repo} {flags} --start".replace("  ", " ")


def best_point(rows: Sequence[dict], p99_ms: float) -> tuple[int, int] | None:
    """``(configuration index, point index)`` of the highest images/s among the points with p99 <= ``p99_ms``,
    no failed request and not interrupted; None when no point qualifies."""
    best, key = None, -1.0
    for i, row in enumerate(rows):
        for j, p in enumerate(row["points"]):
            c = p["client"]
            p99 = c["latency_us"]["p99"] / 1e3
            if p["interrupted"] or c["errors"] or not c["ok"] or not p99 <= p99_ms:
                continue
            if c["images_per_s"] > key:
                best, key = (i, j), c["images_per_s"]
    return best


def _measure_config(bundle, config: Mapping[str, int], folder: Path, suffix: str, payloads: Payloads, mode: str,
                    loads: Sequence[float], settings: Settings, stop: threading.Event, bar) -> list[dict]:
    from triton_models.repository import generate_repository
    from triton_models.server import launch_server

    repo = folder / "models"
    shutil.rmtree(repo, ignore_errors=True)
    generate_repository(bundle, repo, prefix="perf", **repository_options(config))
    points = []
    with launch_server(repo, ready_timeout=300, log_path=folder / "tritonserver.log") as srv:
        t = connect(srv.grpc_url, protocol.model_name("perf", suffix), metrics_url=srv.metrics_url)
        for load in loads:
            if stop.is_set():
                break
            bar.set_description(f"{' '.join(f'{k}={v}' for k, v in config.items())} load {load:g}")
            points.append(measure_point(t, payloads, mode, load, settings, stop=stop))
            bar.update(1)
    return points


def run_sweep(bundle, out: str | Path, *, payloads: Payloads, mode: str, loads: Sequence[float],
              settings: Settings, p99_ms: float, model: str = protocol.GLAD_MODEL,
              grid: Mapping[str, Sequence[int]] | None = None, stop: threading.Event | None = None,
              quiet: bool = False) -> dict:
    """Measure every configuration, pick the best under ``p99_ms`` and re-measure it (module docstring).

    Args:
        bundle: an exported bundle (``glad export``). out: working folder (a repository and a server log per
            configuration under ``out/sweep/``).
        model: ``"glad"`` (the per-batch entry model) or ``"glad_inflight"``.
        grid: ``{key: values}`` (:func:`parse_grid`); None: :data:`DEFAULT_GRIDS` of the model.
        p99_ms: the latency budget (milliseconds, client-side p99).
    Returns:
        ``{"bundle", "model", "p99_ms", "grid", "configurations": [{"config", "serve", "points"}], "best":
        {"config", "load", "serve", "images_per_s", "p99_ms", "confirm": {"images_per_s", "p99_ms",
        "within_budget", "throughput_ratio", "p99_ratio"}} or None, "interrupted"}``.
    Raises:
        UsageError: an unknown model, or the in-flight model with a grid on a repository without it.
    """
    from tqdm import tqdm

    from glad_runtime.core.bundle import Bundle

    if model not in protocol.ENTRY_MODELS:
        raise UsageError(f"--sweep-model must be one of {protocol.ENTRY_MODELS}, got {model!r}")
    stop = stop or threading.Event()
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    grid = dict(grid or DEFAULT_GRIDS[model])
    configs = configurations(grid)
    root = Path(out) / "sweep"
    res: dict = {"bundle": str(b.path), "model": model, "p99_ms": p99_ms, "grid": grid, "mode": mode,
                 "loads": list(loads), "configurations": [], "best": None, "interrupted": False}
    with tqdm(total=len(configs) * len(loads) + 1, desc="glad perf --sweep", unit="point", file=sys.stderr,
              disable=quiet, dynamic_ncols=True) as bar:
        for i, cfg in enumerate(configs):
            if stop.is_set():
                break
            pts = _measure_config(b, cfg, root / f"config-{i}", model, payloads, mode, loads, settings, stop, bar)
            res["configurations"].append({"config": cfg, "serve": serve_command(b.path, cfg), "points": pts})
        pick = best_point(res["configurations"], p99_ms) if not stop.is_set() else None
        if pick is not None:
            i, j = pick
            row, p = res["configurations"][i], res["configurations"][i]["points"][j]
            best = {"config": row["config"], "load": p["load"], "serve": row["serve"],
                    "images_per_s": p["client"]["images_per_s"], "p99_ms": p["client"]["latency_us"]["p99"] / 1e3}
            bar.set_description("re-measuring the best configuration")
            again = _measure_config(b, row["config"], root / "confirm", model, payloads, mode, [p["load"]],
                                    settings, stop, bar)
            if again:
                c = again[0]["client"]
                best["confirm"] = {"images_per_s": c["images_per_s"], "p99_ms": c["latency_us"]["p99"] / 1e3,
                                   "within_budget": bool(c["latency_us"]["p99"] / 1e3 <= p99_ms and not c["errors"]),
                                   "throughput_ratio": c["images_per_s"] / best["images_per_s"],
                                   "p99_ratio": c["latency_us"]["p99"] / 1e3 / best["p99_ms"],
                                   "point": again[0]}
            res["best"] = best
    res["interrupted"] = stop.is_set()
    return res


def sweep_markdown(res: dict) -> str:
    """One row per configuration and load: throughput, p50 / p99, errors, within the budget; then the best one,
    its ``glad serve`` line and the re-measurement."""
    unit = "concurrency" if res["mode"] == "concurrency" else "req/s"
    keys = list(res["grid"])
    lines = ["| " + " | ".join(keys) + f" | {unit} | images/s | p50 ms | p99 ms | errors | within {res['p99_ms']:g} ms |",
             "|" + "---|" * (len(keys) + 6)]
    for row in res["configurations"]:
        for p in row["points"]:
            c = p["client"]
            p99 = c["latency_us"]["p99"] / 1e3
            lines.append("| " + " | ".join(str(row["config"][k]) for k in keys)
                         + f" | {p['load']:g} | {c['images_per_s']:.2f} | {c['latency_us']['p50'] / 1e3:.0f} | "
                           f"{p99:.0f} | {c['errors']} | {'yes' if p99 <= res['p99_ms'] and not c['errors'] else 'no'} |")
    best = res.get("best")
    if best is None:
        lines += ["", f"No configuration met p99 <= {res['p99_ms']:g} ms without errors."]
    else:
        cfg = ", ".join(f"{k}={v}" for k, v in best["config"].items())
        lines += ["", f"Best under p99 {res['p99_ms']:g} ms: {cfg} at {unit} {best['load']:g}: "
                      f"{best['images_per_s']:.2f} images/s, p99 {best['p99_ms']:.0f} ms.", "",
                  f"    {best['serve']}", ""]
        conf = best.get("confirm")
        if conf:
            lines.append(f"Re-measured on a fresh server: {conf['images_per_s']:.2f} images/s "
                         f"({conf['throughput_ratio']:.2f}x), p99 {conf['p99_ms']:.0f} ms ({conf['p99_ratio']:.2f}x), "
                         f"{'within' if conf['within_budget'] else 'NOT within'} the budget.")
    return "\n".join(lines)
