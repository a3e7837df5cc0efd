"""Which project files and functions run for one image, from the Detector call to its label (after the bundle
and engines are loaded): `python -m bench.image_path` (tiny random bundle, torch engine, builds it under /tmp/trace)."""
import sys, os, numpy as np
from pathlib import Path
from PIL import Image
from export.models import build_tiny_modules, save_bundle_modules
from glad_runtime.core.bundle import Bundle
from glad_runtime.core.config import get_preset
from glad_runtime.detector import Detector, detect_files
root = Path("/tmp/trace"); root.mkdir(exist_ok=True)
b = Bundle.create(root / "tiny", get_preset("tiny", ads_enabled=True, tau=0.02, min_step=150)) if not (root/"tiny"/"config.json").exists() else Bundle(root/"tiny")
if not (root/"tiny"/"weights").exists() or not list((root/"tiny"/"weights").glob("*.safetensors")):
    save_bundle_modules(build_tiny_modules(get_preset("tiny"), seed=0, features="random"), b)
Image.fromarray((np.random.default_rng(0).uniform(0, 255, (64, 64))).astype(np.uint8)).save(root / "img.png")
det = Detector.open(b, "torch", threshold=0.1)
seen = {}
proj = "/work/main/"
def prof(frame, event, arg):
    if event == "call":
        f = frame.f_code.co_filename
        if f.startswith(proj) and ".venv" not in f:
            seen.setdefault(os.path.relpath(f, proj), set()).add(frame.f_code.co_name)
sys.setprofile(prof)
recs = detect_files(det, [root / "img.png"], root / "out", progress=False)
sys.setprofile(None)
print(recs[0].label, recs[0].score)
for f, fns in sorted(seen.items()):
    print(f"{f}: {len(fns)} functions")
print(len(seen), "files,", sum(map(len, seen.values())), "functions")
