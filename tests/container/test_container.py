"""The CPU container image built and run for real (issue 34): podman on this host, loopback ports only, no mocks.

The tiny exported bundle is served as ``glad serve BUNDLE --target cpu --deploy`` writes it: the Debian base made
from Debian's packages (:func:`triton_models.podman.make_base`, standing in for ``python:3.11-slim``), the image
built from the generated recipe, and two containers started from it:

* ``A``: ``--cpus 1 --read-only`` (a CPU quota, and a read-only root file system),
* ``B``: no limits.

Checked against them, in this order (the module's tests share the containers): ready within the manifests' start
period and healthy by the image's own HEALTHCHECK; the drain-aware entrypoint is PID 1, non-root, and nothing but ``/dev/shm``
and ``/tmp`` is writable in ``A``; the served ONNX Runtime sessions size their threads by the cgroup rule (1 in ``A``,
this host's usable cores in ``B``); the same scores as ``glad detect`` over HTTP (tritonclient.http) and gRPC
(:class:`GladClient`); ``A`` killed (``podman kill``) mid-stream behind the client with every image answered once
with its in-process score; ``B`` stopped (``podman stop``, SIGTERM) while 16 requests are in flight, every one
answered before it exits 0. Figures (build and start times, image size, counts) are printed (``pytest -s``).

Skipped, with the reason, where podman / runc / mmdebstrap are missing or podman cannot run here.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")

from conftest import detect_without_torch, png_bytes  # noqa: E402
from glad_runtime.core.cpus import usable_cores  # noqa: E402
from triton_models import podman as pm  # noqa: E402
from triton_models.server import free_port, server_available  # noqa: E402

_PROBLEM = pm.runtime_problem() if server_available() else "nvidia-pytriton is not installed"
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"no container runtime here: {_PROBLEM}")

PREFIX = "tiny"
IMAGE = "localhost/glad-triton-cpu:test"
ATOL = 1e-4
#: The manifests' and the HEALTHCHECK's start period (triton_models.deploy).
START_PERIOD_S = 120
FIGURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def files(elpv_images, tmp_path_factory):
    """Eight real ELPV cells as PNG files (four normal, four defective), as a folder and as bytes."""
    good, bad = elpv_images
    folder = tmp_path_factory.mktemp("cells")
    data = []
    for k, arr in enumerate([g for pair in zip(good, bad) for g in pair]):
        (folder / f"cell{k}.png").write_bytes(png_bytes(arr))
        data.append((f"cell{k}.png", png_bytes(arr)))
    return folder, data


@pytest.fixture(scope="module")
def expected(exported_bundle, files, tmp_path_factory):
    """``{file name: score}`` from ``glad detect BUNDLE FOLDER --engine ort`` (a fresh interpreter, no torch)."""
    folder, _ = files
    records = detect_without_torch(exported_bundle[0].path, folder, tmp_path_factory.mktemp("detect"),
                                   ["--engine", "ort"])
    return {os.path.basename(r["source"]): (float(r["score"]), int(r["adaptive_step"])) for r in records}


@pytest.fixture(scope="module")
def image(exported_bundle, tmp_path_factory):
    """The CPU image of the tiny bundle: repository, ``--deploy --target cpu`` recipe, Debian base, build."""
    from triton_models.deploy import write_deploy
    from triton_models.repository import generate_repository

    work = tmp_path_factory.mktemp("container")
    generate_repository(exported_bundle[0], work / "models", target="cpu", prefix=PREFIX)
    write_deploy(work / "models", work / "deploy", image=IMAGE, target="cpu", exit_timeout_s=60)
    try:  # the environment, not the product: no Debian mirror, or a sandbox that refuses containers
        base_s = pm.make_base()
    except pm.ContainerError as e:
        pytest.skip(f"cannot make the Debian base image here: {e}")
    problem = pm.runs_containers()
    if problem:
        pytest.skip(f"podman cannot start a container here: {problem}")
    build_s = pm.build_image(work / "deploy", IMAGE)
    FIGURES["base"] = f"{base_s:.0f} s" if base_s else "present (kept)"
    FIGURES["build"] = f"{build_s:.0f} s"
    FIGURES["image size"] = f"{pm.image_size(IMAGE) / 2**20:.0f} MiB"
    return IMAGE


def _start(image: str, name: str, **kw) -> pm.Container:
    return pm.run_container(image, name, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            **kw)


@pytest.fixture(scope="module")
def containers(image):
    """``(A, B)``: A with ``--cpus 1 --read-only``, B without limits; both ready (start times recorded)."""
    a = _start(image, "glad-test-a", cpus=1, read_only=True)
    b = _start(image, "glad-test-b")
    try:
        FIGURES["ready A (--cpus 1, read-only)"] = f"{a.wait_ready(START_PERIOD_S):.1f} s"
        FIGURES["ready B"] = f"{b.wait_ready(START_PERIOD_S):.1f} s"
        yield a, b
    finally:
        for c in (a, b):
            c.remove()
        print("\ncontainer figures: " + "; ".join(f"{k}: {v}" for k, v in FIGURES.items()))


def test_ready_healthy_entrypoint_non_root_read_only(containers):
    """Ready within the start period (the fixture waited at most that), healthy by the image's HEALTHCHECK, the
    entrypoint is PID 1 (it gets the stop signal and drains) with tritonserver its child, the user is uid 1000,
    and A's root file system refuses writes while /dev/shm and /tmp (tmpfs) take them."""
    a, b = containers
    for c in (a, b):
        assert pm.podman("healthcheck", "run", c.name, check=False).returncode == 0, c.logs()[-2000:]
        assert c.state().get("Health", {}).get("Status") == "healthy"
        pid1 = c.exec("cat", "/proc/1/cmdline").split("\0")
        assert pid1[1:3] == ["-m", "triton_models.entrypoint"] and "--model-repository=/models" in pid1, pid1
        procs = c.exec("sh", "-c", "for p in /proc/[0-9]*; do echo $(cat $p/stat | cut -d' ' -f4) "
                       "$(tr '\\0' ' ' < $p/cmdline); done").splitlines()
        server = [ln for ln in procs if "/bin/tritonserver " in ln]
        assert len(server) == 1 and server[0].startswith("1 "), procs  # one tritonserver, PID 1's child
        assert "--model-control-mode=explicit" in server[0]
        assert c.exec("id", "-u").strip() == "1000"
    for path in ("/opt/glad/probe", "/var/tmp/probe", "/run/probe", "/models/probe"):
        denied = pm.podman("exec", a.name, "sh", "-c", f"echo x > {path}", check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (path, denied.stderr)
    for path in ("/dev/shm/probe", "/tmp/probe"):  # the two writable places (the python backend needs both)
        assert pm.podman("exec", a.name, "sh", "-c", f"echo x > {path} && rm {path}").returncode == 0


def _threads_logged(container: pm.Container) -> dict[str, tuple[int, int]]:
    """``{model: (intra-op threads, usable cores)}`` from the served ONNX Runtime models' start-up lines."""
    import re

    found = {}
    for m in re.finditer(r'"(\w+): ONNX Runtime intra-op threads (\d+) \(usable cores (\d+)', container.logs()):
        found[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return found


def test_cpu_quota_sizes_the_onnx_runtime_threads(containers):
    """``--cpus 1`` (a CFS quota) gives every served ONNX Runtime session 1 thread (glad_runtime.core.cpus: the
    quota read from the container's cgroup); without a quota, this host's usable cores (one instance each)."""
    a, b = containers
    in_a, in_b = _threads_logged(a), _threads_logged(b)
    models = {f"{PREFIX}_{s}" for s in ("unet", "vae_encoder", "vae_decoder", "dino", "dino_ads", "ads_check")}
    assert models <= set(in_a) and models <= set(in_b), (in_a, in_b)
    assert {in_a[m] for m in models} == {(1, 1)}
    host = usable_cores()
    assert {in_b[m] for m in models} == {(host, host)}
    FIGURES["threads with --cpus 1"] = "1"
    FIGURES["threads without a quota"] = str(host)


def test_same_scores_as_glad_detect_over_http_and_grpc(containers, files, expected):
    """The same files, sent as bytes to A over HTTP (tritonclient.http, BYTES ``image_files``) and to B over
    gRPC (GladClient): the scores and adaptive steps of ``glad detect`` on the bundle, in process."""
    from glad_runtime.serving.client import GladClient

    a, b = containers
    _, data = files
    http = httpclient.InferenceServerClient(a.http_url)
    for name, payload in data[:4]:
        inp = httpclient.InferInput("image_files", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[payload]], dtype=object), binary_data=True)
        out = http.infer(f"{PREFIX}_glad", [inp], outputs=[httpclient.InferRequestedOutput("scores"),
                                                             httpclient.InferRequestedOutput("adaptive_steps")])
        score, step = expected[name]
        assert float(out.as_numpy("scores").ravel()[0]) == pytest.approx(score, abs=ATOL), name
        assert int(out.as_numpy("adaptive_steps").ravel()[0]) == step
    with GladClient(b.grpc_url, PREFIX, timeout=120) as client:
        dets = client.detect([payload for _, payload in data])
    for (name, _), d in zip(data, dets):
        assert d.error is None, d.error
        assert d.score == pytest.approx(expected[name][0], abs=ATOL) and d.adaptive_step == expected[name][1]


