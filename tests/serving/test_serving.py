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

from conftest import png_bytes  # noqa: E402
from glad_runtime.core.bundle import Bundle  # noqa: E402
from glad_runtime.core.images import Preprocessor, load_image  # noqa: E402
from glad_runtime.pipeline.batch import GladPipeline  # noqa: E402
from triton_models.server import free_port, launch_server, server_available  # noqa: E402

pytestmark = pytest.mark.skipif(not server_available(), reason="nvidia-pytriton (the tritonserver binary) not "
                                "installed; pip install -e .[serve]")

ROOT = Path(__file__).resolve().parents[2]
# Served results run the same graphs with the same ONNX Runtime; only thread scheduling (intra-op 1 on the server,
# the default pool here) can reorder float sums.
ATOL = 1e-4


@pytest.fixture(scope="module")
def images(elpv_images):
    """Four real ELPV cells (uint8 [300, 300]): two normal, two defective."""
    good, bad = elpv_images
    return [good[0], bad[0], good[1], bad[1]]


_png = png_bytes  # the name the serving tests import


@pytest.fixture(scope="module")
def reference(exported_bundle, images):
    """``(batch, PipelineOutput)``: in-process ONNX Runtime results for ``images`` (the ground truth of every
    served test), decoded and preprocessed as ``glad detect`` does (``load_image`` + ``Preprocessor``)."""
    from glad_runtime.engines.ort import OrtEngines

    b = exported_bundle[0]
    batch = np.stack([Preprocessor.from_config(b.config).image(load_image(_png(i))) for i in images])
    return batch, GladPipeline(OrtEngines(b), b.config)(batch)


@pytest.fixture(scope="module")
def served_bundle(exported_bundle, reference, tmp_path_factory):
    """A calibrated copy of the exported tiny bundle (prefix ``tiny_line``); the image threshold is the median of
    the reference scores' span, so both labels occur; the pixel threshold the 90th percentile of the reference
    maps' pixels, so defect regions occur."""
    from glad_runtime.core.calibration import Calibration

    path = tmp_path_factory.mktemp("serve") / "tiny_line"
    shutil.copytree(exported_bundle[0].path, path)
    b = Bundle(path)
    s, maps = reference[1].scores, reference[1].anomaly_maps
    normals = np.linspace(float(s.min()), float(s.max()), 10)
    b.write_calibration(Calibration.from_normals(normals, [maps[k % 4] for k in range(10)], target_fpr=0.5,
                                                 pixel_target_fpr=0.1, model_checksum=b.model_checksum()))
    return b


