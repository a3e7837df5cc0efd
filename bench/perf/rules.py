"""The pure rules of ``glad perf`` (no server, no network): load ranges, arrival schedules, latency summaries,
perf_analyzer's stability rule, the server-statistics arithmetic and the CSV columns. Unit-tested in
``tests/unit/test_perf_rules.py``.

Units: times are seconds (float) unless a name says ``_us`` (microseconds) or ``_ns`` (nanoseconds, Triton's
statistics); rates are per second.
"""

from __future__ import annotations

import math
import re
from typing import Iterator, Mapping, Sequence

import numpy as np

from glad_runtime.errors import UsageError

__all__ = ["parse_range", "arrivals", "latency_summary", "is_stable", "STABILITY_WINDOWS", "model_stats_delta",
           "model_figures", "parse_prometheus", "metrics_delta", "glad_counters", "PA_COLUMNS", "csv_columns",
           "csv_row", "LATENCY_QUANTILES"]

#: perf_analyzer's ``stability_window``: the number of consecutive windows that must agree.
STABILITY_WINDOWS = 3
#: the latency quantiles reported per point (perf_analyzer's CSV has p50, p90, p95, p99).
LATENCY_QUANTILES = (50, 90, 95, 99)


def parse_range(text: str, *, integer: bool, what: str) -> list[float] | list[int]:
    """perf_analyzer's range syntax ``start[:end[:step]]`` -> the values, ``end`` included when a step lands on it.

    ``"1:16:2"`` (integers) -> 1, 3, 5, ..., 15 as perf_analyzer steps linearly; ``"1,2,4,8"`` lists values
    explicitly (the form this tool adds: powers of two are what one usually wants). ``"0.5:4:0.5"`` -> 0.5, 1.0,
    ..., 4.0. Default step 1.

    Raises:
        UsageError: a value that does not parse, a non-positive value or step, or ``end < start``.
    """
    s = str(text).strip()
    conv = int if integer else float
    malformed = UsageError(f"{what} {s!r}: expected start[:end[:step]] or a comma list of "
                           f"{'integers' if integer else 'numbers'}")
    try:
        parts = [conv(v) for v in s.split(",") if v.strip()] if "," in s else [conv(p) for p in s.split(":")]
    except ValueError:
        raise malformed from None
    if "," in s:
        values = parts
    else:
        if not 1 <= len(parts) <= 3:
            raise malformed
        start = parts[0]
        end = parts[1] if len(parts) > 1 else start
        step = parts[2] if len(parts) > 2 else conv(1)
        if step <= 0 or end < start:
            raise UsageError(f"{what} {s!r}: need start <= end and a step > 0")
        n = int(math.floor((end - start) / step + 1e-9)) + 1
        values = [conv(round(start + k * step, 9)) if not integer else start + k * step for k in range(n)]
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{what} {s!r}: values must be > 0")
    return values


def arrivals(rate: float, distribution: str = "poisson", seed: int = 0) -> Iterator[float]:
    """Arrival times (s from the start, increasing, unbounded) of an open-loop load of ``rate`` requests/s.

    ``poisson``: exponential gaps of mean ``1 / rate`` drawn from ``numpy.random.default_rng(seed)`` (the same seed
    gives the same schedule); ``constant``: one every ``1 / rate`` s, the first at ``1 / rate``.

    Raises:
        UsageError: ``rate <= 0`` or an unknown distribution.
    """
    if not rate > 0:
        raise UsageError(f"request rate must be > 0, got {rate}")
    if distribution not in ("poisson", "constant"):
        raise UsageError(f"arrival distribution must be poisson or constant, got {distribution!r}")
    rng = np.random.default_rng(seed)
    t = 0.0
    k = 0
    while True:
        k += 1
        if distribution == "constant":
            yield k / rate
        else:
            t += float(rng.exponential(1.0 / rate))
            yield t


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """``avg``, ``p50``, ``p90``, ``p95``, ``p99``, ``max`` and ``min`` of latencies, in **microseconds** (float;
    numpy's ``linear`` percentiles). Empty input: every value NaN."""
    v = np.asarray(latencies_s, dtype=np.float64) * 1e6
    if v.size == 0:
        return {k: float("nan") for k in ("avg", *(f"p{q}" for q in LATENCY_QUANTILES), "max", "min")}
    out = {"avg": float(v.mean())}
    out.update({f"p{q}": float(np.percentile(v, q)) for q in LATENCY_QUANTILES})
    out.update({"max": float(v.max()), "min": float(v.min())})
    return out


