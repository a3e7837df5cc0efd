"""``glad perf`` (issue 28) against a REAL tritonserver (the nvidia-pytriton binary on CPU), no mocks.

One server serves the tiny exported bundle (prefix ``perf_t``) with both entry models; its in-flight pool is small
(1 active + 1 queued) so back-pressure is reachable with a few workers. Checked here: the tool's request and
image counts equal the server's statistics extension and ``/metrics`` deltas (gRPC, HTTP, streams; count mode and
time windows), rejections are counted by type as the server counts them, sampled scores equal the in-process
ONNX Runtime ones, ``--compare`` ratios, the no-op overhead check, the CLI's CSV / JSON / plots, a clean stop on
Ctrl-C, the sweep, and ``bench.inflight_load`` as a use of it. No test asserts a duration; windows are short.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")

from bench.perf import load as L  # noqa: E402
from bench.perf import run as R  # noqa: E402
from triton_models.server import launch_server, server_available  # noqa: E402

pytestmark = pytest.mark.skipif(not server_available(), reason="nvidia-pytriton (the tritonserver binary) not "
                                "installed; pip install -e .[serve]")

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "perf_t"
GLAD, INFLIGHT = f"{PREFIX}_glad", f"{PREFIX}_glad_inflight"
ATOL = 1e-4  # served vs in-process scores: same graphs, thread scheduling may reorder float sums


@pytest.fixture(scope="module")
def bundle(exported_bundle):
    return exported_bundle[0]


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    from triton_models.repository import generate_repository

    path = tmp_path_factory.mktemp("perf") / "models"
    generate_repository(bundle, path, prefix=PREFIX, max_batch=4, inflight_max_active=1, inflight_max_queue=1)
    srv = launch_server(path, ready_timeout=240)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def image_dir(elpv_images, tmp_path_factory):
    """Six real ELPV cells as PNG files, normal and defective alternating."""
    from PIL import Image

    good, bad = elpv_images
    d = tmp_path_factory.mktemp("perf_images")
    for k in range(6):
        Image.fromarray((good if k % 2 == 0 else bad)[k // 2]).save(d / f"cell{k}-{'good' if k % 2 == 0 else 'bad'}.png")
    return d


@pytest.fixture(scope="module")
def files(image_dir):
    return L.load_images([image_dir])


def _target(server, model, transport="grpc"):
    url = f"http://{server.http_url}" if transport == "http" else server.grpc_url
    return L.connect(url, model, metrics_url=server.metrics_url)


def _assert_counts_agree(p, requests, images):
    """The tool's counts equal the server's statistics and GLAD counters, whole point and reported window."""
    rec, c, s = p["reconciliation"], p["client"], p["server"]
    assert rec["match"], rec
    assert rec["client_requests"] == rec["server_requests"] == requests
    assert rec["client_images"] == rec["server_images"] == images
    assert c["errors"] == 0 and c["ok"] == c["requests"]
    assert sum(c["adaptive_steps"].values()) == c["images_ok"]
    assert s["glad"]["images"] == c["images_ok"]  # /metrics deltas over the same window
    unet = next(f for m, f in s["models"].items() if m.endswith("_unet"))
    assert unet["requests"] > 0 and unet["executions"] > 0 and unet["batch"] >= 1.0


@pytest.mark.parametrize("model,transport,batch", [(GLAD, "grpc", 1), (GLAD, "http", 2), (INFLIGHT, "grpc", 1)])
def test_counts_equal_the_servers_statistics(server, files, model, transport, batch):
    """Count mode: the reported window is the whole point, so the tool's request and image counts equal Triton's
    statistics deltas and glad_images_total for that very window (unary gRPC, HTTP binary, gRPC stream)."""
    t = _target(server, model, transport)
    assert t.streaming == (model == INFLIGHT) and t.max_images == 4
    p = L.measure_point(t, L.Payloads(files, batch), "concurrency", 2, L.Settings(request_count=5, warmup_requests=1))
    _assert_counts_agree(p, 5, 5 * batch)
    assert p["reconciliation"]["window_client_requests"] == p["reconciliation"]["window_server_requests"] == 5
    assert p["server"]["models"][model]["requests"] == 5
    lat = p["client"]["latency_us"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]


def test_time_windows_and_an_open_loop_reconcile(server, files):
    """Time windows (1 s, at most 3) on an open-loop Poisson load: the whole point reconciles exactly; the
    reported windows' server counts differ from the client's by at most the requests in transit at their edges."""
    t = _target(server, GLAD)
    s = L.Settings(interval_s=1.0, max_trials=3, warmup_requests=1, distribution="poisson", seed=1, max_threads=4)
    p = L.measure_point(t, L.Payloads(files, 1), "request_rate", 2.0, s)
    rec = p["reconciliation"]
    assert rec["match"] and rec["client_requests"] == rec["server_requests"] > 0
    assert p["windows_run"] == len(p["windows"]) <= 3
    assert abs(rec["window_client_requests"] - rec["window_server_requests"]) <= 4
    assert p["client"]["errors"] == 0


def test_rejections_counted_by_type_as_the_server_counts_them(server, files):
    """Five workers on an in-flight pool of 1 + 1: requests are refused with back-pressure; the tool counts them
    as 'rejected: pool full', equal to the model's glad_requests_rejected_total{reason=pool_full} delta, and every
    request (answered or refused) is in Triton's statistics."""
    t = _target(server, INFLIGHT)
    p = L.measure_point(t, L.Payloads(files, 1), "concurrency", 5, L.Settings(request_count=12, warmup_requests=0))
    c, rec = p["client"], p["reconciliation"]
    assert c["rejections"] > 0 and set(c["errors_by_type"]) == {"rejected: pool full"}
    assert p["server"]["glad"]["rejected"]["pool_full"] == c["rejections"]
    assert rec["client_requests"] == rec["server_requests"] == 12
    assert rec["client_images"] == rec["server_images"] == c["ok"]  # rejected requests score no image