@pytest.fixture(scope="module")
def repo(served_bundle, tmp_path_factory):
    """The generated repository, plus ``tiny_raw_glad``: a second BLS model over the same network models, for an
    uncalibrated bundle with ADS off (what a line gets before `glad calibrate`)."""
    import json

    from triton_models.repository import generate_repository

    path = tmp_path_factory.mktemp("repo") / "models"
    generate_repository(served_bundle, path, max_batch=4)
    raw = path / "tiny_raw_glad"
    shutil.copytree(path / "tiny_line_glad", raw)
    (raw / "1" / "calibration.json").unlink()
    cfg = json.loads((raw / "1" / "config.json").read_text())
    (raw / "1" / "config.json").write_text(json.dumps(cfg | {"ads_enabled": False}))
    text = (raw / "config.pbtxt").read_text().replace('name: "tiny_line_glad"', 'name: "tiny_raw_glad"')
    text = re.sub(r'key: "calibration" value: \{ string_value: "(?:[^"\\]|\\.)*" \}',
                  'key: "calibration" value: { string_value: "" }', text)
    (raw / "config.pbtxt").write_text(text)
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

    names = sorted(p.name for p in repo.iterdir() if p.name != "tiny_raw_glad")
    assert names == sorted(model_names(served_bundle)) == sorted(
        f"tiny_line_{n}" for n in ("unet", "vae_encoder", "vae_decoder", "dino", "dino_ads", "ads_check",
                                   "glad", "glad_inflight"))
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
    # entry models: max_batch_size 0 (an empty batching request crashed the server, issue 27), the batch dim declared
    assert '{ name: "image_files" data_type: TYPE_STRING dims: [-1, 1] optional: true }' in glad
    assert '{ name: "anomaly_maps" data_type: TYPE_FP32 dims: [-1, -1, -1] }' in glad
    assert '{ name: "errors" data_type: TYPE_STRING dims: [-1, 1] }' in glad
    assert "max_batch_size: 0" in glad and 'key: "max_images" value: { string_value: "4" }' in glad
    assert 'key: "calibrated" value: { string_value: "true" }' in glad
    assert 'key: "max_image_pixels" value: { string_value: "100000000" }' in glad
    assert "count: 2" in glad and "allow_timeout_override: true" in glad  # two instances, deadlines kept
    served = "unet,vae_encoder,vae_decoder,dino,dino_ads,ads_check"  # what the BLS loop may call
    assert f'key: "served_graphs" value: {{ string_value: "{served}" }}' in glad
    assert (repo / "tiny_line_glad" / "1" / "calibration.json").is_file()
    # the in-flight model: the same contract, decoupled, its pool bounds as parameters, the shared BLS code beside
    inflight = (repo / "tiny_line_glad_inflight" / "config.pbtxt").read_text()
    assert glad[glad.index("input ["):glad.index("instance_group")] in inflight
    assert "model_transaction_policy { decoupled: true }" in inflight and "dynamic_batching" not in inflight
    assert 'key: "max_active" value: { string_value: "4" }' in inflight
    assert 'key: "max_queue" value: { string_value: "16" }' in inflight
    for entry in ("tiny_line_glad", "tiny_line_glad_inflight"):
        assert (repo / entry / "1" / "glad_bls.py").is_file() and (repo / entry / "1" / "calibration.json").is_file()
    # the graph is a hard link of the bundle's file (same bytes, no copy) when on one file system
    src, dst = served_bundle.file("onnx/unet.onnx"), repo / "tiny_line_unet" / "1" / "model.onnx"
    assert dst.read_bytes() == src.read_bytes()
    # gpu target: native onnxruntime models; two bundles share one repository under their prefixes
    gpu = tmp_path / "gpu"
    for retired in ("a_recon_features", "a_resize"):  # an older generator's unused models go on regeneration
        (gpu / retired / "1").mkdir(parents=True)
    generate_repository(served_bundle, gpu, target="gpu", prefix="a")
    assert not (gpu / "a_recon_features").exists() and not (gpu / "a_resize").exists()
    generate_repository(served_bundle, gpu, target="gpu", prefix="b", max_batch=2)
    text = (gpu / "a_dino" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "kind: KIND_GPU" in text and "backend" not in text
    assert "max_batch_size: 4" in (gpu / "b_unet" / "config.pbtxt").read_text()
    assert len(list(gpu.iterdir())) == 16  # 8 models per prefix


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


# ---------------------------------------------------------------------------------------------- any client
def _http_infer(url: str, model: str, files: list[bytes] | None = None, *, b64: bool = False,
                tensor: np.ndarray | None = None, parameters: dict | None = None,
                outputs: list[str] | None = None) -> tuple[int, dict]:
    """A KServe v2 request with the standard library only (``urllib``, ``json``, ``struct``), as a C#, C++ or
    PLC-gateway client would send it: files in the binary extension (4-byte little-endian length + bytes per
    element), or base64 text in plain JSON, or a float tensor in JSON; every output (or ``outputs``) asked for as
    JSON. Returns ``(HTTP status, body parsed by a strict JSON parser)``."""
    import json
    import struct
    import urllib.error
    import urllib.request

    from glad_runtime.serving import protocol

    outputs = [{"name": n, "parameters": {"binary_data": False}} for n in outputs or protocol.GLAD_OUTPUT_NAMES]
    blob = b""
    if tensor is not None:
        inp = {"name": "images", "shape": list(tensor.shape), "datatype": "FP32", "data": tensor.ravel().tolist()}
    elif b64:
        import base64

        inp = {"name": "image_files", "shape": [len(files), 1], "datatype": "BYTES",
               "data": [base64.b64encode(f).decode() for f in files]}
    else:
        blob = b"".join(struct.pack("<I", len(f)) + f for f in files)
        inp = {"name": "image_files", "shape": [len(files), 1], "datatype": "BYTES",
               "parameters": {"binary_data_size": len(blob)}}
    header = json.dumps({"inputs": [inp], "outputs": outputs, "parameters": parameters or {}}).encode()
    req = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=header + blob, method="POST",
                                 headers={"Content-Type": "application/octet-stream",
                                          "Inference-Header-Content-Length": str(len(header))})

    def strict(c):
        raise ValueError(f"non-standard JSON constant {c} in the response")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read(), parse_constant=strict)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read(), parse_constant=strict)