def is_stable(throughputs: Sequence[float], latencies: Sequence[float], tolerance: float = 0.10,
              windows: int = STABILITY_WINDOWS) -> bool:
    """perf_analyzer's stability rule (``InferenceProfiler::DetermineStability``): the last ``windows``
    measurements are stable when none has zero throughput and both ``max / min`` of their throughputs and
    ``max / min`` of their latencies (here p99, as perf_analyzer with ``--percentile=99``) are at most
    ``1 + tolerance``. Fewer than ``windows`` measurements, or a NaN, are not stable."""
    if len(throughputs) < windows or len(latencies) < windows:
        return False
    t = np.asarray(throughputs[-windows:], dtype=np.float64)
    lat = np.asarray(latencies[-windows:], dtype=np.float64)
    if not (np.isfinite(t).all() and np.isfinite(lat).all()) or (t <= 0).any() or (lat <= 0).any():
        return False
    return bool(t.max() / t.min() <= 1 + tolerance and lat.max() / lat.min() <= 1 + tolerance)


# ---------------------------------------------------------------------------------------------- server statistics
_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def _int(x) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        try:
            return int(float(x))
        except (TypeError, ValueError):
            return 0


def _flatten(model_stats: Mapping) -> dict[str, int]:
    """One model's entry of Triton's statistics extension (``/v2/models/<m>/stats``; gRPC as JSON, where int64
    values are strings) -> flat counters ``{"success_count", "success_ns", ..., "inference_count",
    "execution_count"}``."""
    inf = model_stats.get("inference_stats") or {}
    out = {}
    for k in _DURATIONS:
        d = inf.get(k) or {}
        out[f"{k}_count"] = _int(d.get("count"))
        out[f"{k}_ns"] = _int(d.get("ns"))
    out["inference_count"] = _int(model_stats.get("inference_count"))
    out["execution_count"] = _int(model_stats.get("execution_count"))
    return out


def model_stats_delta(before: Mapping, after: Mapping) -> dict[str, dict[str, int]]:
    """Counters of every model between two statistics snapshots (``{"model_stats": [...]}`` as the statistics
    extension returns them, all models), summed over versions: ``{model: {counter: after - before}}``. A model
    absent before counts from zero."""
    def by_model(snap: Mapping) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for m in snap.get("model_stats") or []:
            flat = _flatten(m)
            acc = out.setdefault(m.get("name", ""), {k: 0 for k in flat})
            for k, v in flat.items():
                acc[k] += v
        return out

    b, a = by_model(before), by_model(after)
    return {name: {k: v - b.get(name, {}).get(k, 0) for k, v in counters.items()} for name, counters in a.items()}


