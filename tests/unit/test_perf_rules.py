"""``glad perf``'s pure rules (issue 28): ranges, arrival schedules, perf_analyzer's stability rule on synthetic
window series, Triton statistics and /metrics deltas, error types, the CSV columns, the perf_analyzer input, the
sweep grid and the reports. No server here: ``tests/serving/test_perf.py`` drives a real one."""

from __future__ import annotations

import base64
import csv
import json
import math
import struct
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from bench.perf import rules
from bench.perf.load import Payloads, Settings, classify_failure, parse_url
from glad_runtime.errors import UsageError

# perf_analyzer's CSV header (ReportWriter, server statistics and --verbose-csv, percentile 99 set)
PA_HEADER = ["Concurrency", "Inferences/Second", "Client Send", "Network+Server Send/Recv", "Server Queue",
             "Server Compute Input", "Server Compute Infer", "Server Compute Output", "Client Recv", "p50 latency",
             "p90 latency", "p95 latency", "p99 latency"]


# ---------------------------------------------------------------------------------------------- ranges, schedules
def test_parse_range_as_perf_analyzer_and_lists():
    assert rules.parse_range("1:16:2", integer=True, what="c") == [1, 3, 5, 7, 9, 11, 13, 15]
    assert rules.parse_range("1:4", integer=True, what="c") == [1, 2, 3, 4]
    assert rules.parse_range("8", integer=True, what="c") == [8]
    assert rules.parse_range("1,2,4,8", integer=True, what="c") == [1, 2, 4, 8]
    assert rules.parse_range("0.5:4:0.5", integer=False, what="r") == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    for bad in ("0:4", "4:1", "1:4:0", "a", "1:2:3:4", "1.5:3"):
        with pytest.raises(UsageError):
            rules.parse_range(bad, integer=True, what="--concurrency")


def test_arrivals_seeded_poisson_and_constant():
    take = lambda g, n: [next(g) for _ in range(n)]  # noqa: E731
    a = take(rules.arrivals(2.0, "poisson", seed=3), 4000)
    assert a == take(rules.arrivals(2.0, "poisson", seed=3), 4000)  # same seed, same schedule
    assert a != take(rules.arrivals(2.0, "poisson", seed=4), 4000)
    gaps = np.diff([0.0] + a)
    assert (gaps > 0).all() and abs(gaps.mean() - 0.5) < 0.03  # mean gap 1 / rate
    assert take(rules.arrivals(4.0, "constant"), 3) == [0.25, 0.5, 0.75]
    with pytest.raises(UsageError):
        next(rules.arrivals(0.0))
    with pytest.raises(UsageError):
        next(rules.arrivals(1.0, "bursty"))


def test_latency_summary_in_microseconds():
    s = rules.latency_summary([0.1, 0.2, 0.3, 0.4])
    assert s["avg"] == pytest.approx(250_000) and s["max"] == pytest.approx(400_000)
    assert s["p50"] == pytest.approx(250_000) and s["min"] == pytest.approx(100_000)
    assert set(s) == {"avg", "p50", "p90", "p95", "p99", "max", "min"}
    assert all(math.isnan(v) for v in rules.latency_summary([]).values())


# ---------------------------------------------------------------------------------------------- stability
def _windows(latencies_s, per_window: int, window_s: float = 1.0):
    """Split a synthetic latency series into windows of ``per_window`` requests: (throughput, p99 us) each."""
    out = []
    for k in range(0, len(latencies_s) - per_window + 1, per_window):
        w = latencies_s[k:k + per_window]
        out.append((len(w) / window_s, rules.latency_summary(w)["p99"]))
    return out


