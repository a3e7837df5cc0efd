"""The ``glad`` command of a client-only install (``glad-toolkit[client]``: no scipy, scikit-image, torch,
onnxruntime, scikit-learn, matplotlib), issue 32: ``glad detect --server HOST:PORT --stream`` runs; a command that
needs a missing extra is refused in one line naming it. A meta-path blocker stands in for the missing packages
(``tests/serving/test_client_wheel.py`` does the same with a real wheel, a fresh venv and a real server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import stub_config
from glad_cli.options import EXTRA_OF_MODULE, missing_extra_line
from glad_runtime.core.bundle import Bundle

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = """
import sys
BLOCKED = ('scipy', 'skimage', 'safetensors', 'torch', 'torchvision', 'onnx', 'onnxruntime', 'sklearn', 'matplotlib',
           'diffusers', 'timm', 'openvino')
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.fixture
def bundle_and_images(tmp_path):
    b = Bundle.create(tmp_path / "line_b", stub_config())
    (b.file("weights") / "w.bin").write_bytes(b"weights")
    b.write_manifest()
    src = tmp_path / "in"
    src.mkdir()
    for k in range(2):
        Image.fromarray(np.full((10, 12), 100 + 50 * k, np.uint8)).save(src / f"cell{k}.png")
    return b, src


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_stream_detect_runs_without_the_runtime_extras(bundle_and_images, tmp_path):
    """The whole `glad detect --server --stream` path (client, writer, overlays, summary) with the runtime extras
    unimportable; GladClient replaced by a fake that answers each file (the served part is tested for real in
    tests/serving/test_client_wheel.py)."""
    b, src = bundle_and_images
    out = tmp_path / "out"
    code = f"""
import numpy as np
import glad_runtime.serving.client as client
from glad_runtime.core.detection import Detection
from glad_runtime.core.regions import Region

class FakeClient:
    def __init__(self, url, prefix, threshold=None):
        assert (url, prefix) == ("127.0.0.1:8001", "line_b"), (url, prefix)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return False
    def stream(self, paths, window):
        for k, p in enumerate(paths):
            amap = np.zeros((8, 8), np.float32)
            amap[2:4, 2:5] = 0.5 * k
            yield Detection(source=p, score=0.3 * k, label="anomalous" if k else "normal", threshold=0.1,
                            threshold_source="calibration", ads_state="off", adaptive_step=-1, anomaly_map=amap,
                            original_size=(10, 12), pixel_threshold=0.2,
                            regions=[Region(3, 2, 4, 3, 12, 0.5, 0.5)] if k else [])

client.GladClient = FakeClient
from glad_cli.main import cli
try:
    cli(["detect", {str(b.path)!r}, {str(src)!r}, "--out", {str(out)!r}, "--server", "127.0.0.1:8001", "--stream",
         "--quiet"])
except SystemExit as e:
    assert e.code == 0, e.code
bad = [m for m in BLOCKED if m in sys.modules]
assert not bad, bad
print("STREAM_OK")
"""
    res = _run(code)
    assert "STREAM_OK" in res.stdout, res.stdout + res.stderr
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["normal", "anomalous"]
    assert all((out / r["overlay_file"]).is_file() and (out / r["map_file"]).is_file() for r in records)


@pytest.mark.parametrize("args, module, extra", [
    (["detect", "{b}", "{src}", "--out", "{out}"], "scipy", "runtime"),                    # in process
    (["detect", "{b}", "{src}", "--out", "{out}", "--server", "127.0.0.1:1"], "scipy", "runtime"),  # loop here
    (["eval", "{b}", "{data}", "--out", "{out}"], None, None),                              # first missing module
])
def test_commands_needing_an_extra_are_refused_in_one_line(bundle_and_images, tmp_path, args, module, extra):
    b, src = bundle_and_images
    data = tmp_path / "data"
    (data / "test" / "good").mkdir(parents=True)
    (data / "train" / "good").mkdir(parents=True)
    args = [a.format(b=b.path, src=src, out=tmp_path / "out", data=data) for a in args]
    code = f"""
from glad_cli.main import cli
cli({args!r})
"""
    res = _run(code)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr
    line = lines[0]
    assert line.startswith(f"error: glad {args[0]} needs ") and "install the '" in line
    if module:
        assert f"needs {module}," in line and f"pip install 'glad-toolkit[{extra}]'" in line
    assert "--server HOST:PORT --stream" in line


def test_missing_extra_line_names_the_extra_or_stays_out():
    line = missing_extra_line(ModuleNotFoundError("No module named 'scipy.ndimage'", name="scipy.ndimage"), "detect")
    assert line.startswith("glad detect needs scipy, which this install does not have: install the 'runtime' extra")
    assert missing_extra_line(ModuleNotFoundError("x", name="no_such_module_of_ours")) is None
    assert missing_extra_line(ModuleNotFoundError("x")) is None
    assert "--stream" not in missing_extra_line(ModuleNotFoundError("x", name="tritonclient.grpc"), "detect")
    # every extra named exists in pyproject.toml
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(EXTRA_OF_MODULE.values()) <= set(extras)