def _outputs(body: dict) -> dict:
    return {o["name"]: o for o in body["outputs"]}


def test_same_file_three_ways(server, served_bundle, images, tmp_path):
    """One defective cell as file bytes from a standard-library HTTP client, as bytes through GladClient, and
    through `glad detect`'s Detector in process: one score (1e-5) and the same defect regions."""
    import json

    from glad_runtime.detector import Detector
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.serving.client import GladClient

    path = tmp_path / "cell.png"
    path.write_bytes(_png(images[1]))
    local = Detector(OrtEngines(served_bundle, intra_op_threads=1), served_bundle.config,
                     served_bundle.calibration())
    (ref, _), = local.detect([path])
    assert ref.ok and ref.pixel_threshold is not None and ref.regions, ref
    with GladClient(server.grpc_url, "tiny_line") as client:
        (sdk,) = client.detect([path.read_bytes()])
    status, body = _http_infer(server.http_url, "tiny_line_glad", [path.read_bytes()],
                               parameters={"map_size": "original"})
    assert status == 200, body
    o = _outputs(body)
    h, w = o["image_sizes"]["data"]
    assert (h, w) == (300, 300) and o["anomaly_maps"]["shape"] == [1, 300, 300]
    http_regions = json.loads(o["regions"]["data"][0])
    for score in (sdk.score, o["scores"]["data"][0]):
        assert score == pytest.approx(ref.score, abs=1e-5)
    assert sdk.label == ref.label and o["labels"]["data"][0] == int(ref.label == "anomalous")
    assert sdk.adaptive_step == ref.adaptive_step == o["adaptive_steps"]["data"][0]
    boxes = [(r.x, r.y, r.width, r.height, r.area) for r in ref.regions]
    assert [(r.x, r.y, r.width, r.height, r.area) for r in sdk.regions] == boxes
    assert [(r["x"], r["y"], r["width"], r["height"], r["area"]) for r in http_regions] == boxes
    assert [r["peak"] for r in http_regions] == pytest.approx([r.peak for r in ref.regions], abs=1e-5)
    mask = np.asarray(o["defect_masks"]["data"], np.uint8).reshape(h, w)
    np.testing.assert_array_equal(mask.astype(bool), ref.defect_mask())
    np.testing.assert_allclose(sdk.map_at_original_size(), ref.map_at_original_size(), atol=1e-5)
    # the default (working-size) form of the same request: D x D maps, regions still in original pixels
    status, body = _http_infer(server.http_url, "tiny_line_glad", [path.read_bytes()])
    d = served_bundle.config.dino_resolution
    assert status == 200 and _outputs(body)["anomaly_maps"]["shape"] == [1, d, d]
    assert json.loads(_outputs(body)["regions"]["data"][0]) == http_regions


def test_uncalibrated_ads_off_response_is_strict_json(server, images):
    """Plain JSON (the file as base64 text): every output defined, explicit states, no NaN anywhere."""
    status, body = _http_infer(server.http_url, "tiny_raw_glad", [_png(images[0]), _png(images[1])], b64=True)
    assert status == 200, body
    o = _outputs(body)
    assert o["calibrated"]["data"] == [False, False] and o["labels"]["data"] == [-1, -1]
    assert o["normalized_scores"]["data"] == [-1.0, -1.0] and o["thresholds"]["data"] == [-1.0, -1.0]
    assert o["ads_states"]["data"] == [0, 0] and o["adaptive_steps"]["data"] == [-1, -1]
    assert o["ads_scores"]["data"] == [-1.0, -1.0] and o["regions"]["data"] == ["null", "null"]
    assert o["pixel_thresholds"]["data"] == [-1.0, -1.0] and not any(o["defect_masks"]["data"])
    assert all(np.isfinite(o["scores"]["data"])) and min(o["scores"]["data"]) > 0