def test_stability_rule_on_a_synthetic_latency_series():
    """A warm-up transient (latencies falling from 2 s) then a steady state around 0.5 s with 3 % noise: the rule
    first holds at the third steady window, as perf_analyzer's DetermineStability would decide."""
    rng = np.random.default_rng(0)
    warm = list(np.linspace(2.0, 0.6, 40))
    steady = list(0.5 * (1 + 0.03 * rng.standard_normal(200)))
    wins = _windows(warm + steady, per_window=20)
    first = next(i for i in range(len(wins)) if rules.is_stable([t for t, _ in wins[:i + 1]],
                                                                [p for _, p in wins[:i + 1]], 0.10))
    assert first == 4  # windows 0-1 are the transient; 2, 3, 4 are the first three steady ones
    assert not rules.is_stable([t for t, _ in wins[:4]], [p for _, p in wins[:4]], 0.10)


def test_stability_rule_edges():
    assert rules.is_stable([10, 10.5, 11], [100, 105, 110], 0.10)  # max / min = 1.1 exactly: stable
    assert not rules.is_stable([10, 10.5, 11.2], [100, 100, 100], 0.10)  # throughput spread 12 %
    assert not rules.is_stable([10, 10, 10], [100, 100, 112], 0.10)  # p99 spread 12 %
    assert not rules.is_stable([10, 10], [100, 100], 0.10)  # fewer than three windows
    assert not rules.is_stable([0, 0, 0], [100, 100, 100], 0.10)  # no request completed
    assert not rules.is_stable([10, 10, 10], [float("nan"), 100, 100], 0.10)  # a window without an answer
    assert rules.is_stable([1, 50, 10, 10, 10], [9, 1, 100, 100, 100], 0.10)  # only the last three count
    assert rules.is_stable([10, 10, 12], [100, 100, 100], 0.25)  # the tolerance


# ---------------------------------------------------------------------------------------------- server statistics
def _stats(name, success, ns, queue_ns, infer_ns, inferences, executions, as_str=False, version="1"):
    f = str if as_str else int
    return {"name": name, "version": version, "inference_count": f(inferences), "execution_count": f(executions),
            "inference_stats": {"success": {"count": f(success), "ns": f(ns)}, "fail": {},
                                "queue": {"count": f(success), "ns": f(queue_ns)},
                                "compute_input": {"count": f(success), "ns": f(1000 * success)},
                                "compute_infer": {"count": f(success), "ns": f(infer_ns)},
                                "compute_output": {"count": f(success), "ns": f(2000 * success)}}}


def test_statistics_deltas_and_figures():
    before = {"model_stats": [_stats("p_glad", 4, 4e9, 4e6, 3e9, 4, 4), _stats("p_unet", 40, 1e9, 1e7, 8e8, 40, 30)]}
    after = {"model_stats": [_stats("p_glad", 10, 10e9, 16e6, 9e9, 10, 10, as_str=True),  # gRPC JSON: strings
                             _stats("p_unet", 100, 3e9, 7e7, 2e9, 100, 60),
                             _stats("p_unet", 5, 1e8, 1e6, 5e7, 5, 5, version="2")]}  # versions are summed
    d = rules.model_stats_delta(before, after)
    g = rules.model_figures(d["p_glad"])
    assert g["requests"] == 6 and g["executions"] == 6 and g["batch"] == 1.0
    assert g["queue_us"] == pytest.approx(2000.0) and g["compute_infer_us"] == pytest.approx(1e6)
    assert g["compute_input_us"] == pytest.approx(1.0) and g["compute_output_us"] == pytest.approx(2.0)
    u = rules.model_figures(d["p_unet"])
    assert u["requests"] == 65 and u["executions"] == 35 and u["batch"] == pytest.approx(65 / 35)
    assert math.isnan(rules.model_figures({})["batch"])


METRICS = """# HELP glad_images_total images
# TYPE glad_images_total counter
glad_images_total{label="normal",model="p_glad"} 7
glad_images_total{label="anomalous",model="p_glad"} 3
glad_images_total{label="normal",model="p_glad_inflight"} 99
glad_errors_total{model="p_glad",type="ImageLoadError"} 1
glad_requests_rejected_total{model="p_glad_inflight",reason="pool_full"} 4
glad_adaptive_step_bucket{le="180",model="p_glad"} 6
glad_inflight_images{model="p_glad_inflight"} 2
nv_inference_count{model="p_glad",version="1"} 11
"""


