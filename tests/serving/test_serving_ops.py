"""Serving operations (issue 16, server side) against REAL tritonservers (the nvidia-pytriton binary on CPU), no
mocks: deadlines reach the server (queue policy, the BLS loop stops abandoned work between DDIM steps), honest
start and stop (busy ports refused, one log per server, drain on SIGTERM), and GLAD metrics at ``/metrics``.

Fixtures come from ``tests/serving/test_serving.py`` (the tiny exported bundle, calibrated; real ELPV images). Timings on
this shared 2-core machine are indicative only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")

from test_serving import ATOL, ROOT, _png, images, reference, served_bundle  # noqa: E402,F401 (fixtures)
from triton_models.server import launch_server, server_available  # noqa: E402

pytestmark = pytest.mark.skipif(not server_available(), reason="nvidia-pytriton (the tritonserver binary) not "
                                "installed; pip install -e .[serve]")

SLOW_STEPS = 200


def _add_variant(path: Path, src: str, name: str, **config) -> None:
    """Copy the BLS model ``src`` as ``name`` with ``config`` fields changed in its bundle config."""
    shutil.copytree(path / src, path / name)
    cfg_file = path / name / "1" / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | config))
    text = (path / name / "config.pbtxt").read_text().replace(f'name: "{src}"', f'name: "{name}"')
    (path / name / "config.pbtxt").write_text(text)


@pytest.fixture(scope="module")
def ops_repo(served_bundle, tmp_path_factory):
    """The tiny bundle's repository plus ``tiny_slow_glad``: the same networks, ADS off, 200 DDIM steps (the
    issue's abandoned-deadline case, a few seconds per request here)."""
    from triton_models.repository import generate_repository

    path = tmp_path_factory.mktemp("ops") / "models"
    generate_repository(served_bundle, path, max_batch=8)
    _add_variant(path, "tiny_line_glad", "tiny_slow_glad", ads_enabled=False, num_inference_steps=SLOW_STEPS)
    return path


@pytest.fixture(scope="module")
def ops_server(ops_repo):
    srv = launch_server(ops_repo, ready_timeout=240)
    yield srv
    srv.stop()


def _inputs(batch: np.ndarray):
    from glad_runtime.serving import protocol

    x = grpcclient.InferInput(protocol.GLAD_INPUT, list(batch.shape), "FP32")
    x.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    return [x]


def _infer(url: str, model: str, batch: np.ndarray, *, timeout_s: float | None = None):
    """One gRPC request; ``timeout_s`` is sent both as Triton's request timeout (microseconds) and as the gRPC
    client deadline, as the client SDK does. Returns ``(seconds, result or the exception)``."""
    from tritonclient.utils import InferenceServerException

    start = time.perf_counter()
    with grpcclient.InferenceServerClient(url) as c:
        kw = {} if timeout_s is None else {"timeout": int(timeout_s * 1e6), "client_timeout": timeout_s}
        try:
            out = c.infer(model, _inputs(batch), **kw)
        except InferenceServerException as e:
            out = e
    return time.perf_counter() - start, out


def abandoned_deadline_run(url: str, model: str, batch: np.ndarray, *, n: int = 6, deadline: float = 1.0,
                           server_timeout: bool = True) -> dict:
    """The issue's measurement: idle latency of one request, then ``n`` concurrent requests with a ``deadline``
    (seconds) the client gives up on, then the next request's latency. Returns the figures."""
    from tritonclient.utils import InferenceServerException

    idle, out = _infer(url, model, batch)
    assert not isinstance(out, Exception), out
    results = [None] * n

    def one(k):
        if server_timeout:
            results[k] = _infer(url, model, batch, timeout_s=deadline)
        else:  # the gRPC deadline only: the server learns it from the cancelled call
            start = time.perf_counter()
            with grpcclient.InferenceServerClient(url) as c:
                try:
                    results[k] = (0, c.infer(model, _inputs(batch), client_timeout=deadline))
                except InferenceServerException as e:
                    results[k] = (time.perf_counter() - start, e)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    nxt, out = _infer(url, model, batch)
    assert not isinstance(out, Exception), out
    return {"idle_s": idle, "next_s": nxt, "ratio": nxt / idle,
            "abandoned_s": [round(r[0], 2) for r in results],
            "abandoned_errors": [r[1].status() if isinstance(r[1], Exception) else "OK" for r in results]}


