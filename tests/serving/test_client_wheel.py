"""The line PC's install (issue 32), for real: the wheel built from this repository (``python -m build``), its
``client`` extra downloaded into a wheelhouse and installed from it **offline** (``pip install --no-index``) into a
fresh virtualenv, and that venv's ``glad detect BUNDLE IMAGES --server HOST:PORT --stream`` against a REAL
tritonserver, compared with the in-process ONNX Runtime pipeline. Skipped, with the reason, when the package
registry (PyPI or the configured mirror) cannot be reached: building and downloading need it.

The install's size, package by package, is printed (``pytest -s``) and written to ``client_install.json`` in the
test's temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("build")  # the `build` frontend (dev extra)

from test_serving import ATOL, _png, images, reference, served_bundle  # noqa: E402,F401 (fixtures)
from triton_models.server import launch_server, server_available  # noqa: E402

pytestmark = pytest.mark.skipif(not server_available(), reason="nvidia-pytriton (the tritonserver binary) not "
                                "installed; pip install -e .[serve]")

ROOT = Path(__file__).resolve().parents[2]
#: What a client-only install must not pull in (the runtime, engine and evaluation extras; tritonclient's HTTP half).
NOT_IN_CLIENT = {"scipy", "scikit-image", "torch", "onnxruntime", "onnx", "openvino", "scikit-learn", "matplotlib",
                 "diffusers", "timm", "safetensors", "geventhttpclient", "gevent", "aiohttp", "nvidia-pytriton"}
#: Run in the venv: every installed distribution's size in bytes, summed over the files of its RECORD.
SIZES = """
import importlib.metadata as md, json, os
rows = []
for d in md.distributions():
    total = 0
    for f in d.files or []:
        try:
            total += os.path.getsize(d.locate_file(f))
        except OSError:
            pass
    rows.append((d.metadata["Name"], d.version, total))
print(json.dumps(sorted(rows, key=lambda r: -r[2])))
"""


def _run(cmd, timeout=600, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _tail(res: subprocess.CompletedProcess, n: int = 15) -> str:
    return "\n".join((res.stdout + res.stderr).strip().splitlines()[-n:])


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory):
    """``(venv python, glad script, sizes)``: the wheel built from a copy of the repository, its client extra
    downloaded into a wheelhouse, then installed from the wheelhouse alone into a fresh venv."""
    tmp = tmp_path_factory.mktemp("client_wheel")
    probe = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp / "probe",
                  "tritonclient==2.73.0"], timeout=180)
    if probe.returncode != 0:
        pytest.skip(f"package registry unreachable (pip download tritonclient failed): {_tail(probe, 2)}")
    src = tmp / "src"  # a copy: the build writes egg-info and build/ beside the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "runs", "data",
                                                             "triton_backends", "triton_repo", ".cache"))
    res = _run([sys.executable, "-m", "build", "--outdir", tmp / "dist", src])  # sdist, then the wheel from it
    assert res.returncode == 0, _tail(res)
    (wheel,) = (tmp / "dist").glob("glad_toolkit-*-py3-none-any.whl")
    venv = tmp / "venv"
    res = _run([sys.executable, "-m", "venv", venv])
    assert res.returncode == 0, _tail(res)
    py = venv / "bin" / "python"
    res = _run([py, "-m", "pip", "download", "-d", tmp / "wheelhouse", f"{wheel}[client]"])  # with the registry
    assert res.returncode == 0, _tail(res)
    res = _run([py, "-m", "pip", "install", "--no-index", "--find-links", tmp / "wheelhouse",
                "glad-toolkit[client]"])  # offline: the wheelhouse only
    assert res.returncode == 0, _tail(res)
    res = _run([py, "-c", SIZES], cwd=tmp)  # not from the checkout: its egg-info would count as a package
    assert res.returncode == 0, _tail(res)
    sizes = json.loads(res.stdout)
    (tmp / "client_install.json").write_text(json.dumps({"wheel": wheel.name, "packages": sizes}, indent=1))
    base = {"pip", "setuptools", "wheel"}  # what `python -m venv` brings
    mine = [r for r in sizes if r[0].lower() not in base]
    print(f"\nclient install from {wheel.name}: {len(mine)} packages, "
          f"{sum(r[2] for r in mine) / 1e6:.1f} MB (+ {sum(r[2] for r in sizes if r not in mine) / 1e6:.1f} MB "
          "of the venv's own pip/setuptools)")
    for name, version, size in sizes:
        print(f"  {name} {version}: {size / 1e6:.1f} MB")
    return py, venv / "bin" / "glad", sizes


@pytest.fixture(scope="module")
def server(served_bundle, tmp_path_factory):
    from triton_models.repository import generate_repository

    path = tmp_path_factory.mktemp("wheel_repo") / "models"
    generate_repository(served_bundle, path, max_batch=4)
    srv = launch_server(path, ready_timeout=240)
    yield srv
    srv.stop()


def test_client_wheel_streams_against_a_real_server(client_venv, server, served_bundle, images, reference,
                                                    tmp_path):
    """The client-only venv has no runtime extra; its `glad detect --server --stream` (the bundle's config,
    manifest and calibration only, as a line PC keeps it) equals the in-process pipeline; its in-process
    `glad detect` is refused in one line naming the extra to install."""
    py, glad, sizes = client_venv
    names = {r[0].lower() for r in sizes}
    assert not names & NOT_IN_CLIENT, names & NOT_IN_CLIENT
    assert {"glad-toolkit", "tritonclient", "grpcio", "numpy", "pillow"} <= names
    line = tmp_path / "line"
    bundle = line / served_bundle.path.name  # the folder name gives the served prefix (tiny_line)
    bundle.mkdir(parents=True)
    for f in ("config.json", "manifest.json", "calibration.json"):
        shutil.copy(served_bundle.path / f, bundle / f)
    cells = line / "cells"
    cells.mkdir()
    for k, img in enumerate(images):
        (cells / f"cell{k}.png").write_bytes(_png(img))
    out = line / "out"
    res = _run([glad, "detect", bundle, cells, "--out", out, "--server", server.grpc_url, "--stream", "--quiet"],
               cwd=line)  # cwd outside the repository: nothing imports from the checkout
    assert res.returncode == 0, _tail(res, 40)
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    _, ref = reference
    assert [Path(r["source"]).name for r in records] == [f"cell{k}.png" for k in range(len(images))]
    for k, r in enumerate(records):
        assert r.get("error") is None, r
        assert r["score"] == pytest.approx(float(ref.scores[k]), abs=ATOL)
        assert r["adaptive_step"] == int(ref.adaptive_steps[k])
        assert r["label"] in ("normal", "anomalous") and r["threshold_source"] == "calibration"
        assert r["regions"] is not None and (out / r["overlay_file"]).is_file() and (out / r["map_file"]).is_file()
    # the venv really is client-only: its interpreter cannot import scipy, and in-process detection is refused
    res = _run([py, "-c", "import glad_runtime.serving.client, glad_runtime.detector, glad_cli.main; import scipy"],
               cwd=line)
    assert res.returncode != 0 and "No module named 'scipy'" in res.stderr
    res = _run([glad, "detect", bundle, cells, "--out", line / "local"], cwd=line)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "glad-toolkit[runtime]" in lines[0] and "--server HOST:PORT --stream" in lines[0]