def test_prometheus_parsing_and_glad_counters():
    after = rules.parse_prometheus(METRICS)
    before = rules.parse_prometheus('glad_images_total{label="normal",model="p_glad"} 2\n'
                                    'glad_requests_rejected_total{model="p_glad_inflight",reason="pool_full"} 1\n')
    delta = rules.metrics_delta(before, after)
    assert ("nv_inference_count", (("model", "p_glad"), ("version", "1"))) not in delta  # glad_* only
    g = rules.glad_counters(delta, "p_glad")
    assert g["images"] == 8 and g["images_by_label"] == {"normal": 5, "anomalous": 3}
    assert g["image_errors"] == {"ImageLoadError": 1} and g["adaptive_step_buckets"] == {"180": 6}
    i = rules.glad_counters(delta, "p_glad_inflight")
    assert i["rejected"] == {"pool_full": 3} and i["inflight_images"] == 2  # a gauge keeps its value


def test_failure_types():
    assert classify_failure("[UNAVAILABLE] in-flight pool full (4 images)") == "rejected: pool full"
    assert classify_failure("[UNAVAILABLE] model closing") == "rejected: closing"
    assert classify_failure("Request timeout expired", "StatusCode.UNAVAILABLE") == "rejected: queue timeout"
    assert classify_failure("[UNAVAILABLE] deadline exceeded: request timeout expired (1.000 s)") == \
        "deadline (server)"
    assert classify_failure("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED") == "deadline (client)"
    assert classify_failure("bad image", "StatusCode.INVALID_ARGUMENT") == "INVALID_ARGUMENT"
    assert classify_failure("bad image", "400") == "INVALID_ARGUMENT"
    assert classify_failure("[INTERNAL] boom") == "INTERNAL"


def test_url_parsing():
    assert parse_url("localhost:8001") == ("localhost:8001", "grpc")
    assert parse_url("http://localhost:8000/") == ("localhost:8000", "http")
    assert parse_url("localhost", "http") == ("localhost:8000", "http")
    assert parse_url("grpc://h") == ("h:8001", "grpc")
    with pytest.raises(UsageError):
        parse_url("http://h:8000", "grpc")
    with pytest.raises(UsageError):
        parse_url("ftp://h:1")


# ---------------------------------------------------------------------------------------------- CSV
def _point(load=2, label="p_glad", mode="concurrency"):
    lat = {"avg": 4.2e5, "p50": 4e5, "p90": 5e5, "p95": 5.5e5, "p99": 6e5, "max": 6.5e5, "min": 3e5}
    entry = {"requests": 6, "success": 6, "fail": 0, "executions": 6, "inferences": 6, "batch": 1.0,
             "queue_us": 500.0, "compute_input_us": 40.0, "compute_infer_us": 4e5, "compute_output_us": 1800.0,
             "request_us": 4.03e5}
    unet = dict(entry, requests=30, executions=20, batch=1.5, queue_us=600.0, compute_infer_us=13000.0)
    return {"model": label, "label": label, "mode": mode, "load": load, "batch_size": 1, "streaming": False,
            "protocol": "grpc", "stable": True, "windows_run": 3, "interrupted": False,
            "client": {"requests": 6, "ok": 6, "errors": 0, "rejections": 0, "images": 6, "images_ok": 6,
                       "requests_per_s": 2.5, "images_per_s": 2.5, "latency_us": lat, "errors_by_type": {},
                       "image_errors_by_type": {}, "adaptive_steps": {"181": 6}, "delayed": 0},
            "server": {"models": {label: entry, "p_unet": unet}, "glad": None},
            "reconciliation": {"client_requests": 8, "server_requests": 8, "client_images": 8, "server_images": 8,
                               "match": True},
            "scores": {"by_file": {"a.png": 0.1}, "max_spread": 0.0},
            "overhead": {"requests_per_s": 300.0, "latency_us": dict(lat, p50=5000.0)}}