def model_figures(delta: Mapping[str, int]) -> dict[str, float]:
    """One model's window from :func:`model_stats_delta`: ``requests`` (success + fail), ``success``, ``fail``,
    ``executions``, ``inferences``, ``batch`` (inferences per execution: the achieved batch size; NaN without an
    execution) and the averages per request in **microseconds** ``queue_us``, ``compute_input_us``,
    ``compute_infer_us``, ``compute_output_us`` and ``request_us`` (Triton's whole request time, success only)."""
    def avg(k: str) -> float:
        c = delta.get(f"{k}_count", 0)
        return delta.get(f"{k}_ns", 0) / c / 1e3 if c else float("nan")

    ex = delta.get("execution_count", 0)
    return {"requests": delta.get("success_count", 0) + delta.get("fail_count", 0),
            "success": delta.get("success_count", 0), "fail": delta.get("fail_count", 0),
            "executions": ex, "inferences": delta.get("inference_count", 0),
            "batch": delta.get("inference_count", 0) / ex if ex else float("nan"),
            "queue_us": avg("queue"), "compute_input_us": avg("compute_input"),
            "compute_infer_us": avg("compute_infer"), "compute_output_us": avg("compute_output"),
            "request_us": avg("success")}


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text exposition (Triton's ``/metrics``) -> ``{(name, sorted label pairs): value}``; comments
    and unparsable lines are skipped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        out[(m.group(1), labels)] = value
    return out


def metrics_delta(before: Mapping, after: Mapping, prefix: str = "glad_") -> dict:
    """Counter and histogram deltas of the series named ``prefix*`` between two :func:`parse_prometheus`
    snapshots; gauges (``glad_inflight_images``) keep their value after. ``{(name, labels): value}``."""
    out = {}
    for key, v in after.items():
        if not key[0].startswith(prefix):
            continue
        out[key] = v if key[0] == "glad_inflight_images" else v - before.get(key, 0.0)
    return out


def glad_counters(delta: Mapping, model: str) -> dict:
    """The GLAD counters of one entry model from :func:`metrics_delta`, grouped: ``images`` (sum of
    ``glad_images_total``), ``images_by_label``, ``image_errors`` (``glad_errors_total`` by type), ``rejected``,
    ``abandoned``, ``malformed`` (by reason), ``ads`` (``glad_ads_decisions_total`` by state),
    ``ddim_steps_saved``, ``adaptive_step_buckets`` (the histogram's cumulative ``le`` counts) and
    ``inflight_images`` (the gauge, in-flight model)."""
    groups = {"glad_images_total": ("images_by_label", "label"), "glad_errors_total": ("image_errors", "type"),
              "glad_requests_rejected_total": ("rejected", "reason"),
              "glad_requests_abandoned_total": ("abandoned", "reason"),
              "glad_requests_malformed_total": ("malformed", "reason"),
              "glad_ads_decisions_total": ("ads", "state")}
    out: dict = {g: {} for g, _ in groups.values()}
    out.update({"ddim_steps_saved": 0.0, "adaptive_step_buckets": {}, "inflight_images": None})
    for (name, labels), v in delta.items():
        lab = dict(labels)
        if lab.get("model") != model:
            continue
        if name in groups:
            g, key = groups[name]
            out[g][lab.get(key, "")] = out[g].get(lab.get(key, ""), 0.0) + v
        elif name == "glad_ddim_steps_saved_total":
            out["ddim_steps_saved"] += v
        elif name == "glad_adaptive_step_bucket":
            out["adaptive_step_buckets"][lab.get("le", "")] = v
        elif name == "glad_inflight_images":
            out["inflight_images"] = v
    out["images"] = sum(out["images_by_label"].values())
    return out


# ---------------------------------------------------------------------------------------------- CSV
#: perf_analyzer's CSV columns (``ReportWriter::GenerateReport`` with server statistics and ``--verbose-csv``), in
#: its order, microseconds; the first is ``Concurrency`` or ``Request Rate``. ``Client Send`` / ``Client Recv``
#: (serialisation inside tritonclient) are not measured here and are left empty.
PA_COLUMNS = ("Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue",
              "Server Compute Input", "Server Compute Infer", "Server Compute Output", "Client Recv",
              "p50 latency", "p90 latency", "p95 latency", "p99 latency", "Avg latency")
#: the columns this tool adds after perf_analyzer's (GLAD figures, counts, the server's network models)
EXTRA_COLUMNS = ("Model", "Batch Size", "Images/Second", "Max latency", "Requests", "Images", "Errors", "Rejections",
                 "Server Requests", "Server Images", "Counts Match", "Stable", "Windows", "Interrupted",
                 "Tool Ceiling Inferences/Second", "Tool p50 latency")


def csv_columns(mode: str, networks: Sequence[str] = ()) -> list[str]:
    """The CSV header of one run: ``Concurrency`` or ``Request Rate`` (``mode`` ``concurrency`` /
    ``request_rate``), :data:`PA_COLUMNS`, :data:`EXTRA_COLUMNS`, then per network model ``<m> Requests``,
    ``<m> Executions``, ``<m> Batch Size``, ``<m> Server Queue`` and ``<m> Server Compute Infer`` (us)."""
    first = {"concurrency": "Concurrency", "request_rate": "Request Rate"}[mode]
    cols = [first, *PA_COLUMNS, *EXTRA_COLUMNS]
    for m in networks:
        cols += [f"{m} Requests", f"{m} Executions", f"{m} Batch Size", f"{m} Server Queue",
                 f"{m} Server Compute Infer"]
    return cols


def _num(x, digits: int = 0):
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, (int, np.integer)):
        return int(x)
    x = float(x)
    if not math.isfinite(x):
        return ""
    return round(x, digits) if digits else int(round(x))