def test_bad_input_refused_with_its_index(server, images, reference, tmp_path):
    """Out-of-range floats and a corrupt file are refused (INVALID_ARGUMENT / HTTP 400) naming the range or the
    image index; the client types them BadInputError and completes the others."""
    from glad_runtime.serving.client import BadInputError, GladClient

    r = 128
    for bad in (np.full((1, 3, r, r), 127.0, np.float32), np.full((1, 3, r, r), 5.0, np.float32)):
        status, body = _http_infer(server.http_url, "tiny_line_glad", tensor=bad)
        assert status == 400 and "[-1, 1]" in body["error"], body
    good = _png(images[0])
    # issue 27: one corrupt file in a 3-image request: two scores and one error, in the `errors` output
    status, body = _http_infer(server.http_url, "tiny_line_glad", [good, good[:300], _png(images[1])])
    assert status == 200, body
    o = _outputs(body)
    assert o["errors"]["data"][0] == "" and o["errors"]["data"][2] == ""
    assert o["errors"]["data"][1].startswith("[INVALID_ARGUMENT] ImageLoadError: image_files[1]: not a readable image")
    s = o["scores"]["data"]
    assert s[1] == -1.0 and s[0] > 0 and s[2] > 0 and o["image_sizes"]["data"][2:4] == [0, 0]
    _, ref = reference
    assert s[0] == pytest.approx(float(ref.scores[0]), abs=ATOL) and s[2] == pytest.approx(float(ref.scores[1]),
                                                                                            abs=ATOL)
    # a one-image request that fails gets the image's error as the request's (HTTP 400)
    status, body = _http_infer(server.http_url, "tiny_line_glad", [good[:300]])
    assert status == 400 and "image_files[0]" in body["error"] and "not a readable image" in body["error"], body
    with GladClient(server.grpc_url, "tiny_line") as client:
        dets = client.detect([np.full((3, r, r), 127.0, np.float32), good, b"GIF89a broken", images[1]])
    assert [type(d.error).__name__ if d.error else None for d in dets] == ["BadInputError", None, "BadInputError",
                                                                           None]
    assert "[-1, 1]" in str(dets[0].error) and dets[1].regions is not None


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

    with GladClient(server.grpc_url, "no_such_bundle", timeout=3) as client:  # retried until the deadline
        with pytest.raises(ModelNotFoundError):
            client.detect(images[:1])
    with GladClient(server.grpc_url, "tiny_line", timeout=0.001) as client:
        with pytest.raises(DeadlineExceededError):
            client.detect(images[:1])
    dead = f"127.0.0.1:{free_port()}"
    with GladClient(dead, "tiny_line", retries=2, backoff=0.05, timeout=2) as client:
        assert client.health() == {dead: False}
        with pytest.raises(ServerUnavailableError):  # gives up within its 2 s deadline
            client.detect(images[:1])


# ---------------------------------------------------------------------------------------------- hostile input
def _zero_png(width: int, height: int, bits: int = 8) -> bytes:
    """A valid grayscale PNG of zeros (8 or 16 bit), compressed row by row: a 30000 x 30000 file is about 0.9 MB
    (a decompression bomb) without ever holding the image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + width * bits // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def oversized():
    """Files over the default pixel limit (100 MP): a 30000 x 30000 bomb, a 12000 x 12000 grey PNG (Pillow's own
    writer) and an 11000 x 10000 16-bit PNG."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buf, format="PNG")
    return {"bomb": _zero_png(30000, 30000), "grey": buf.getvalue(), "16bit": _zero_png(11000, 10000, 16)}


def test_empty_requests_refused_and_server_serves(server, images, reference):
    """Issue 27: a request of zero images (``image_files`` [0, 1]) crashed tritonserver (SIGSEGV in the python
    backend). Over HTTP, gRPC and a gRPC stream it is now a 400 / INVALID_ARGUMENT, and the server serves on."""
    import queue

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from glad_runtime.serving.client import GladClient

    empty = np.zeros((0, 1), np.object_)
    h = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("image_files", [0, 1], "BYTES")
    inp.set_data_from_numpy(empty)
    with pytest.raises(Exception) as info:
        h.infer("tiny_line_glad", [inp])
    assert "400" in str(info.value) and "holds no image" in str(info.value)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    for model in ("tiny_line_glad",):
        ginp = grpcclient.InferInput("image_files", [0, 1], "BYTES")
        ginp.set_data_from_numpy(empty)
        with pytest.raises(Exception) as info:
            g.infer(model, [ginp])
        assert "INVALID_ARGUMENT" in str(info.value) and "holds no image" in str(info.value)
    answers = queue.Queue()
    g.start_stream(callback=lambda result, error: answers.put((result, error)))
    ginp = grpcclient.InferInput("image_files", [0, 1], "BYTES")
    ginp.set_data_from_numpy(empty)
    g.async_stream_infer("tiny_line_glad_inflight", [ginp], request_id="empty")
    _, err = answers.get(timeout=60)
    g.stop_stream()
    g.close()
    assert err is not None and "[INVALID_ARGUMENT]" in str(err) and "holds no image" in str(err)
    assert server.running() and server.ready()
    with GladClient(server.grpc_url, "tiny_line") as client:
        _check(client.detect(images[:1]), reference, [0])
        (d,) = list(client.stream(images[1:2]))
        _check([d], reference, [1])