def test_csv_columns_are_perf_analyzers_and_read_back(tmp_path):
    from bench.perf.run import write_csv

    cols = rules.csv_columns("concurrency", ["p_unet"])
    assert cols[:len(PA_HEADER)] == PA_HEADER and cols[len(PA_HEADER)] == "Avg latency"
    assert rules.csv_columns("request_rate")[0] == "Request Rate"
    assert "p_unet Batch Size" in cols and len(cols) == len(set(cols))
    path = write_csv([_point(1), _point(2)], tmp_path / "perf.csv", "concurrency", ["p_unet"])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == cols and len(rows) == 2
    r = rows[1]
    assert r["Concurrency"] == "2" and float(r["Inferences/Second"]) == 2.5
    assert r["p99 latency"] == "600000" and r["Avg latency"] == "420000"  # microseconds, as perf_analyzer
    assert r["Server Queue"] == "500" and r["Server Compute Infer"] == "400000"
    # client-side wait not explained by the server's queue + compute: 420000 - (500 + 40 + 400000 + 1800)
    assert r["Network+Server Send/Recv"] == "17660"
    assert r["Client Send"] == "" and r["Client Recv"] == ""  # not measured: empty, never a made-up 0
    assert r["p_unet Batch Size"] == "1.5" and r["Counts Match"] == "true" and r["Server Requests"] == "8"
    assert float(r["Tool Ceiling Inferences/Second"]) == 300.0


def test_reports_markdown_svg_and_compare(tmp_path):
    from bench.perf.run import compare, write_reports

    a, b = _point(1, "A"), _point(1, "B")
    b["client"] = dict(b["client"], requests_per_s=5.0, latency_us=dict(b["client"]["latency_us"], p99=3e5))
    b["scores"] = {"by_file": {"a.png": 0.1 + 2e-7}, "max_spread": 0.0}
    b["server"] = {"models": {"B": a["server"]["models"]["A"], "p_unet": a["server"]["models"]["p_unet"]}}
    cmp = compare([a, b], "A", "B")
    assert cmp[0]["requests_per_s_ratio"] == 2.0 and cmp[0]["p99_ratio"] == 0.5
    assert cmp[0]["max_score_diff"] == pytest.approx(2e-7, abs=1e-12) and cmp[0]["compared_files"] == 1
    res = {"started": "now", "host": {"cpu": "cpu", "cores": 2, "load_average_1min": 0.5}, "mode": "concurrency",
           "loads": [1], "batch_size": 1, "settings": Settings().__dict__, "images": ["a.png"],
           "targets": [{"label": "A", "networks": ["p_unet"]}, {"label": "B", "networks": ["p_unet"]}],
           "points": [a, b], "compare": cmp, "overhead": None, "verify": None, "interrupted": False}
    paths = write_reports(res, tmp_path)
    assert {"json", "md", "svg", "compare"} <= set(paths)
    json.loads((tmp_path / "perf.json").read_text())
    md = (tmp_path / "perf.md").read_text()
    assert "| `A` | 1 | 2.50 |" in md and "8 / 8" in md
    root = ET.parse(tmp_path / "perf.svg").getroot()  # well-formed SVG
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 4
    with open(tmp_path / "compare.csv", newline="") as f:
        assert next(csv.reader(f))[:4] == ["Concurrency", "A", "B", "Inferences/Second Ratio"]


