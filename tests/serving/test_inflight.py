"""In-flight batching in the server (issue 17) against a REAL tritonserver, no mocks.

``<prefix>_glad_inflight`` (decoupled python backend, ``triton_models/python/glad_inflight_model.py``) runs one
step-level pool (``StepScheduler``) over the network models. Every result is compared with the in-process ONNX
Runtime pipeline on real ELPV images (``tests/serving/test_serving.py``'s reference) and with the per-batch model
``<prefix>_glad`` of the same server, whatever arrived beside it. The repository here has a small pool
(``max_active`` 2, ``max_queue`` 2: capacity 4 images) so back-pressure is reachable with a few requests, and
overlapped ticks (admission and finishing beside the denoising step).
"""

from __future__ import annotations

import json
import queue
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")

from test_serving import ATOL, _png, images, reference, served_bundle  # noqa: E402,F401 (fixtures)
from triton_models.server import launch_server, server_available  # noqa: E402

pytestmark = pytest.mark.skipif(not server_available(), reason="nvidia-pytriton (the tritonserver binary) not "
                                "installed; pip install -e .[serve]")

PREFIX = "tiny_line"
MODEL = f"{PREFIX}_glad_inflight"
CAPACITY = 4


@pytest.fixture(scope="module")
def server(served_bundle, tmp_path_factory):
    from triton_models.repository import generate_repository

    path = tmp_path_factory.mktemp("inflight") / "models"
    generate_repository(served_bundle, path, max_batch=4, inflight_max_active=2, inflight_max_queue=2,
                        inflight_overlap=True)  # the overlapped ticks (the default with one ORT thread per model)
    srv = launch_server(path, ready_timeout=240)
    yield srv
    srv.stop()


class RawStream:
    """tritonclient's own gRPC stream API (``start_stream`` / ``async_stream_infer``): a client independent of
    ``GladClient.stream``. Responses are ``(seconds since start, request id, result or None, error or None)``."""

    def __init__(self, url):
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.t0 = time.monotonic()
        self.client.start_stream(callback=lambda result, error: self.responses.put(
            (time.monotonic() - self.t0, None if result is None else result.get_response().id, result, error)))

    def send(self, rid: str, image: np.ndarray, timeout_us: int | None = None):
        inp = grpcclient.InferInput("image_files", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([_png(image)], dtype=np.object_).reshape(1, 1))
        self.client.async_stream_infer(MODEL, [inp], request_id=rid, timeout=timeout_us,
                                       outputs=[grpcclient.InferRequestedOutput(n) for n in
                                                ("scores", "adaptive_steps", "anomaly_maps", "labels")])

    def collect(self, n: int, timeout: float = 180.0) -> list:
        return [self.responses.get(timeout=timeout) for _ in range(n)]

    def close(self):
        self.client.stop_stream()
        self.client.close()


def _check_result(result, k, reference):
    _, ref = reference
    assert float(result.as_numpy("scores").ravel()[0]) == pytest.approx(float(ref.scores[k]), abs=ATOL)
    assert int(result.as_numpy("adaptive_steps").ravel()[0]) == int(ref.adaptive_steps[k])


def test_stream_equals_per_batch_model_and_in_process(server, images, reference):
    """GladClient.stream with a window of 3 over 9 inputs (the four cells twice, normal and defective mixed, and
    one unreadable file): new images join while others are mid-loop; each result equals the in-process pipeline
    and the per-batch model's; the unreadable one alone fails, with BadInputError."""
    from glad_runtime.serving.client import BadInputError, GladClient

    inputs = [_png(i) for i in images] + [b"not an image"] + [_png(i) for i in images]
    with GladClient(server.grpc_url, PREFIX, timeout=120) as client:
        per_batch = client.detect(inputs)
        streamed = list(client.stream(inputs, window=3))
        stats = client.stats()
    assert sorted(d.source for d in streamed) == sorted(f"#{i}" for i in range(len(inputs)))  # each exactly once
    by_source = {d.source: d for d in streamed}
    bad = by_source.pop("#4")
    assert isinstance(bad.error, BadInputError) and "image_files[0]" in str(bad.error)
    _, ref = reference
    for src, d in by_source.items():
        i = int(src[1:])
        k = i % 5  # inputs 5..8 repeat 0..3
        assert d.error is None, d.error
        assert d.score == pytest.approx(float(ref.scores[k]), abs=ATOL)
        assert d.adaptive_step == int(ref.adaptive_steps[k]) == per_batch[i].adaptive_step
        assert d.score == pytest.approx(per_batch[i].score, abs=ATOL)
        assert d.label == per_batch[i].label and d.label is not None  # the served calibration labels both
        np.testing.assert_allclose(d.anomaly_map, per_batch[i].anomaly_map, atol=ATOL)
        assert [(r.x, r.y, r.width, r.height, r.area) for r in d.regions] == \
            [(r.x, r.y, r.width, r.height, r.area) for r in per_batch[i].regions]
        np.testing.assert_allclose([(r.peak, r.mean) for r in d.regions],
                                   [(r.peak, r.mean) for r in per_batch[i].regions], atol=ATOL)
    assert stats["retries"] == 0


