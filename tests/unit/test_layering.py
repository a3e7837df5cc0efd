"""The runtime's layering: no torch / onnxruntime on import, no module-level imports of the build side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "glad_runtime"
FORBIDDEN = ("export", "training", "calib", "bench", "glad_cli")


def test_runtime_and_client_import_neither_torch_nor_onnxruntime():
    code = ("import sys, glad_runtime, glad_runtime.serving.client; "
            "print(','.join(m for m in ('torch', 'onnxruntime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_runtime_has_no_module_level_imports_of_the_build_side():
    bad = []
    for path in RUNTIME.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only (lazy imports in functions are allowed)
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(RUNTIME)}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert bad == []


def test_light_client_runs_without_the_runtime_extras():
    """`pip install glad-toolkit[client]` has numpy, Pillow, click, tqdm and tritonclient only: the client SDK must
    import and prepare every input kind with scipy, scikit-image, safetensors, torch and onnxruntime unimportable
    (a meta-path blocker stands in for their absence)."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('scipy', 'skimage', 'safetensors', 'torch', 'onnxruntime', 'sklearn', 'matplotlib'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np
from glad_runtime.serving import client
for x in (np.zeros((5, 7), np.uint8), np.zeros((5, 7, 3), np.uint8), np.zeros((5, 7), np.uint16),
          np.zeros((3, 8, 8), np.float32), b'raw bytes'):
    print(client.plan.prepare(x, 0, 8).kind, end=' ')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["files", "files", "files", "tensor", "files"]


def test_facade_and_served_models_import_neither_the_renderer_nor_matplotlib():
    """Issue 29, item 5: what ``glad detect`` writes and draws lives in ``glad_runtime.output`` (and
    ``glad_runtime.render``); the facade and the three python-backend models (over a stand-in
    ``triton_python_backend_utils``) load neither, nor matplotlib, nor the engines' libraries. ``glad --help``
    builds its engine options from the backend table without numpy."""
    code = """
import sys, types
pb = types.ModuleType('triton_python_backend_utils')
pb.__getattr__ = lambda name: 0  # constants read at import time
sys.modules['triton_python_backend_utils'] = pb
import glad_runtime.detector
facade = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' or m in ('glad_runtime.render',
                'glad_runtime.output', 'torch', 'onnxruntime'))
sys.path.insert(0, sys.argv[1])
import glad_bls, glad_model, glad_inflight_model
served = sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib' or m in ('glad_runtime.render',
                'glad_runtime.output', 'torch', 'onnxruntime'))
print(facade, served)
"""
    models = RUNTIME.parent / "triton_models" / "python"
    out = subprocess.run([sys.executable, "-c", code, str(models)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"
    cli = subprocess.run([sys.executable, "-c", "import sys, glad_cli.main; print('numpy' in sys.modules)"],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.strip() == "False", cli.stderr