# ---------------------------------------------------------------------------------------------- deadlines
def _metric_total(metrics_url: str, name: str, model: str) -> float:
    """The sum of a GLAD metric's series for one model at ``/metrics``."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(name + r'\{[^}]*model="' + model + r'"[^\n]* ([0-9.e+-]+)\n',
                                                       text))


def test_abandoned_deadline_work_stops(ops_server, reference):
    """6 concurrent 200-step requests whose 1 s deadline passes: the client gets DEADLINE_EXCEEDED, the server stops
    their loops between DDIM steps (counted in steps, not seconds: the server's own metrics say how many DDIM steps
    it did not run) and the next request is answered. The latencies are printed, never asserted (bench/ owns
    timing; a loaded machine would fail a timed test)."""
    batch = reference[0][:1]
    url, model = ops_server.metrics_url, "tiny_slow_glad"
    saved0 = _metric_total(url, "glad_ddim_steps_saved_total", model)
    abandoned0 = _metric_total(url, "glad_requests_abandoned_total", model)
    figures = abandoned_deadline_run(ops_server.grpc_url, model, batch)
    saved = _metric_total(url, "glad_ddim_steps_saved_total", model) - saved0
    abandoned = _metric_total(url, "glad_requests_abandoned_total", model) - abandoned0
    print("abandoned-deadline figures:", figures, {"steps_saved": saved, "abandoned": abandoned})
    assert all(e == "StatusCode.DEADLINE_EXCEEDED" for e in figures["abandoned_errors"]), figures
    # every request that started its loop was stopped mid-way: at least one, each with steps left unrun
    assert abandoned >= 1 and saved >= abandoned, (saved, abandoned)
    log = ops_server.log_tail(200000)
    assert "Traceback" not in log


def test_server_timeout_alone_stops_the_loop(ops_server, reference):
    """A request with only Triton's request timeout (no client deadline) is stopped by the BLS model between DDIM
    steps with a clear error, well before its 200 steps would end."""
    batch = reference[0][:1]
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(ops_server.grpc_url) as c:
        with pytest.raises(InferenceServerException) as info:
            c.infer("tiny_slow_glad", _inputs(batch), timeout=500_000)
    message = info.value.message()
    assert "deadline exceeded" in message and "DDIM step" in message, info.value
    step, total = map(int, re.search(r"DDIM step (\d+)/(\d+)", message).groups())
    assert total == 200 and step < total, message  # stopped before its last step, in steps not seconds


# ---------------------------------------------------------------------------------------------- start honestly
def test_busy_port_is_refused_before_start(ops_server, ops_repo, served_bundle, tmp_path):
    """A port held by another server: one-line PortInUseError naming the port and the holder, nothing started,
    and the other server's log left alone; the CLI prints one line and exits 1 (the issue's case printed
    'ready' because the other server answered the health probe)."""
    from glad_runtime.errors import PortInUseError

    before = ops_server.log_path.stat().st_size
    with pytest.raises(PortInUseError) as info:
        launch_server(ops_repo, http_port=ops_server.http_port, ready_timeout=30)
    msg = str(info.value)
    assert f":{ops_server.http_port} is already in use" in msg and "tritonserver" in msg, msg
    assert "\n" not in msg
    assert ops_server.log_path.stat().st_size >= before and ops_server.running() and ops_server.ready()
    with pytest.raises(PortInUseError, match="given for both"):
        launch_server(ops_repo, http_port=9999, grpc_port=9999)
    r = subprocess.run([sys.executable, "-m", "glad_cli.main", "serve", str(served_bundle.path), "--repo",
                        str(tmp_path / "models"), "--start", "--grpc-port", str(ops_server.grpc_port),
                        "--http-port", "0", "--metrics-port", "0"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 1, r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and "starting tritonserver" not in ln]
    assert len(err) == 1 and f"grpc port 127.0.0.1:{ops_server.grpc_port} is already in use" in err[0], r.stderr
    assert "ready" not in r.stdout


# ---------------------------------------------------------------------------------------------- metrics
def test_glad_metrics_after_traffic(ops_server, reference):
    """After traffic (and the abandoned requests above) the BLS model's GLAD metrics are at ``/metrics``."""
    batch = reference[0]
    _, out = _infer(ops_server.grpc_url, "tiny_line_glad", batch)
    assert not isinstance(out, Exception), out
    with urllib.request.urlopen(ops_server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    def value(pattern):
        found = [float(m.group(1)) for m in re.finditer(pattern + r"[^\n]* ([0-9.e+-]+)\n", text)]
        return sum(found)
    assert value(r'glad_images_total\{[^}]*model="tiny_line_glad"') >= len(batch), text[-3000:]
    assert value(r'glad_images_total\{[^}]*label="anomalous"') + value(r'glad_images_total\{[^}]*label="normal"') \
        >= len(batch)
    assert value(r'glad_ads_decisions_total\{') >= len(batch)
    assert value(r'glad_requests_abandoned_total\{[^}]*model="tiny_slow_glad"') >= 1
    assert value(r'glad_ddim_steps_saved_total\{') > 0
    assert re.search(r"glad_score_(bucket|count)\{", text) or re.search(r"glad_score\{", text), text[-3000:]
    assert "nv_inference_request_success" in text  # Triton's own metrics beside ours


# ---------------------------------------------------------------------------------------------- rollout + drain
@pytest.fixture(scope="module")
def bundle_v2(served_bundle, tmp_path_factory):
    """A second bundle for the same prefix: the same networks, another noise seed (so its scores differ
    measurably), uncalibrated."""
    from glad_runtime.core.bundle import Bundle

    path = tmp_path_factory.mktemp("v2") / "tiny_line"
    shutil.copytree(served_bundle.path, path)
    (path / "calibration.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"seed": 7}, indent=2))
    b = Bundle(path)
    b.write_manifest()
    assert b.checksum() != served_bundle.checksum()
    return b


def _scores(bundle, batch):
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.pipeline.batch import GladPipeline

    return GladPipeline(OrtEngines(bundle), bundle.config)(batch).scores


def test_rollout_v1_to_v2_then_drain(served_bundle, bundle_v2, reference, tmp_path):
    """Issue 16, items 4-5, on one real server in explicit model control: 8 threads stream 64 single-image
    requests; mid-run bundle v2 is rolled out (a new version beside v1, networks of both loaded, the BLS model
    switched). Every image is answered exactly once, with v1's or v2's in-process score, none refused; v2 answers
    every request after the rollout. Then SIGTERM-style stop while requests are in flight: they all finish
    (drain), and a request sent during the drain is refused at once (so a client fails over)."""
    from tritonclient.utils import InferenceServerException

    from triton_models.repository import generate_repository, served_versions
    from triton_models.server import rollout

    repo = tmp_path / "models"
    assert generate_repository(served_bundle, repo, max_batch=4)
    batch = reference[0]
    ref = {1: np.asarray(reference[1].scores), 2: np.asarray(_scores(bundle_v2, batch))}
    assert np.abs(ref[1] - ref[2]).min() > 1e-3, ref
    srv = launch_server(repo, ready_timeout=240)
    try:
        results, lock, rolled = {}, threading.Lock(), threading.Event()
        k_roll, n_after = 16, 24  # the rollout starts after k_roll answers; the stream goes on for n_after more
        counter = {"next": 0, "after": 0}

        def take():
            with lock:
                if rolled.is_set():
                    if counter["after"] >= n_after:
                        return None
                    counter["after"] += 1
                j = counter["next"]
                counter["next"] += 1
                return j

        def worker():
            while (j := take()) is not None:
                k = j % len(batch)
                t0 = time.perf_counter()
                dt, out = _infer(srv.grpc_url, "tiny_line_glad", batch[k:k + 1])
                with lock:
                    assert j not in results
                    results[j] = (k, out, rolled.is_set() and t0 > rolled.t)
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        while len(results) < k_roll:
            time.sleep(0.05)
        t_roll = time.perf_counter()
        version = rollout(srv.http_url, repo, bundle_v2, prefix="tiny_line", max_batch=4)
        with lock:
            rolled.t = time.perf_counter()
            rolled.set()
        roll_s = rolled.t - t_roll
        for t in threads:
            t.join(300)
        n_req = counter["next"]
        assert version == 2 and sorted(served_versions(repo, "tiny_line_glad")) == [1, 2]
        errors = [out for _, out, _ in results.values() if isinstance(out, Exception)]
        assert not errors, errors[:3]
        assert len(results) == n_req
        seen = {1: 0, 2: 0}
        for j, (k, out, after) in results.items():
            s = float(out.as_numpy("scores").reshape(-1)[0])
            v = [v for v in (1, 2) if abs(s - ref[v][k]) <= ATOL]
            assert len(v) == 1, (j, k, s, ref[1][k], ref[2][k])
            seen[v[0]] += 1
            if after:
                assert v[0] == 2, (j, s)
        print(f"rollout v1 -> v2 ({roll_s:.1f} s): {n_req} requests, {len(results)} results, 0 errors, "
              f"answered by v1 {seen[1]}, by v2 {seen[2]}")
        assert seen[1] >= 1 and seen[2] >= 1

        # drain: 4 in flight, stop, a late request refused fast
        inflight = [None] * 4

        def one(k):
            inflight[k] = _infer(srv.grpc_url, "tiny_line_glad", batch[k:k + 1])[1]
        threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 60})
        stopper.start()
        time.sleep(0.3)
        late_s, late = _infer(srv.grpc_url, "tiny_line_glad", batch[:1])
        for t in threads:
            t.join(120)
        stopper.join(120)
        assert all(not isinstance(o, Exception) for o in inflight), inflight
        for k, o in enumerate(inflight):
            assert float(o.as_numpy("scores").reshape(-1)[0]) == pytest.approx(ref[2][k], abs=ATOL)
        print(f"drain: 4 in flight answered; the late request: {late_s:.2f} s, "
              f"{late.status() if isinstance(late, Exception) else 'answered'}")
        if isinstance(late, InferenceServerException):  # refused at once by the draining server, never queued
            assert late.status() in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE"), late
    finally:
        srv.stop()


def test_cli_serve_deploy_writes_recipes(served_bundle, tmp_path):
    """``glad serve --deploy DIR --image NAME:TAG`` writes the build context and manifests for the repository it
    generated (the recipes themselves are validated in tests/unit/test_deploy.py); without --image: usage error."""
    base = [sys.executable, "-m", "glad_cli.main", "serve", str(served_bundle.path), "--repo",
            str(tmp_path / "models"), "--deploy", str(tmp_path / "deploy")]
    r = subprocess.run(base, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--image" in r.stderr, r.stderr
    r = subprocess.run(base + ["--image", "registry.example/glad-triton:1.0"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "version 1" in r.stdout
    assert (tmp_path / "deploy" / "Dockerfile").is_file()
    k8s = (tmp_path / "deploy" / "k8s" / "glad-triton.yaml").read_text()
    assert "registry.example/glad-triton:1.0" in k8s and "/v2/health/ready" in k8s
    assert (tmp_path / "deploy" / "model_repository" / "tiny_line_glad" / "config.pbtxt").is_file()