def test_stopping_a_stream_early_releases_its_replicas(server, images):
    """A caller that stops iterating (generator closed) leaves no attempt counted as outstanding on a replica, and
    the server, whose stream was cancelled, still answers the next stream."""
    from glad_runtime.serving.client import GladClient

    with GladClient(server.grpc_url, PREFIX, timeout=120) as client:
        gen = client.stream([_png(i) for i in images], window=3)
        first = next(gen)
        gen.close()
        assert first.error is None
        assert all(r["outstanding"] == 0 and r["state"] == "closed" for r in client.stats()["replicas"].values())
        again = list(client.stream([_png(images[0])], window=1))
    assert len(again) == 1 and again[0].error is None


def test_staggered_arrivals_join_the_running_loop(server, images, reference):
    """Requests arriving while others are mid-loop (tritonclient's stream API, not the SDK): each answered once,
    each equal to the in-process result, and the last arrival does not wait for the first ones' whole loop."""
    s = RawStream(server.grpc_url)
    try:
        s.send("a0", images[0])
        s.send("a1", images[1])
        time.sleep(0.4)  # a0, a1 are mid-loop now
        s.send("b2", images[2])
        time.sleep(0.2)
        s.send("b3", images[3])
        got = s.collect(4)
    finally:
        s.close()
    assert all(err is None for _, _, _, err in got), [str(e) for *_, e in got if e]
    assert sorted(rid for _, rid, _, _ in got) == ["a0", "a1", "b2", "b3"]
    for _, rid, result, _ in got:
        _check_result(result, int(rid[1]), reference)


def test_full_pool_refuses_at_once_and_keeps_the_rest(server, images, reference):
    """7 single-image requests at once on a pool of 4: 3 refused at once with the tagged retryable error
    ([UNAVAILABLE] in-flight pool full, before any image finishes), the 4 admitted answered correctly."""
    s = RawStream(server.grpc_url)
    try:
        for i in range(7):
            s.send(f"r{i}", images[i % 4])
        got = s.collect(7)
    finally:
        s.close()
    refused = [(t, err) for t, _, _, err in got if err is not None]
    done = [(t, rid, result) for t, rid, result, err in got if err is None]
    assert len(refused) == 7 - CAPACITY and len(done) == CAPACITY, [str(e) for _, e in refused]
    assert all(str(err).startswith("[UNAVAILABLE] in-flight pool full") for _, err in refused)
    assert max(t for t, _ in refused) < min(t for t, _, _ in done)
    for _, rid, result in done:
        _check_result(result, int(rid[1:]) % 4, reference)


def test_abandoned_request_leaves_the_pool(server, images, reference):
    """A request whose timeout (0.05 s) passes mid-loop is dropped from the pool and answered 'deadline
    exceeded' before a full reconstruction; its pool mate and the next request are answered correctly."""
    s = RawStream(server.grpc_url)
    try:
        s.send("live", images[1])
        s.send("late", images[0], timeout_us=50_000)  # well inside one reconstruction (about 0.3 s here)
        first = s.collect(2)
        s.send("next", images[2])
        (after,) = s.collect(1)
    finally:
        s.close()
    by_id = {}
    for t, rid, result, err in first:
        by_id[rid or "late"] = (t, result, err)
    t_late, _, err = by_id["late"]
    assert err is not None and "deadline exceeded" in str(err) and str(err).startswith("[UNAVAILABLE]"), err
    t_live, live, err_live = by_id["live"]
    assert err_live is None and t_late < t_live
    _check_result(live, 1, reference)
    assert after[3] is None
    _check_result(after[2], 2, reference)


def test_glad_detect_server_stream(server, served_bundle, images, reference, tmp_path):
    """`glad detect BUNDLE DIR --server URL --stream` writes the same records, maps and overlays as glad detect,
    from the in-flight model."""
    from click.testing import CliRunner
    from PIL import Image

    from glad_cli.main import cli

    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"cell{i}.png")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["detect", str(served_bundle.path), str(tmp_path), "--out", str(out),
                                   "--server", server.grpc_url, "--stream", "--quiet"])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    _, ref = reference
    assert [r["source"] for r in records] == [str(tmp_path / f"cell{i}.png") for i in range(4)]
    for k, r in enumerate(records):
        assert r["score"] == pytest.approx(float(ref.scores[k]), abs=ATOL)
        assert (out / f"cell{k}_overlay.png").is_file() and (out / f"cell{k}_map.png").is_file()
    res = CliRunner().invoke(cli, ["detect", str(served_bundle.path), str(tmp_path), "--out", str(out), "--stream"])
    assert res.exit_code == 2 and "--server" in res.output
