"""Serving: the generated Triton repository, a REAL tritonserver (the nvidia-pytriton binary on CPU), the Triton
engine (client-side loop), the BLS model (server-side loop), the ensemble, the client SDK's typed errors,
failover when a server is killed mid-run, and concurrent clients. No mocks: every served result is compared with
the in-process ONNX Runtime pipeline on real ELPV images."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

from glad_runtime.core.bundle import Bundle  # noqa: E402
from glad_runtime.core.images import preprocess  # noqa: E402
from glad_runtime.pipeline.batch import GladPipeline  # noqa: E402
from triton_models.server import free_port, launch_server, server_available  # noqa: E402

pytestmark = pytest.mark.skipif(not server_available(), reason="nvidia-pytriton (the tritonserver binary) not "
                                "installed; pip install -e .[serve]")

ROOT = Path(__file__).resolve().parent.parent
# Served results run the same graphs with the same ONNX Runtime; only thread scheduling (intra-op 1 on the server,
# the default pool here) can reorder float sums.
ATOL = 1e-4


@pytest.fixture(scope="module")
def images(elpv_images):
    """Four real ELPV cells (uint8 [300, 300]): two normal, two defective."""
    good, bad = elpv_images
    return [good[0], bad[0], good[1], bad[1]]


@pytest.fixture(scope="module")
def reference(exported_bundle, images):
    """``(batch, PipelineOutput)``: in-process ONNX Runtime results for ``images`` (the ground truth of every
    served test)."""
    from glad_runtime.engines.ort import OrtEngines

    b = exported_bundle[0]
    batch = np.stack([preprocess(np.repeat(i[..., None] / 255.0, 3, -1).astype(np.float32), b.config.resolution)
                      for i in images])
    return batch, GladPipeline(OrtEngines(b), b.config)(batch)


@pytest.fixture(scope="module")
def served_bundle(exported_bundle, reference, tmp_path_factory):
    """A calibrated copy of the exported tiny bundle (prefix ``tiny_line``); the threshold is the median of the
    reference scores' span, so both labels occur."""
    from glad_runtime.core.calibration import Calibration

    path = tmp_path_factory.mktemp("serve") / "tiny_line"
    shutil.copytree(exported_bundle[0].path, path)
    b = Bundle(path)
    s = reference[1].scores
    normals = np.linspace(float(s.min()), float(s.max()), 10)
    b.write_calibration(Calibration.from_normals(normals, target_fpr=0.5, model_checksum=b.model_checksum()))
    return b


@pytest.fixture(scope="module")
def repo(served_bundle, tmp_path_factory):
    from triton_models.repository import generate_repository

    path = tmp_path_factory.mktemp("repo") / "models"
    generate_repository(served_bundle, path, max_batch=4)
    return path


@pytest.fixture(scope="module")
def server(repo):
    srv = launch_server(repo, ready_timeout=240)
    yield srv
    srv.stop()


def _check(dets, reference, idx):
    _, ref = reference
    for d, k in zip(dets, idx):
        assert d.error is None, d.error
        assert d.score == pytest.approx(float(ref.scores[k]), abs=ATOL)
        assert d.adaptive_step == int(ref.adaptive_steps[k])
        np.testing.assert_allclose(d.anomaly_map, ref.anomaly_maps[k], atol=ATOL)