def test_oversized_images_refused_while_good_requests_complete(server, images, reference, oversized):
    """Issue 27: a bomb, a 12000 x 12000 grey PNG and an over-limit 16-bit PNG, each sent at the same moment as 5
    good requests: each oversized one gets a typed 400 naming its size and the limit (no server path), and every
    good one its in-process score. Also: one request mixing good and oversized, and the SDK typing it."""
    import threading

    from glad_runtime.serving.client import BadInputError, GladClient

    good = [_png(images[k % 4]) for k in range(5)]
    results, took = {}, {}

    def send(key, data):
        t0 = time.perf_counter()
        results[key] = _http_infer(server.http_url, "tiny_line_glad", [data])
        took[key] = time.perf_counter() - t0

    jobs = [(k, v) for k, v in oversized.items()] + [(f"good{k}", g) for k, g in enumerate(good)]
    threads = [threading.Thread(target=send, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    _, ref = reference
    for key, size in (("bomb", "30000x30000"), ("grey", "12000x12000"), ("16bit", "11000x10000")):
        status, body = results[key]
        assert status == 400, (key, body)
        assert f"ImageTooLargeError: image_files[0]: {size}" in body["error"] and "100,000,000" in body["error"]
        assert "/" not in body["error"].split("pixels per image")[0], body  # no server path
    for k in range(5):
        status, body = results[f"good{k}"]
        assert status == 200, body
        assert _outputs(body)["scores"]["data"][0] == pytest.approx(float(ref.scores[k % 4]), abs=ATOL)
    print("\noversized answered in " + ", ".join(f"{k} {took[k]:.2f} s" for k in oversized)
          + "; good in " + ", ".join(f"{took[f'good{k}']:.2f}" for k in range(5)) + " s")
    with GladClient(server.grpc_url, "tiny_line") as client:
        dets = client.detect([images[0], oversized["bomb"], images[1]])
        stats = client.stats()
    _check([dets[0], dets[2]], reference, [0, 1])
    assert isinstance(dets[1].error, BadInputError) and "ImageTooLargeError" in str(dets[1].error)
    assert stats["retries"] == 0  # never resent


def test_working_maps_by_default_and_regions_in_original_pixels(server, images, reference):
    """Issue 27: the served default map_size is "working" (D x D whatever the image size); "original" on request;
    regions are in original-image pixels either way."""
    import io

    from PIL import Image

    big = np.asarray(Image.fromarray(images[1]).resize((900, 600), Image.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    status, body = _http_infer(server.http_url, "tiny_line_glad", [buf.getvalue()])
    assert status == 200, body
    o = _outputs(body)
    assert o["anomaly_maps"]["shape"] == [1, 224, 224] and o["image_sizes"]["data"] == [600, 900]
    status, body2 = _http_infer(server.http_url, "tiny_line_glad", [buf.getvalue()],
                                parameters={"map_size": "original"})
    o2 = _outputs(body2)
    assert status == 200 and o2["anomaly_maps"]["shape"] == [1, 600, 900]
    assert o["regions"]["data"] == o2["regions"]["data"]
    import json

    for r in json.loads(o["regions"]["data"][0]) or []:
        assert r["x"] + r["width"] <= 900 and r["y"] + r["height"] <= 600


def test_region_boxes_hold_the_regions_for_http_clients(server, images):
    """Issue 32: a plain-JSON HTTP client reads the regions as numbers (region_counts, region_boxes: no second
    parse), equal to the regions JSON, for a request of three images (one corrupt) and for the uncalibrated model
    (no pixel threshold: count -1); a client naming only the old outputs still gets regions as before."""
    import json

    files = [_png(images[1]), b"not an image", _png(images[3])]
    status, body = _http_infer(server.http_url, "tiny_line_glad", files, b64=True)
    assert status == 200, body
    o = _outputs(body)
    counts, boxes = o["region_counts"], o["region_boxes"]
    assert counts["datatype"] == "INT32" and counts["shape"] == [3, 1]
    assert boxes["datatype"] == "FP64" and boxes["shape"][0] == 3 and boxes["shape"][2] == 7
    k = boxes["shape"][1]
    regions = [json.loads(x) for x in o["regions"]["data"]]
    assert regions[1] is None and counts["data"][1] == -1 and regions[0]  # the corrupt one: -1, null
    assert k == max(1, *counts["data"])
    flat = boxes["data"]
    for b in range(3):
        rows = [flat[(b * k + j) * 7:(b * k + j) * 7 + 7] for j in range(k)]
        n = max(0, counts["data"][b])
        assert n == len(regions[b] or [])
        assert rows[:n] == [[r[c] for c in ("x", "y", "width", "height", "area", "peak", "mean")] for r in
                            regions[b] or []]
        assert all(v == -1 for row in rows[n:] for v in row)
    status, body = _http_infer(server.http_url, "tiny_raw_glad", [_png(images[0])])  # no pixel threshold
    o = _outputs(body)
    assert status == 200 and o["region_counts"]["data"] == [-1] and o["region_boxes"]["data"] == [-1.0] * 7
    # an existing client naming its outputs (without the new ones) gets what it asked for
    from glad_runtime.serving import protocol

    old = [n for n in protocol.GLAD_OUTPUT_NAMES if n not in ("region_counts", "region_boxes")]
    status, body = _http_infer(server.http_url, "tiny_line_glad", [files[0]], outputs=old)
    assert status == 200 and [x["name"] for x in body["outputs"]] == old
    assert json.loads(_outputs(body)["regions"]["data"][0]) == regions[0]


def test_malformed_bodies_are_not_retryable_and_leave_the_server_serving(server, images, reference):
    """Issue 27: malformed HTTP bodies ({}, a negative shape, data not matching its shape, 50 MB of garbage) are
    answered by Triton's own parser (often 500); the client's classification calls each non-retryable, and the
    server serves the next request."""
    import json
    import urllib.error
    import urllib.request

    from glad_runtime.serving.client import GladClient
    from glad_runtime.serving.routing import classify

    url = f"http://{server.http_url}/v2/models/tiny_line_glad/infer"
    bodies = {
        "empty object": b"{}",
        "negative shape": json.dumps({"inputs": [{"name": "image_files", "shape": [-1, 1], "datatype": "BYTES",
                                                  "data": ["aGk="]}]}).encode(),
        "data not matching the shape": json.dumps({"inputs": [{"name": "images", "shape": [1, 3, 128, 128],
                                                               "datatype": "FP32", "data": [0.0, 1.0]}]}).encode(),
        "50 MB of garbage": np.random.default_rng(0).integers(0, 256, 50 * 2**20, dtype=np.uint8).tobytes(),
    }
    for what, body in bodies.items():
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                pytest.fail(f"{what}: answered {r.status}")
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode("utf-8", "replace")
        message = json.loads(text).get("error", text) if text.startswith("{") else text
        cls, retryable = classify(str(status), message)
        assert 400 <= status < 600 and not retryable, (what, status, message)
    assert server.running() and server.ready()
    with GladClient(server.grpc_url, "tiny_line") as client:
        _check(client.detect(images[:1]), reference, [0])


def test_partial_deployment_not_ready_and_tampered_graph_refused(repo, tmp_path):
    """Issue 27: a replica whose repository lacks a network model never reports its entry models READY (they refuse
    to load, naming what is missing), and a served model.onnx modified after the repository was written refuses
    to load, naming the file."""
    from glad_runtime.errors import ServerStartError

    partial = tmp_path / "partial" / "models"
    shutil.copytree(repo, partial)
    shutil.rmtree(partial / "tiny_line_unet")
    shutil.rmtree(partial / "tiny_raw_glad")
    with pytest.raises(ServerStartError) as info:  # tritonserver exits: a model of the repository failed to load
        launch_server(partial, ready_timeout=120)
    assert "tiny_line_unet" in str(info.value) and "missing" in str(info.value)
    # kept running despite the failure (--exit-on-error=false): /v2/health/ready never says yes
    with pytest.raises(ServerStartError, match="not ready after"):
        launch_server(partial, ready_timeout=8, extra_args=("--exit-on-error=false",))
    tampered = tmp_path / "tampered" / "models"
    shutil.copytree(repo, tampered)
    shutil.rmtree(tampered / "tiny_raw_glad")
    onnx = tampered / "tiny_line_dino" / "1" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    onnx.unlink()  # a hard link to the bundle's file: never modify it in place
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(ServerStartError) as info:
        launch_server(tampered, ready_timeout=120)
    assert "sha256" in str(info.value) and "model.onnx" in str(info.value)


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