def test_kill_one_container_mid_stream(containers, files, expected):
    """A and B behind one client streaming 24 images to the in-flight model; A is killed (``podman kill``)
    after the first answers: every image is answered exactly once, with its ``glad detect`` score."""
    from glad_runtime.serving.client import GladClient

    a, b = containers
    _, data = files
    items = [data[k % len(data)] for k in range(24)]
    got: dict[int, float] = {}
    errors = []
    killed_after = None
    with GladClient([a.grpc_url, b.grpc_url], PREFIX, timeout=180, backoff=0.1, cooldown=1.0) as client:
        for det in client.stream([payload for _, payload in items], window=8):
            k = int(det.source.lstrip("#"))
            assert k not in got, f"image {k} answered twice"
            if det.error is not None:
                errors.append((k, det.error))
                continue
            got[k] = det.score
            if killed_after is None and len(got) >= 3:
                a.kill()
                killed_after = len(got)
    assert not errors, errors
    assert sorted(got) == list(range(len(items)))
    for k, score in got.items():
        assert score == pytest.approx(expected[items[k][0]][0], abs=ATOL), k
    assert not a.state().get("Running", True)
    FIGURES["failover"] = f"{len(got)}/{len(items)} answered once, A killed after {killed_after}, 0 errors"


def test_sigterm_drains_in_flight_requests(containers, files, expected):
    """16 concurrent one-image requests to B, then ``podman stop`` (SIGTERM to the entrypoint, PID 1) once the
    server holds them: every request is answered with its score before the container exits with code 0 (the
    entrypoint drains the entry models before tritonserver gets SIGTERM)."""
    from glad_runtime.serving.client import GladClient

    _, b = containers
    _, data = files
    results: dict[int, object] = {}
    lock = threading.Lock()

    def one(k: int) -> None:
        name, payload = data[k % len(data)]
        with GladClient(b.grpc_url, PREFIX, timeout=120, retries=0) as client:
            try:
                (det,) = client.detect([payload])
                value = det.error or det.score
            except Exception as e:  # noqa: BLE001 (counted, then asserted on)
                value = e
        with lock:
            results[k] = (name, value)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _pending(b) < 14:  # all 16 in the server: 2 executing, 14 queued
        time.sleep(0.05)
    pending = _pending(b)
    code = b.stop(timeout=120)
    for t in threads:
        t.join(timeout=180)
    answered = [k for k, (_, v) in results.items() if isinstance(v, float)]
    failed = {k: v for k, (_, v) in results.items() if not isinstance(v, float)}
    assert not failed, failed
    assert len(answered) == 16
    for k in answered:
        name, score = results[k]
        assert score == pytest.approx(expected[name][0], abs=ATOL)
    assert code == 0, b.logs()[-3000:]
    FIGURES["drain"] = f"{len(answered)}/16 answered after SIGTERM ({pending} in the server at the signal), exit 0"


def _pending(c: pm.Container) -> int:
    """Requests the server holds now (queued, not yet executing) for the entry model, from Triton's metrics."""
    import urllib.request

    from bench.perf.rules import parse_prometheus

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{c.metrics_port}/metrics", timeout=2) as r:
            series = parse_prometheus(r.read().decode())
    except OSError:
        return 0
    return int(sum(v for (name, labels), v in series.items()
                   if name == "nv_inference_pending_request_count" and ("model", f"{PREFIX}_glad") in labels))