# ---------------------------------------------------------------------------------------------- repository
def test_repository_layout_and_configs(served_bundle, repo, tmp_path):
    import onnxruntime as ort

    from triton_models.repository import generate_repository, model_names

    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted(model_names(served_bundle)) == sorted(
        f"tiny_line_{n}" for n in ("unet", "vae_encoder", "vae_decoder", "dino", "dino_ads", "ads_check",
                                   "resize", "recon_features", "glad"))
    unet = (repo / "tiny_line_unet" / "config.pbtxt").read_text()
    # dims read from the graph (not hard-coded): compare with what ONNX Runtime reports
    sess = ort.InferenceSession(str(served_bundle.file("onnx/unet.onnx")), providers=["CPUExecutionProvider"])
    assert f"dims: {list(sess.get_inputs()[0].shape[1:])}" in unet
    assert 'name: "timesteps" data_type: TYPE_INT64 dims: [1] reshape: { shape: [ ] }' in unet
    assert "max_batch_size: 8" in unet and "max_queue_delay_microseconds: 500" in unet
    assert "preferred_batch_size: [4, 8]" in unet and "kind: KIND_CPU" in unet
    checksum = served_bundle.checksum()
    for name in names:
        text = (repo / name / "config.pbtxt").read_text()
        assert f'key: "bundle_checksum" value: {{ string_value: "{checksum}" }}' in text, name
        assert 'key: "model_version" value: { string_value: "1" }' in text
    glad = (repo / "tiny_line_glad" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in glad and 'key: "calibrated" value: { string_value: "true" }' in glad
    served = "unet,vae_encoder,vae_decoder,dino,dino_ads,ads_check"  # what the BLS loop may call
    assert f'key: "served_graphs" value: {{ string_value: "{served}" }}' in glad
    assert (repo / "tiny_line_glad" / "1" / "calibration.json").is_file()
    ens = (repo / "tiny_line_recon_features" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ens and ens.index("tiny_line_vae_decoder") < ens.index("tiny_line_resize") \
        < ens.index("tiny_line_dino\"")
    # the graph is a hard link of the bundle's file (same bytes, no copy) when on one file system
    src, dst = served_bundle.file("onnx/unet.onnx"), repo / "tiny_line_unet" / "1" / "model.onnx"
    assert dst.read_bytes() == src.read_bytes()
    # gpu target: native onnxruntime models; two bundles share one repository under their prefixes
    gpu = tmp_path / "gpu"
    generate_repository(served_bundle, gpu, target="gpu", prefix="a")
    generate_repository(served_bundle, gpu, target="gpu", prefix="b", max_batch=2)
    text = (gpu / "a_dino" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "kind: KIND_GPU" in text and "backend" not in text
    assert "max_batch_size: 4" in (gpu / "b_unet" / "config.pbtxt").read_text()
    assert len(list(gpu.iterdir())) == 18  # 9 models per prefix


def test_repository_refuses_unexported(tiny_bundle, tmp_path):
    from glad_runtime.core.bundle import BundleError
    from triton_models.repository import generate_repository

    with pytest.raises(BundleError, match="glad export"):
        generate_repository(tiny_bundle, tmp_path / "r")


# ---------------------------------------------------------------------------------------------- served results
def test_triton_engine_matches_in_process(server, served_bundle, reference):
    """Client-side loop: every network call goes to the server (plain gRPC and system shared memory)."""
    from glad_runtime.engines import load_engines

    batch, ref = reference
    for shm in (False, True):
        engines = load_engines(served_bundle, "triton", url=server.grpc_url, shared_memory=shm)
        try:
            out = GladPipeline(engines, served_bundle.config)(batch)
        finally:
            engines.close()
        if served_bundle.config.ads_enabled:  # the served fused check: one distance map per check comes back
            assert "ads_check" in engines.models and "ads_fused" in out.timings and "ads_decode" not in out.timings
        np.testing.assert_allclose(out.scores, ref.scores, atol=ATOL)
        np.testing.assert_allclose(out.anomaly_maps, ref.anomaly_maps, atol=ATOL)
        np.testing.assert_array_equal(out.adaptive_steps, ref.adaptive_steps)


def test_bls_matches_in_process_with_labels(server, served_bundle, images, reference):
    """Server-side loop (BLS): one request per batch; calibrated labels and normalised scores."""
    from glad_runtime.serving.client import GladClient

    import tritonclient.grpc as grpcclient

    def fused_checks():  # successful requests the served ads_check model has answered so far
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            stats = c.get_inference_statistics("tiny_line_ads_check", as_json=True)["model_stats"][0]
        return int(stats["inference_stats"]["success"].get("count", 0))

    cal = served_bundle.calibration()
    before = fused_checks()
    with GladClient(server.grpc_url, "tiny_line") as client:
        assert client.health() == {server.grpc_url: True}
        assert client.model_ready("unet") and client.model_ready("glad")
        meta = client.metadata()
        assert meta["resolution"] == 128 and meta["parameters"]["bundle_checksum"] == served_bundle.checksum()
        dets = client.detect(images)
    _check(dets, reference, range(4))
    assert fused_checks() > before  # the server-side loop checks through the fused graph
    for d in dets:
        assert d.label == cal.label(d.score) and d.normalized_score == pytest.approx(cal.normalize(d.score), abs=1e-5)
        assert d.original_size == (300, 300) and d.map_at_original_size().shape == (300, 300)
    assert {d.label for d in dets} == {"normal", "anomalous"}


def test_ensemble_decode_then_features(server, served_bundle, reference):
    import tritonclient.grpc as grpcclient

    from glad_runtime.core.scoring import resize_bilinear
    from glad_runtime.engines.ort import OrtEngines

    cfg = served_bundle.config
    eng = OrtEngines(served_bundle)
    latents = eng.encode(reference[0][:2])
    recon = eng.decode(latents)
    tokens = eng.features(resize_bilinear(recon, (cfg.dino_resolution,) * 2))[0]
    c = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("latents", list(latents.shape), "FP32")
    inp.set_data_from_numpy(latents)
    r = c.infer("tiny_line_recon_features", [inp])
    c.close()
    np.testing.assert_allclose(r.as_numpy("reconstruction"), recon, atol=ATOL)
    np.testing.assert_allclose(r.as_numpy("tokens_7"), tokens, atol=ATOL)


# ---------------------------------------------------------------------------------------------- errors
def test_corrupt_image_in_batch(server, images, reference, tmp_path):
    """One unreadable file, one NaN array: typed BadInputError for them, the others complete."""
    import tritonclient.grpc as grpcclient

    from glad_runtime.serving.client import BadInputError, GladClient, classify_error
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(images[0]).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:200])  # truncated PNG
    nan = np.full((3, 128, 128), np.nan, np.float32)
    with GladClient(server.grpc_url, "tiny_line") as client:
        dets = client.detect([good, corrupt, images[1], nan])
    _check([dets[0], dets[2]], reference, [0, 1])
    for k in (1, 3):
        assert isinstance(dets[k].error, BadInputError) and dets[k].score is None
    assert "corrupt.png" in str(dets[1].error)
    # the server refuses bad values itself (INVALID_ARG), typed as BadInputError
    c = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("images", [1, 3, 128, 128], "FP32")
    inp.set_data_from_numpy(nan[None])
    with pytest.raises(Exception) as info:
        c.infer("tiny_line_glad", [inp])
    c.close()
    err = classify_error(info.value)
    assert isinstance(err, BadInputError) and "NaN" in str(err)


def test_typed_errors(server, images):
    from glad_runtime.serving.client import (DeadlineExceededError, GladClient, ModelNotFoundError,
                                     ServerUnavailableError)

    with GladClient(server.grpc_url, "no_such_bundle") as client:
        with pytest.raises(ModelNotFoundError):
            client.detect(images[:1])
    with GladClient(server.grpc_url, "tiny_line", timeout=0.001) as client:
        with pytest.raises(DeadlineExceededError):
            client.detect(images[:1])
    dead = f"127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with GladClient(dead, "tiny_line", retries=2, backoff=0.05, timeout=2) as client:
        assert client.health() == {dead: False}
        with pytest.raises(ServerUnavailableError):
            client.detect(images[:1])
    assert time.perf_counter() - start < 10


def test_server_killed_mid_run_fails_over(repo, server, served_bundle, images, reference):
    """Server B is killed (SIGKILL, process group) while requests run: the client fails over to A, nothing lost;
    the Triton engine on the dead server raises a typed error."""
    from glad_runtime.serving.client import GladClient, ServerUnavailableError
    from glad_runtime.engines import EngineError
    from glad_runtime.engines.triton import TritonEngines

    second = launch_server(repo, ready_timeout=240)
    results, errors = [], []
    try:
        client = GladClient([second.grpc_url, server.grpc_url], "tiny_line", retries=3, backoff=0.1)

        def run():
            try:
                for k in range(6):
                    results.append((k % 4, client.detect([images[k % 4]])[0]))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        while not results and t.is_alive():
            time.sleep(0.05)
        time.sleep(0.3)  # the next request is in flight on B
        second.kill()
        t.join(120)
        client.close()
    finally:
        second.stop()
    assert not errors and len(results) == 6
    _check([d for _, d in results], reference, [k for k, _ in results])
    used = [d.server for _, d in results]
    assert used[0] == second.grpc_url and used[-1] == server.grpc_url
    with pytest.raises(EngineError) as info:
        TritonEngines(second.grpc_url, "tiny_line", served_bundle.config, timeout=5)
    assert isinstance(info.value.__cause__, ServerUnavailableError)


def test_eight_concurrent_async_clients(server, images, reference):
    from glad_runtime.serving.client import AsyncGladClient

    async def one(k):
        async with AsyncGladClient(server.grpc_url, "tiny_line", timeout=120) as client:
            return await client.detect([images[k % 4]])

    async def main():
        return await asyncio.gather(*(one(k) for k in range(8)))

    outs = asyncio.run(main())
    _check([o[0] for o in outs], reference, [k % 4 for k in range(8)])


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_detect_server_equals_in_process(server, served_bundle, images, tmp_path):
    import json

    from click.testing import CliRunner
    from PIL import Image

    from glad_cli.main import cli

    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        Image.fromarray(images[k]).save(src / f"cell{k}.png")
    outs = {}
    for mode, extra in (("ort", ["--engine", "ort"]), ("served", ["--server", server.grpc_url])):
        out = tmp_path / mode
        res = CliRunner().invoke(cli, ["detect", str(served_bundle.path), str(src), "--out", str(out), "--quiet",
                                       *extra])
        assert res.exit_code == 0, res.output
        outs[mode] = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    for a, b in zip(outs["ort"], outs["served"]):
        assert a["score"] == pytest.approx(b["score"], abs=ATOL) and a["label"] == b["label"]
        assert a["adaptive_step"] == b["adaptive_step"]
    res = CliRunner().invoke(cli, ["detect", str(served_bundle.path), str(src), "--out", str(tmp_path / "x"),
                                   "--server", server.grpc_url, "--model-prefix", "other"])
    assert res.exit_code != 0 and "other_unet" in res.output


def test_cli_serve_start_and_sigterm(served_bundle, tmp_path):
    """`glad serve --start` writes the repository, launches tritonserver, prints the URLs and stops on SIGTERM."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "glad_cli.main", "serve", str(served_bundle.path), "--repo", str(tmp_path / "r"),
           "--prefix", "cli", "--start", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    lines = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ready:"):
                break
        ready = [x for x in lines if x.startswith("ready:")]
        assert ready, "".join(lines)
        http = re.search(r"http http://(\S+)", ready[0]).group(1)
        import urllib.request

        with urllib.request.urlopen(f"http://{http}/v2/models/cli_glad/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, "".join(lines) + rest
        assert "stopped (exit code 0)" in rest
    finally:
        if proc.poll() is None:  # let the CLI stop its server; the server also dies with it (PDEATHSIG)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_client_side_imports_without_torch():
    """The client SDK, the Triton engine and the repository/launcher modules never import torch or onnxruntime."""
    code = ("import sys, glad_runtime.serving.client, glad_runtime.engines.triton, triton_models.repository, "
            "triton_models.server; print('torch' in sys.modules, 'onnxruntime' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.stdout.strip() == "False False", res.stdout + res.stderr