def csv_row(point: Mapping, networks: Sequence[str] = ()) -> dict:
    """One measured point (``bench.perf.load.measure_point``'s dict) -> ``{column: value}`` for
    :func:`csv_columns`: latencies in integer microseconds (perf_analyzer's unit), rates to 3 decimals, NaN and
    unknown values empty."""
    c, s = point["client"], point.get("server") or {}
    entry = (s.get("models") or {}).get(point["model"], {})
    lat = c["latency_us"]
    accounted = sum(entry.get(k, float("nan")) for k in ("queue_us", "compute_input_us", "compute_infer_us",
                                                         "compute_output_us")) if entry else float("nan")
    net = lat["avg"] - accounted if math.isfinite(accounted) else float("nan")
    first = "Concurrency" if point["mode"] == "concurrency" else "Request Rate"
    rec = point.get("reconciliation") or {}
    over = point.get("overhead") or {}
    row = {first: point["load"], "Inferences/Second": _num(c["requests_per_s"], 3), "Client Send": "",
           "Network+Server Send/Recv": _num(max(net, 0.0) if math.isfinite(net) else net),
           "Server Queue": _num(entry.get("queue_us")), "Server Compute Input": _num(entry.get("compute_input_us")),
           "Server Compute Infer": _num(entry.get("compute_infer_us")),
           "Server Compute Output": _num(entry.get("compute_output_us")), "Client Recv": "",
           "p50 latency": _num(lat["p50"]), "p90 latency": _num(lat["p90"]), "p95 latency": _num(lat["p95"]),
           "p99 latency": _num(lat["p99"]), "Avg latency": _num(lat["avg"]),
           "Model": point["model"], "Batch Size": point["batch_size"], "Images/Second": _num(c["images_per_s"], 3),
           "Max latency": _num(lat["max"]), "Requests": c["requests"], "Images": c["images"],
           "Errors": c["errors"], "Rejections": c["rejections"], "Server Requests": _num(rec.get("server_requests")),
           "Server Images": _num(rec.get("server_images")), "Counts Match": _num(rec.get("match")),
           "Stable": _num(point.get("stable")), "Windows": point.get("windows_run", ""),
           "Interrupted": _num(point.get("interrupted", False)),
           "Tool Ceiling Inferences/Second": _num(over.get("requests_per_s"), 3),
           "Tool p50 latency": _num((over.get("latency_us") or {}).get("p50"))}
    for m in networks:
        f = (s.get("models") or {}).get(m, {})
        row.update({f"{m} Requests": _num(f.get("requests")), f"{m} Executions": _num(f.get("executions")),
                    f"{m} Batch Size": _num(f.get("batch"), 3), f"{m} Server Queue": _num(f.get("queue_us")),
                    f"{m} Server Compute Infer": _num(f.get("compute_infer_us"))})
    return row