# ---------------------------------------------------------------------------------------------- perf_analyzer input
def test_perf_analyzer_input_and_command(tmp_path):
    from bench.perf.run import perf_analyzer_command, write_perf_analyzer_input

    files = [(f"f{i}.png", b"\x89PNG" + bytes([i]) * (10 + i)) for i in range(5)]
    p = Payloads(files, batch_size=2)
    info = write_perf_analyzer_input(tmp_path, p, model="p_glad_inflight", url="h:8001", transport="grpc",
                                     streaming=True, mode="concurrency", loads=[1, 3, 5],
                                     settings=Settings(map_size="original"))
    data = json.loads(info["input"].read_text())["data"]
    assert len(data) == 3  # ceil(5 / 2) requests, files dealt round robin as glad perf sends them
    for k, entry in enumerate(data):
        t = entry["image_files"]
        assert t["shape"] == [2, 1] and set(entry) == {"image_files"}
        raw = base64.b64decode(t["content"]["b64"])
        got, pos = [], 0
        while pos < len(raw):  # Triton's BYTES serialisation: 4-byte little-endian length, then the bytes
            (n,) = struct.unpack_from("<I", raw, pos)
            got.append(raw[pos + 4:pos + 4 + n])
            pos += 4 + n
        assert got == [files[(2 * k + j) % 5][1] for j in range(2)]
    (cmd,) = info["commands"]
    assert cmd.startswith("perf_analyzer -m p_glad_inflight -u h:8001 -i grpc --input-data input_data.json")
    assert "--streaming" in cmd and "--concurrency-range 1:5:2" in cmd and "--percentile=99" in cmd
    assert "--request-parameter=map_size:original:string" in cmd and "-f perf_analyzer.csv" in cmd
    assert info["script"].read_text().count("perf_analyzer -m") == 1
    # a list that is no arithmetic range: one command per value; a rate; a count instead of windows
    cmds = perf_analyzer_command("p_glad", "h:8000", "http", False, "request_rate", [0.5, 1, 4],
                                 Settings(request_count=50))
    assert len(cmds) == 3 and "--request-rate-range 4:4" in cmds[2] and "--streaming" not in cmds[0]
    assert "--measurement-mode=count_windows --measurement-request-count=50" in cmds[0]
    assert "--request-parameter" not in cmds[0]  # map_size working is the served default


# ---------------------------------------------------------------------------------------------- sweep
def test_sweep_grid_best_and_serve_command():
    from bench.perf.sweep import best_point, configurations, parse_grid, serve_command

    grid = parse_grid(["glad-instances=1,2", "threads=0,1", "queue_delay_us=500"])
    assert grid == {"glad_instances": [1, 2], "threads": [0, 1], "queue_delay_us": [500]}
    cfgs = configurations(grid)
    assert len(cfgs) == 4 and cfgs[1] == {"glad_instances": 1, "threads": 1, "queue_delay_us": 500}
    assert serve_command("B", cfgs[3]) == \
        "glad serve B --repo models --glad-instances 2 --threads 1 --queue-delay-us 500 --start"
    # every key is a generate_repository argument and a glad serve flag
    import inspect

    from bench.perf.sweep import SWEEP_KEYS, repository_options
    from glad_cli.commands.serve import serve_cmd
    from triton_models.repository import generate_repository

    args = set(inspect.signature(generate_repository).parameters)
    flags = {o for p in serve_cmd.params for o in p.opts}
    assert all(repo_arg in args and flag in flags for flag, _, repo_arg in SWEEP_KEYS.values())
    assert repository_options({"threads": 1, "glad_instances": 2}) == {"intra_op_threads": 1, "glad_instances": 2}
    for bad in (["nope=1"], ["threads=a"], ["glad_instances=0"], ["threads=1", "threads=2"], ["threads"]):
        with pytest.raises(UsageError):
            parse_grid(bad)

    def pt(ips, p99_ms, errors=0):
        p = _point()
        p["client"] = dict(p["client"], images_per_s=ips, errors=errors,
                           latency_us=dict(p["client"]["latency_us"], p99=p99_ms * 1e3))
        return p

    rows = [{"points": [pt(2.0, 900), pt(3.0, 2500)]}, {"points": [pt(2.5, 1000), pt(9.0, 800, errors=1)]}]
    assert best_point(rows, 2000) == (1, 0)  # 3.0 is over budget, 9.0 had an error
    assert best_point(rows, 3000) == (0, 1)
    assert best_point(rows, 100) is None
