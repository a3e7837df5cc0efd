"""Which project files and functions run for one image, from the Detector call to its label (after the bundle and
engines are loaded): ``python -m bench.image_path`` (a tiny random bundle, torch engine, built under a temporary
folder, or ``--work DIR`` to keep it). Works from any checkout: the project root is this file's parent's parent, as
imported and as resolved (a checkout reached through a symbolic link counts either way).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
#: the root as the code objects name their files: as imported (through a link, say) and resolved
_ROOTS = tuple(dict.fromkeys(str(r) + os.sep for r in (Path(os.path.abspath(__file__)).parent.parent, ROOT)))


def trace(work: Path) -> dict[str, set[str]]:
    """``{project file (relative): {function names}}`` that run while one image is scored and written."""
    from export.models import build_tiny_modules, save_bundle_modules
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.config import get_preset
    from glad_runtime.detector import Detector
    from glad_runtime.output import detect_files

    work.mkdir(parents=True, exist_ok=True)
    bundle_dir = work / "tiny"
    if (bundle_dir / "config.json").exists():
        b = Bundle(bundle_dir)
    else:
        b = Bundle.create(bundle_dir, get_preset("tiny", ads_enabled=True, tau=0.02, min_step=150))
    if not list((bundle_dir / "weights").glob("*.safetensors")):
        save_bundle_modules(build_tiny_modules(get_preset("tiny"), seed=0, features="random"), b)
    image = work / "img.png"
    Image.fromarray(np.random.default_rng(0).uniform(0, 255, (64, 64)).astype(np.uint8)).save(image)
    det = Detector.open(b, "torch", threshold=0.1)
    seen: dict[str, set[str]] = {}

    def prof(frame, event, arg):
        if event == "call":
            f = frame.f_code.co_filename
            for root in _ROOTS:
                if f.startswith(root) and ".venv" not in f:
                    seen.setdefault(os.path.relpath(f, root), set()).add(frame.f_code.co_name)
                    break

    sys.setprofile(prof)
    try:
        recs = detect_files(det, [image], work / "out", progress=False)
    finally:
        sys.setprofile(None)
    print(recs[0].label, recs[0].score)
    return seen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the bundle and outputs (default: temporary)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        seen = trace(a.work or Path(tmp))
    for f, fns in sorted(seen.items()):
        print(f"{f}: {len(fns)} functions")
    print(len(seen), "files,", sum(map(len, seen.values())), "functions")


if __name__ == "__main__":
    main()