def test_compare_and_scores_equal_in_process(server, files, bundle, tmp_path):
    """--compare runs both models interleaved with ratios; the served scores of every file equal the in-process
    ONNX Runtime pipeline's, and the two models agree."""
    a, b = _target(server, GLAD), _target(server, INFLIGHT)
    res = R.run_points([a, b], L.Payloads(files, 1), "concurrency", [1, 2],
                       L.Settings(request_count=4, warmup_requests=0), quiet=True, verify_bundle=bundle.path)
    assert [(p["label"], p["load"]) for p in res["points"]] == [(GLAD, 1), (INFLIGHT, 1), (INFLIGHT, 2), (GLAD, 2)]
    assert all(p["reconciliation"]["match"] for p in res["points"])
    assert [r["load"] for r in res["compare"]] == [1, 2]
    for r in res["compare"]:
        assert r["a"] == GLAD and r["b"] == INFLIGHT and np.isfinite(r["p99_ratio"]) and r["requests_per_s_ratio"] > 0
        assert r["compared_files"] >= 4 and r["max_score_diff"] <= ATOL
    v = res["verify"]
    assert v["files"] == 4 and v["max_abs_diff"] <= ATOL  # the files sent (requests 0-3 of each point)
    paths = R.write_reports(res, tmp_path)
    with open(paths["compare"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_overhead_on_a_noop_model(server, files, tmp_path):
    """The overhead check: the same load against the no-op python-backend models on a local server, unary and
    streamed; every request answered, each point carries the tool's ceiling."""
    res = R.run_points([_target(server, GLAD), _target(server, INFLIGHT)], L.Payloads(files, 2), "concurrency", [2],
                       L.Settings(request_count=20, warmup_requests=0), quiet=True, overhead=True, workdir=tmp_path)
    over = res["overhead"]["points"]
    assert set(over) == {"grpc 2", "stream 2"}
    for p in res["points"]:
        assert p["overhead"]["errors"] == 0 and p["overhead"]["requests_per_s"] > 0
        assert p["overhead"]["latency_us"]["p50"] > 0


def test_cli_writes_csv_json_and_plots(server, image_dir, tmp_path):
    """`glad perf URL` end to end: perf_analyzer's CSV columns, one row per load, JSON, Markdown and the plots."""
    from click.testing import CliRunner

    from glad_cli.main import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["perf", server.grpc_url, "-m", GLAD, "--concurrency", "1,2", "--request-count",
                                   "3", "--images", str(image_dir), "--metrics-url", server.metrics_url,
                                   "--no-overhead", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "| `perf_t_glad` | 2 |" in res.output
    with open(out / "perf.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["Concurrency"] for r in rows] == ["1", "2"]
    assert list(rows[0])[:5] == ["Concurrency", "Inferences/Second", "Client Send", "Network+Server Send/Recv",
                                 "Server Queue"]
    assert all(r["Counts Match"] == "true" and r["Requests"] == r["Server Requests"] == "3" for r in rows)
    assert float(rows[0]["p99 latency"]) > 0 and rows[0][f"{PREFIX}_unet Executions"] != ""
    data = json.loads((out / "perf.json").read_text())
    assert data["points"][1]["load"] == 2 and not data["interrupted"]
    assert (out / "perf.svg").read_text().startswith("<svg") and (out / "perf.md").is_file()
    # usage errors are one line, exit 2
    bad = CliRunner().invoke(cli, ["perf", f"http://{server.http_url}", "-m", INFLIGHT, "--request-count", "1"])
    assert bad.exit_code == 2 and "gRPC streams only" in bad.output
    bad = CliRunner().invoke(cli, ["perf", server.grpc_url, "-m", GLAD, "--batch-size", "5", "--request-count", "1",
                                   "--images", str(image_dir), "--no-overhead", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "max_images 4" in bad.output


def test_ctrl_c_stops_cleanly_and_keeps_what_was_measured(server, image_dir, tmp_path):
    """SIGINT during a point (long windows that cannot finish first): the requests in flight finish, the point
    measured so far is written (interrupted), the counts still reconcile, exit code 130."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "glad_cli.main", "perf", server.grpc_url, "-m", GLAD, "--concurrency", "2,4",
           "--measurement-interval-ms", "60000", "--images", str(image_dir), "--metrics-url", server.metrics_url,
           "--no-overhead", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        time.sleep(8)  # inside the first 60 s window of the first point
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "stopping: waiting for the requests in flight" in stderr
    data = json.loads((out / "perf.json").read_text())
    assert data["interrupted"] and len(data["points"]) == 1
    p = data["points"][0]
    assert p["interrupted"] and not p["stable"] and p["client"]["requests"] > 0
    assert p["reconciliation"]["match"] and p["reconciliation"]["client_requests"] == p["reconciliation"]["server_requests"]
    with open(out / "perf.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["Interrupted"] == "true"


@pytest.mark.slow  # one server per configuration: about a minute; `make test-all` runs it
def test_sweep_names_the_best_configuration_and_re_measures_it(bundle, files, tmp_path):
    """Two configurations (one and two per-batch instances), a local server each: the best under a generous
    budget is written as a glad serve command and measured again on a fresh server."""
    from bench.perf.sweep import run_sweep, sweep_markdown

    res = run_sweep(bundle.path, tmp_path, payloads=L.Payloads(files, 1), mode="concurrency", loads=[2],
                    settings=L.Settings(request_count=3, warmup_requests=1), p99_ms=600_000.0,
                    grid={"glad_instances": [1, 2]}, quiet=True)
    assert [r["config"] for r in res["configurations"]] == [{"glad_instances": 1}, {"glad_instances": 2}]
    assert all(p["reconciliation"]["match"] for r in res["configurations"] for p in r["points"])
    best = res["best"]
    assert best["serve"].startswith(f"glad serve {bundle.path} --repo models --glad-instances ")
    assert best["confirm"]["within_budget"] and best["confirm"]["point"]["reconciliation"]["match"]
    assert "Re-measured on a fresh server" in sweep_markdown(res)


def test_inflight_load_is_a_use_of_glad_perf(server, tmp_path):
    """`python -m bench.inflight_load --url` measures the running server through bench.perf (no server of its
    own) and keeps its report."""
    from bench.inflight_load import main

    out = tmp_path / "il"
    main(["--url", server.grpc_url, "--prefix", PREFIX, "--metrics-url", server.metrics_url, "--loads", "0.5",
          "--requests", "4", "--clients", "2", "--capacity-requests", "4", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    row = res["loads"]["0.50"]
    assert row["per_batch"]["counts_match"] and row["inflight"]["counts_match"]
    assert row["per_batch"]["ok"] + row["per_batch"]["errors"] + row["per_batch"]["rejected"] == 4
    assert (out / "results.md").is_file() and (out / "perf" / "perf.json").is_file()
